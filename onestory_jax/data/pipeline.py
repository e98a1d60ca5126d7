"""Grain training pipeline: 3-shot triplets with shot inflation (paper Sec. 4.4).

Stories come from the :class:`~onestory_jax.data.sources.StorySource` that
``config.data.source`` names (:func:`sources.make_story_source`; StoryWorld's are
'on_the_fly' and 'tfds'). Every training sample is a triplet (memory shot 0, memory
shot 1, target):

* real triplet (story with >= 3 shots): shots a < b < c drawn at random, target c;
  pseudo-labels from the source (``source.pseudo_labels``; StoryWorld's come from the
  annotations, :func:`storyworld.pseudo_labels`).
* inflated triplet (probability ``p_inflate``; always for 2-shot stories and during the
  decoupled-conditioning warm-up): two shots a < b of the story (S_first, target) plus
  a synthetic shot S_syn, either cross-video insertion (probability ``p_insert``: a
  random shot of another story, pseudo-label -1) or an augmented copy of S_first
  (random flip, shift-crop and colour jitter applied identically to every frame,
  pseudo-label 0). Order (S_first, S_syn) with probability ``p_syn_second``, else
  (S_syn, S_first).

Sample at global position i is a pure function of (config.data.shuffle_seed,
config.seed, i): the story index comes from a seeded shuffle of the index space (one
permutation per epoch), all other draws from ``np.random.default_rng([shuffle_seed,
seed, i])``. The training step of position i is ``i // global_batch``; positions with
step < warmup_steps are always inflated. Process p of P takes positions p, p+P, ... and
batches them, so the P local batches of a step together form the global batch.

Sample (one example; batches add a leading dim), declared in code by :func:`example_spec`
and, per global batch, :func:`batch_spec`::

  frames      uint8   [3, T, H, W, 3]  memory shot 0, memory shot 1, target
  tokens      int32   [text_len]       target caption
  sel_labels  float32 [2]              pseudo-label per memory shot
  real_first  bool    [2]              which memory shot is S_first (real triplets:
                                       shot a, the earliest, i.e. [True, False])
  memory_shots int32  [2]              shot index of each memory shot in its story (a, b;
                                       S_syn gets a random index in [0, target] other than
                                       S_first's), for Frame Selection's shot encoding
  synthetic   bool    []               inflated triplet?
  story       int32   []               story index
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import ml_collections
import numpy as np

from onestory_jax.data import sources
from onestory_jax.data import tokenizer as tokenizer_lib

INSERTED_LABEL = -1.0
AUGMENTED_LABEL = 0.0


@dataclasses.dataclass(frozen=True)
class TripletSpec:
  """The knobs of triplet sampling (picklable, read from the config)."""

  seed: int
  shuffle_seed: int
  global_batch: int
  warmup_steps: int
  p_inflate: float
  p_insert: float
  p_syn_second: float


def augment_shot(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Augmented copy of a shot: the same random flip, shift-crop and colour jitter on
  every frame (the paper's augmented first shot, Sec. 4.4).

  Args:
    frames: uint8 [T, H, W, 3].
    rng: source of the random parameters.

  Returns:
    uint8 [T, H, W, 3].
  """
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"augment_shot expects uint8 [T, H, W, 3], got {frames.dtype} " f"{frames.shape}")
  _, h, w, _ = frames.shape
  x = frames.astype(np.float32)
  if rng.random() < 0.5:
    x = x[:, :, ::-1]
  scale = rng.uniform(0.75, 0.95)
  ch, cw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
  y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
  rows = y0 + (np.arange(h) * ch) // h
  cols = x0 + (np.arange(w) * cw) // w
  x = x[:, rows][:, :, cols]
  contrast = rng.uniform(0.8, 1.2)
  brightness = rng.uniform(0.8, 1.2)
  gains = rng.uniform(0.9, 1.1, size=3).astype(np.float32)
  mean = x.mean()
  x = ((x - mean) * contrast + mean) * brightness * gains
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


class TripletSampler:
  """(global position, story index) -> one training sample (see module docstring).

  Args:
    spec: the sampling knobs.
    stories: the story source.
    tokenizer: the caption tokenizer.
    layout: :func:`example_spec` of the config: the sample's fields are cast to its dtypes
      and must have its shapes.
  """

  def __init__(
      self,
      spec: TripletSpec,
      stories: sources.StorySource,
      tokenizer: tokenizer_lib.CaptionTokenizer,
      layout: dict[str, tuple[tuple[int, ...], Any]],
  ):
    if len(stories) < 2:
      raise ValueError(f"the story source needs >= 2 stories (cross-video insertion), " f"got {len(stories)}")
    self.spec = spec
    self.stories = stories
    self.tokenizer = tokenizer
    self.layout = dict(layout)

  def __call__(self, position: int, story_index: int) -> dict[str, np.ndarray]:
    spec = self.spec
    rng = np.random.default_rng([spec.shuffle_seed, spec.seed, int(position)])
    step = int(position) // spec.global_batch
    story, read_shot = self.stories.record(int(story_index))
    n = len(story["shots"])
    inflate = rng.random() < spec.p_inflate
    if n < 3 or step < spec.warmup_steps:
      inflate = True
    if not inflate:
      a, b, c = (int(k) for k in np.sort(rng.choice(n, size=3, replace=False)))
      memory = [read_shot(a), read_shot(b)]
      labels = self.stories.pseudo_labels(story, [a, b], c)
      real_first = [True, False]
      shots = [a, b]
      target = c
    else:
      first, target = (int(k) for k in np.sort(rng.choice(n, size=2, replace=False)))
      first_frames = read_shot(first)
      first_label = float(self.stories.pseudo_labels(story, [first], target)[0])
      if rng.random() < spec.p_insert:
        other = int(rng.integers(len(self.stories) - 1))
        if other >= int(story_index):
          other += 1
        other_story, read_other = self.stories.record(other)
        syn = read_other(int(rng.integers(len(other_story["shots"]))))
        syn_label = INSERTED_LABEL
      else:
        syn = augment_shot(first_frames, rng)
        syn_label = AUGMENTED_LABEL
      syn_shot = int(rng.integers(target))  # one of the target's other indices: [0, target] without `first`
      syn_shot += syn_shot >= first
      if rng.random() < spec.p_syn_second:
        memory, labels, real_first = [first_frames, syn], [first_label, syn_label], [True, False]
        shots = [first, syn_shot]
      else:
        memory, labels, real_first = [syn, first_frames], [syn_label, first_label], [False, True]
        shots = [syn_shot, first]
    frames = np.stack(memory + [read_shot(target)])
    tokens = self.tokenizer.encode([story["shots"][target]["caption"]])[0]
    return self._conform(
        {
            "frames": frames,
            "tokens": tokens,
            "sel_labels": labels,
            "real_first": real_first,
            "memory_shots": shots,
            "synthetic": inflate,
            "story": story_index,
        }
    )

  def _conform(self, sample: dict[str, Any]) -> dict[str, np.ndarray]:
    """``sample`` cast to the layout's dtypes; raises if a shape differs from the layout."""
    if set(sample) != set(self.layout):
      raise AssertionError(f"TripletSampler fields {sorted(sample)} differ from example_spec " f"{sorted(self.layout)}")
    out = {}
    for name, (shape, dtype) in self.layout.items():
      value = np.asarray(sample[name], dtype)
      if value.shape != tuple(shape):
        raise ValueError(
            f"training sample field {name!r} has shape {value.shape}, but the "
            f"batch layout (example_spec of config.data) wants {tuple(shape)}"
        )
      out[name] = value
    return out


def example_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Shape and dtype of each field of one training sample (the table of the module docstring).

  The one declaration of the sample layout: :class:`TripletSampler` casts its output to these
  dtypes and checks these shapes, and :func:`batch_spec` adds the batch dimension. A source of
  precomputed arrays (``'multishot'``) registers its own layout (:func:`sources.source_example_spec`).
  """
  registered = sources.source_example_spec(config)
  if registered is not None:
    return registered
  d = config.data
  shot = (int(d.frames_per_shot), int(d.height), int(d.width), 3)
  return {
      "frames": ((3,) + shot, np.uint8),
      "tokens": ((int(d.text_len),), np.int32),
      "sel_labels": ((2,), np.float32),
      "real_first": ((2,), np.bool_),
      "memory_shots": ((2,), np.int32),
      "synthetic": ((), np.bool_),
      "story": ((), np.int32),
  }


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Shape and dtype of each field of one global batch (config.data.batch_size samples) of
  :func:`make_train_dataset`; a process's local batch has batch_size // process_count rows."""
  b = int(config.data.batch_size)
  return {k: ((b,) + shape, dtype) for k, (shape, dtype) in example_spec(config).items()}


def make_train_dataset(
    config: ml_collections.ConfigDict,
    *,
    warmup_steps: int,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer: tokenizer_lib.CaptionTokenizer | None = None,
) -> grain.IterDataset:
  """Infinite grain dataset of local batches (config.data.batch_size // process_count).

  Args:
    config: the experiment config (uses config.seed and config.data).
    warmup_steps: training steps of the decoupled-conditioning warm-up; their samples
      are always inflated (synthetic) triplets.
    process_index: this process.
    process_count: number of data-loading processes.
    tokenizer: the caption tokenizer of the run's text encoder (default: the StoryWorld word-level one).

  Returns:
    A checkpointable ``grain.IterDataset`` of dicts of numpy arrays.
  """
  data = config.data
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count={process_count}), " f"got {process_index}")
  global_batch = int(data.batch_size)
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(
        f"config.data.batch_size={global_batch} must be a positive multiple " f"of process_count={process_count}"
    )
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
  for name in ("p_inflate", "p_insert", "p_syn_second"):
    if not 0.0 <= float(data[name]) <= 1.0:
      raise ValueError(f"config.data.{name} must be in [0, 1], got {data[name]}")
  spec = TripletSpec(
      seed=int(config.seed),
      shuffle_seed=int(data.shuffle_seed),
      global_batch=global_batch,
      warmup_steps=int(warmup_steps),
      p_inflate=float(data.p_inflate),
      p_insert=float(data.p_insert),
      p_syn_second=float(data.p_syn_second),
  )
  stories = sources.make_story_source(config)
  tokenizer = tokenizer or tokenizer_lib.storyworld_tokenizer(int(data.text_len))
  if hasattr(stories, "triplet_sampler"):  # a source of precomputed arrays samples its own triplets
    sampler = stories.triplet_sampler(spec, tokenizer, example_spec(config))
  else:
    sampler = TripletSampler(spec, stories, tokenizer, example_spec(config))
  ds = grain.MapDataset.range(len(stories)).shuffle(seed=spec.shuffle_seed).repeat()
  ds = ds.map_with_index(sampler)
  ds = ds[process_index::process_count]
  ds = ds.batch(global_batch // process_count, drop_remainder=True)
  read_options = grain.ReadOptions(
      num_threads=int(data.read_threads), prefetch_buffer_size=int(data.prefetch_buffer_size)
  )
  it = ds.to_iter_dataset(read_options)
  if int(data.worker_count) > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data.worker_count)))
  return it
