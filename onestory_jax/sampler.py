"""The next-shot sampler (paper Fig. 3b, one step of it): one shot from its caption and the memory bank.

Frame Selection over the latents of every earlier shot (global memory, no eviction) -> Adaptive Conditioner ->
flow-matching sampling (Euler, time shift, classifier-free guidance on the caption and, optionally, on the
memory). T2MSV: shot 1 has no memory and no image. I2MSV: shot 1's first frame is the start image, through
Wan2.1-I2V's channel path and image cross-attention. The story loop over shots (memory bank, seeds, files, resume) is
:mod:`onestory_jax.pipeline`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax import next_shot
from onestory_jax import rectified_flow as rf
from onestory_jax import video_io
from onestory_jax.models import codec as codec_lib

MEMORY_MODES = ("full", "none")  # of the training-time samples (write_training_samples)
# Sampler settings newer than some saved configs and manifests, at the values those were sampled with.
ADDED_SETTINGS = {"memory_guidance": 0.0}


def check_settings(
    *,
    steps: int | None = None,
    shift: float | None = None,
    guidance: float | None = None,
    memory_guidance: float | None = None,
) -> None:
  """Raises ValueError naming the first sampler setting out of range (None: not given, nothing to check)."""
  if steps is not None and (isinstance(steps, bool) or not float(steps).is_integer() or steps < 1):
    raise ValueError(f"--steps must be an integer >= 1, got {steps!r}")
  if shift is not None and not (math.isfinite(shift) and shift > 0):
    raise ValueError(f"--shift must be a finite number > 0 (the sampling time shift), got {shift!r}")
  if guidance is not None and not math.isfinite(guidance):
    raise ValueError(f"--guidance must be a finite number (the classifier-free guidance scale), got {guidance!r}")
  if memory_guidance is not None and not (math.isfinite(memory_guidance) and memory_guidance >= 0):
    raise ValueError(
        f"--memory_guidance must be a finite number >= 0 (the memory guidance scale; 0 turns it off), "
        f"got {memory_guidance!r}"
    )


def guided_velocity(rows: jax.Array, guidance: float, memory_guidance: float) -> jax.Array:
  """The sampling velocity from the DiT's velocities under the guidance rows, stacked along the batch in the order
  caption [, empty caption] [, no memory] (:func:`next_shot.stack_rows`).

  ``v = v_u + g (v_c - v_u) + g_m (v_c - v_nomem)``: classifier-free guidance on the caption (``g``; rows
  ``v_u`` present when ``g != 1``) plus guidance on the memory (``g_m``; rows ``v_nomem`` present when ``g_m != 0``),
  the history guidance of Song et al. 2025 (cited by the paper, Sec. 2): the no-memory velocity is the model's own
  prediction with the memory dropped, as training drops it (``flow.p_drop_memory``). With ``g = 1``, ``g_m = 0``
  it is the conditional velocity.
  """
  parts = jnp.split(rows, 1 + (guidance != 1.0) + (memory_guidance != 0.0))
  v_cond = parts[0]
  v = v_cond if guidance == 1.0 else rf.cfg_velocity(v_cond, parts[1], guidance)
  if memory_guidance != 0.0:
    v = v + memory_guidance * (v_cond - parts[-1])
  return v


def memory_capacity(frames: int, k_sel: int) -> int:
  """Static memory-bank length (latent frames) for ``frames`` frames of memory: the next power of two, at least
  ``k_sel`` (top-K needs K candidates; padded slots are never selected). It depends on nothing but the memory itself,
  so a shot is the same whether it is generated in a 3-shot or a 30-shot story, by ``sample`` or by the API, and a
  long story compiles the (small) conditioning program once per doubling."""
  return max(int(k_sel), 1 << max(int(frames) - 1, 0).bit_length())


class ShotGenerator:
  """Generates a shot from (caption, memory bank, optional start image) with two compiled programs.

  * ``condition``: the caption through T, Frame Selection over the memory (padded to :func:`memory_capacity`),
    the Adaptive Conditioner and the I2V inputs; compiled once per memory capacity.
  * ``step``: one Euler step of the flow-matching sampler (with guidance as one batched DiT call over the rows
    :func:`guided_velocity` needs: caption, empty caption, no memory); compiled once per row count and called
    ``steps`` times, so a progress hook (:attr:`on_step`) can follow the denoising.

  Memory guidance (``memory_guidance`` > 0) applies to shots that have a memory; the first shot has none, and
  samples as without it.
  """

  def __init__(
      self,
      system: next_shot.System,
      params: Any,
      enc: dict,
      *,
      steps: int,
      shift: float,
      guidance: float,
      memory_guidance: float = 0.0,
  ):
    check_settings(steps=steps, shift=shift, guidance=guidance, memory_guidance=memory_guidance)
    self.system = system
    self.params = params
    self.enc = enc
    self.steps, self.shift = int(steps), float(shift)
    self.times = np.asarray(rf.sampling_times(steps, shift))
    self.guidance = float(guidance)
    self.memory_guidance = float(memory_guidance)
    self.on_step: Callable[[int, int], None] | None = None  # (steps done, steps) after each denoising step
    self._condition = jax.jit(self._condition_impl, static_argnames=("memory_guidance",))
    self._step = jax.jit(self._step_impl, static_argnames=("memory_guidance",))
    self._decode = jax.jit(lambda enc, lat: codec_lib.to_uint8(system.decode_shots(enc, lat[None])[0]))

  def _condition_impl(
      self, params, enc, tokens, memory, memory_mask, start_image, start_present, forced, memory_guidance
  ):
    def condition(mask, forced):
      return self.system.condition(
          params, enc, tokens, memory, mask, start_image=start_image, start_present=start_present, forced=forced
      )

    cond = condition(memory_mask, forced)
    info = dict(
        scores=cond.scores,
        indices=cond.indices,
        valid=cond.valid,
        levels=cond.context["levels"],
        context_tokens=jnp.sum(cond.context["mask"], axis=1),
    )
    # The DiT needs neither the scores nor the choice: leaving them out keeps the step program independent of the
    # memory's length.
    cond = cond.replace(scores=None, indices=None, valid=None)
    rows = [cond]
    if self.guidance != 1.0:
      rows.append(cond.replace(text=cond.null_text))
    if memory_guidance != 0.0:  # the memory dropped as training drops it: no context tokens, no memory image
      use, f_idx, f_valid = forced
      nomem = condition(jnp.zeros_like(memory_mask), (use, f_idx, jnp.zeros_like(f_valid)))
      rows.append(nomem.replace(scores=None, indices=None, valid=None))
    return next_shot.stack_rows(rows), info

  def _step_impl(self, params, cond, x, t, t_next, memory_guidance):
    s = self.system
    n = cond.text.shape[0] // x.shape[0]  # rows of guided_velocity: caption [, empty caption] [, no memory]
    v = s.velocity(params, cond, jnp.concatenate([x] * n), jnp.full((n * x.shape[0],), t))
    v = guided_velocity(v, self.guidance, memory_guidance)
    return s.pin_given_frames(cond, (x + (t_next - t) * v).astype(x.dtype))

  def __call__(
      self,
      caption: str,
      memory_latents: Sequence[np.ndarray],
      seed: int,
      start_image: np.ndarray | None = None,
      choice: tuple[np.ndarray, np.ndarray] | None = None,
  ) -> tuple[np.ndarray, dict]:
    """Generates one shot. ``memory_latents`` are the earlier shots' latents [F, h, w, C], oldest first.

    ``choice`` (indices [K_sel] into the concatenated memory, valid [K_sel], best rank first) replaces Frame
    Selection's top-K (:mod:`onestory_jax.memory_strategies`); None lets Frame Selection choose.
    """
    s = self.system
    f, h, w, c = s.latent_shape
    bank = np.concatenate(list(memory_latents), axis=0) if len(memory_latents) else np.zeros((0, h, w, c))
    capacity = memory_capacity(bank.shape[0], s.config.selection.k_sel)
    memory = np.zeros((1, capacity, h, w, c), np.float32)
    mask = np.zeros((1, capacity), bool)
    memory[0, : bank.shape[0]] = bank
    mask[0, : bank.shape[0]] = True
    tokens = s.tokenizer.encode([caption])
    d = s.config.data
    if start_image is None:
      img = np.zeros((1, d.height, d.width, 3), np.float32)
      present = np.zeros((1,), bool)
    else:
      img = np.asarray(codec_lib.to_unit(start_image))[None]
      present = np.ones((1,), bool)
    k = int(s.config.selection.k_sel)
    if choice is None:
      forced = (np.zeros((1,), bool), np.zeros((1, k), np.int32), np.zeros((1, k), bool))
    else:
      forced = (np.ones((1,), bool), np.asarray(choice[0], np.int32)[None], np.asarray(choice[1], bool)[None])
    g_m = self.memory_guidance if bank.shape[0] else 0.0  # the first shot has no memory to guide by
    cond, info = self._condition(self.params, self.enc, tokens, memory, mask, img, present, forced, memory_guidance=g_m)
    x = jax.random.normal(jax.random.key(seed), (1,) + s.latent_shape, jnp.float32)
    for i in range(self.steps):
      x = self._step(self.params, cond, x, self.times[i], self.times[i + 1], memory_guidance=g_m)
      if self.on_step is not None:
        x.block_until_ready()
        self.on_step(i + 1, self.steps)
    return np.asarray(x[0]), jax.tree.map(lambda a: np.asarray(a[0]), info)

  def decode(self, latents: np.ndarray) -> np.ndarray:
    return np.asarray(self._decode(self.enc, jnp.asarray(latents)))


def selection_record(info: dict, shot_frames: int, kernels: Sequence[Sequence[int]]) -> list[dict]:
  """Human-readable Frame Selection / Adaptive Conditioner decisions for the manifest."""
  out = []
  for rank, (idx, ok, lvl) in enumerate(zip(info["indices"], info["valid"], info["levels"])):
    if not ok:
      continue
    out.append(
        {
            "rank": rank,
            "memory_frame": int(idx),
            "shot": int(idx) // shot_frames,
            "latent_frame_in_shot": int(idx) % shot_frames,
            "score": float(info["scores"][idx]),
            "patchifier": list(kernels[lvl]) if lvl >= 0 else None,
        }
    )
  return out


def write_training_samples(trainer, params: Any, writer, step: int) -> None:
  """A fixed 3-shot insert-and-recall StoryWorld story, sampled with the current parameters, to TensorBoard."""
  from onestory_jax.data import storyworld  # pylint: disable=g-import-not-at-top

  s = trainer.system
  d = s.config.data
  cfg = storyworld.StoryWorldConfig.from_config(d, min_shots=3, max_shots=3)
  story = storyworld.generate_story(1234, "recall", cfg, num_shots=3)
  gen = getattr(trainer, "_sample_generator", None)
  if gen is None:  # compiled once, then reused with the current parameters
    gen = ShotGenerator(
        s,
        params,
        trainer.enc,
        steps=s.config.sample.steps,
        shift=s.config.sample.shift,
        guidance=s.config.sample.guidance,
        memory_guidance=s.config.sample.get("memory_guidance", ADDED_SETTINGS["memory_guidance"]),
    )
    trainer._sample_generator = gen  # pylint: disable=protected-access
  gen.params = params
  rows = {}
  for memory in MEMORY_MODES:
    shots, mem = [], []
    for i, shot in enumerate(story["shots"]):
      lat, _ = gen(shot["caption"], mem if memory == "full" else [], seed=i)
      mem.append(lat)
      shots.append(gen.decode(lat))
    rows[memory] = shots
  truth = storyworld.render_story(story)
  captions = [sh["caption"] for sh in story["shots"]]
  sheet = video_io.contact_sheet(
      rows["full"] + rows["none"] + truth,
      [f"memory: {c}" for c in captions] + [f"no memory: {c}" for c in captions] + ["ground truth"] * 3,
  )
  writer.write_images(step, {"samples/recall_story": sheet[None]})
