"""Reads built multi-shot records for training: random access, and 3-shot triplets of stored latents.

``config.data.source = 'multishot'`` with ``config.data.records = RECORDS`` (the ``--out`` of ``python -m
onestory_jax.data.build``) trains on the records through the same grain pipeline as StoryWorld
(:func:`onestory_jax.data.pipeline.make_train_dataset`: seeded shuffle, per-process sharding of the positions,
batching, the iterator state in the checkpoint), with :class:`LatentTripletSampler` in place of the pixel sampler:
the same draws (real triplet a < b < c, or shot inflation with cross-video insertion, label -1, or the augmented
first shot, label 0, in either order), on stored latents, stored caption embeddings and the stored per-frame
pseudo-labels. The augmented first shot is one of the ``augmentations`` copies the build encoded, drawn at random.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from etils import epath
import numpy as np

from onestory_jax.data.multishot import layout as layout_lib

NAME = "multishot"
INSERTED_LABEL = -1.0  # onestory_jax.data.pipeline's labels of synthetic shots
AUGMENTED_LABEL = 0.0


def find_records(records: str, variant: str | None = None) -> str:
  """The built dataset directory (``RECORDS/multishot/<name>/<version>``) that ``records`` names.

  ``records`` is the build's ``--out`` (then the only build there, or the one named ``variant``), or a dataset
  directory itself (it holds ``dataset_info.json``).
  """
  root = epath.Path(records)
  if (root / "dataset_info.json").exists():
    return os.fspath(root)
  found = sorted(p.parent for p in (root / NAME).glob("*/*/dataset_info.json")) if (root / NAME).exists() else []
  if not found:
    raise ValueError(
        f"config.data.records={records!r}: no built records there (expected {NAME}/<name>/<version>/ from "
        "python -m onestory_jax.data.build --out=RECORDS)"
    )
  if len(found) > 1:
    named = [p for p in found if p.parent.name == variant]
    if len(named) != 1:
      raise ValueError(
          f"config.data.records={records!r} holds several builds {[f'{p.parent.name}/{p.name}' for p in found]}; "
          "point config.data.records at one of those directories"
      )
    found = named
  return os.fspath(found[0])


class MultiShotRecords:
  """Random access to built records: item k -> dict of numpy arrays (the features of
  :mod:`onestory_jax.data.multishot.multishot_dataset_builder`, text as str). Picklable: grain workers reopen the
  ArrayRecord files lazily.

  It is a :class:`onestory_jax.data.sources.StorySource` whose shots are latents (``record(k)[1](i)`` is shot i's
  latents), and it brings its own triplet sampler (:meth:`triplet_sampler`).
  """

  def __init__(self, directory: str):
    self.directory = os.fspath(directory)
    self._source = None
    self._metadata = None

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

      self._source = tfds.builder_from_directory(self.directory).as_data_source(split="train")
    return self._source

  @property
  def metadata(self) -> dict[str, Any]:
    if self._metadata is None:
      self._metadata = json.loads((epath.Path(self.directory) / "metadata.json").read_text())
    return self._metadata

  @property
  def layout(self) -> layout_lib.RecordLayout:
    return layout_lib.RecordLayout.from_dict(self.metadata["layout"])

  @property
  def augmentations(self) -> int:
    return int(self.metadata["augmentations"])

  def __len__(self) -> int:
    return len(self._open())

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self)
    if not -n <= int(index) < n:
      raise IndexError(f"records {self.directory}: index {index} out of range [0, {n})")
    item = dict(self._open()[int(index) % n])
    for k in ("unit", "source", "meta_json"):
      if isinstance(item[k], bytes):
        item[k] = item[k].decode("utf-8")
    return item

  def __getstate__(self) -> dict[str, Any]:
    return {"directory": self.directory}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["directory"])

  # -------------------------------------------------------------- StorySource
  def record(self, index: int) -> tuple[dict[str, Any], Any]:
    item = self[index]
    story = json.loads(item["meta_json"])
    story["record"] = item
    return story, item["latents"].__getitem__

  def frame_labels(self, story: dict[str, Any], memory_shots: Sequence[int], target: int) -> np.ndarray:
    """float32 [len(memory_shots), F]: the stored pseudo-label of every latent frame of each memory shot."""
    labels = story["record"]["sel_labels"]
    return np.stack([labels[int(i), int(target)] for i in memory_shots]).astype(np.float32)

  def pseudo_labels(self, story: dict[str, Any], memory_shots: Sequence[int], target: int) -> np.ndarray:
    """Per memory shot, the mean of its frames' labels (the StorySource protocol's per-shot labels)."""
    return self.frame_labels(story, memory_shots, target).mean(axis=1)

  def triplet_sampler(self, spec: Any, tokenizer: Any, layout: dict[str, tuple[tuple[int, ...], Any]]):
    """The sampler :func:`onestory_jax.data.pipeline.make_train_dataset` maps over positions (the caption tokens
    are stored, so ``tokenizer`` is not used)."""
    del tokenizer
    return LatentTripletSampler(spec, self, layout)

  def check_config(self, config) -> None:
    """Raises ValueError when the records were built for another layout than ``config`` asks for."""
    want = layout_lib.RecordLayout.from_config(config)
    diffs = self.layout.mismatches(want)
    if diffs:
      raise ValueError(
          f"records {self.directory} do not fit the run config (records vs config):\n  "
          + "\n  ".join(diffs)
          + "\nBuild them with this config: python -m onestory_jax.data.build --config=... (docs/records.md)"
      )


def _shot(record: dict[str, Any], i: int) -> dict[str, np.ndarray]:
  out = {"latents": record["latents"][i]}
  if "images" in record:
    out["images"] = record["images"][i]
  return out


def _augmented(record: dict[str, Any], i: int, k: int) -> dict[str, np.ndarray]:
  out = {"latents": record["augmented_latents"][i, k]}
  if "augmented_images" in record:
    out["images"] = record["augmented_images"][i, k]
  return out


class LatentTripletSampler:
  """(global position, story index) -> one training sample of stored arrays (:func:`layout.example_spec`).

  The draws are those of :class:`onestory_jax.data.pipeline.TripletSampler` (from
  ``np.random.default_rng([shuffle_seed, seed, position])``, in the same order), except that the augmented first
  shot is one of the stored copies.
  """

  def __init__(self, spec: Any, records: MultiShotRecords, layout: dict[str, tuple[tuple[int, ...], Any]]):
    if len(records) < 2:
      raise ValueError(f"the records need >= 2 story units (cross-video insertion), got {len(records)}")
    self.spec = spec
    self.records = records
    self.layout = dict(layout)

  def __call__(self, position: int, story_index: int) -> dict[str, np.ndarray]:
    spec = self.spec
    rng = np.random.default_rng([spec.shuffle_seed, spec.seed, int(position)])
    step = int(position) // spec.global_batch
    rec = self.records[int(story_index)]
    n = int(rec["num_shots"])
    f = rec["latents"].shape[1]
    inflate = rng.random() < spec.p_inflate
    if n < 3 or step < spec.warmup_steps:
      inflate = True
    if not inflate:
      a, b, c = (int(k) for k in np.sort(rng.choice(n, size=3, replace=False)))
      memory = [_shot(rec, a), _shot(rec, b)]
      labels = [rec["sel_labels"][a, c], rec["sel_labels"][b, c]]
      real_first, shots, target = [True, False], [a, b], c
    else:
      first, target = (int(k) for k in np.sort(rng.choice(n, size=2, replace=False)))
      first_part = _shot(rec, first)
      first_label = rec["sel_labels"][first, target]
      if rng.random() < spec.p_insert:
        other = int(rng.integers(len(self.records) - 1))
        if other >= int(story_index):
          other += 1
        other_rec = self.records[other]
        syn = _shot(other_rec, int(rng.integers(int(other_rec["num_shots"]))))
        syn_label = np.full((f,), INSERTED_LABEL, np.float32)
      else:
        syn = _augmented(rec, first, int(rng.integers(rec["augmented_latents"].shape[1])))
        syn_label = np.full((f,), AUGMENTED_LABEL, np.float32)
      syn_shot = int(rng.integers(target))  # one of the target's other indices: [0, target] without `first`
      syn_shot += syn_shot >= first
      if rng.random() < spec.p_syn_second:
        memory, labels, real_first, shots = (
            [first_part, syn],
            [first_label, syn_label],
            [True, False],
            [first, syn_shot],
        )
      else:
        memory, labels, real_first, shots = (
            [syn, first_part],
            [syn_label, first_label],
            [False, True],
            [syn_shot, first],
        )
    tgt = _shot(rec, target)
    sample = {
        "latents": np.stack([m["latents"] for m in memory] + [tgt["latents"]]),
        "tokens": rec["tokens"][target],
        "sel_labels": np.stack(labels),
        "real_first": real_first,
        "memory_shots": shots,
        "synthetic": inflate,
        "story": story_index,
    }
    if "text" in self.layout:
      sample["text"] = rec["text"][target]
    if "start_latents" in self.layout:
      sample["start_latents"] = rec["start_latents"][target]
    if "images" in self.layout:
      sample["images"] = np.stack([m["images"] for m in memory] + [tgt["images"]])
    return conform(sample, self.layout)


def conform(sample: dict[str, Any], layout: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, np.ndarray]:
  """``sample`` cast to the layout's dtypes; raises if a field is missing or has another shape."""
  if set(sample) != set(layout):
    raise ValueError(
        f"multishot records give fields {sorted(sample)}, but the batch layout of the run config wants "
        f"{sorted(layout)}: build the records with this config"
    )
  out = {}
  for name, (shape, dtype) in layout.items():
    value = np.asarray(sample[name], dtype)
    if value.shape != tuple(shape):
      raise ValueError(
          f"multishot records: field {name!r} has shape {value.shape}, but the run config wants {tuple(shape)}"
      )
    out[name] = value
  return out


def open_records(config) -> MultiShotRecords:
  """The records of ``config.data.records``, checked against the run config."""
  records = config.data.get("records", "")
  if not records:
    raise ValueError(
        "config.data.records must be set when config.data.source is 'multishot' (the --out of python -m "
        "onestory_jax.data.build)"
    )
  source = MultiShotRecords(find_records(records, config.get("variant")))
  source.check_config(config)
  len(source)  # opens it: fails early on a missing split
  return source
