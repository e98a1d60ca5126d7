"""Story generation: the autoregressive next-shot loop over a memory bank (paper Fig. 3b).

For each caption C_i: Frame Selection over the latents of every earlier shot (global memory, no eviction) ->
Adaptive Conditioner -> flow-matching sampling (Euler, time shift, classifier-free guidance on the caption) ->
the new shot's latents join the memory bank (no decode/encode round trip; design notes "Sampling").

* T2MSV: shot 1 has no memory and no image. I2MSV: shot 1's first frame is the start image, through Wan2.1-I2V's
  channel path and image cross-attention.
* ``memory='none'`` empties the memory for every shot: the no-memory baseline with the same model.
* Per-shot seed = story seed + shot index, so any shot can be regenerated alone; the same seed reproduces the
  story exactly.
* After every shot, ``frames.npz``, ``latents.npz`` and ``manifest.json`` are rewritten atomically, so an
  interrupted story resumes (``resume=True``) from the last finished shot.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax import locks
from onestory_jax import next_shot
from onestory_jax import rectified_flow as rf
from onestory_jax import story as story_lib
from onestory_jax import video_io
from onestory_jax.models import codec as codec_lib

MEMORY_MODES = ("full", "none")


def check_settings(*, steps: int | None = None, shift: float | None = None, guidance: float | None = None) -> None:
  """Raises ValueError naming the first sampler setting out of range (None: not given, nothing to check)."""
  if steps is not None and (isinstance(steps, bool) or not float(steps).is_integer() or steps < 1):
    raise ValueError(f"--steps must be an integer >= 1, got {steps!r}")
  if shift is not None and not (math.isfinite(shift) and shift > 0):
    raise ValueError(f"--shift must be a finite number > 0 (the sampling time shift), got {shift!r}")
  if guidance is not None and not math.isfinite(guidance):
    raise ValueError(f"--guidance must be a finite number (the classifier-free guidance scale), got {guidance!r}")


class ShotGenerator:
  """Compiles one program that generates a shot from (caption, padded memory bank, optional start image)."""

  def __init__(
      self,
      system: next_shot.System,
      params: Any,
      enc: dict,
      *,
      max_shots: int,
      steps: int,
      shift: float,
      guidance: float,
  ):
    check_settings(steps=steps, shift=shift, guidance=guidance)
    self.system = system
    self.params = params
    self.enc = enc
    # At least K_sel slots, so top-K is defined even for short shots (padded slots are never selected).
    self.max_memory_frames = max(max(max_shots - 1, 1) * system.latent_shape[0], int(system.config.selection.k_sel))
    self.steps, self.shift = int(steps), float(shift)
    self.times = rf.sampling_times(steps, shift)
    self.guidance = float(guidance)
    self._generate = jax.jit(self._generate_impl)
    self._decode = jax.jit(lambda enc, lat: codec_lib.to_uint8(system.decode_shots(enc, lat[None])[0]))

  def _generate_impl(self, params, tokens, memory, memory_mask, start_image, start_present, rng):
    s = self.system
    cond = s.condition(
        params, self.enc, tokens, memory, memory_mask, start_image=start_image, start_present=start_present
    )

    guided = cond.guidance_pair() if self.guidance != 1.0 else None

    def velocity(x, t):
      if guided is None:
        return s.velocity(params, cond, x, jnp.full((x.shape[0],), t))
      # Classifier-free guidance in one DiT call over the caption and empty-caption rows.
      both = s.velocity(params, guided, jnp.concatenate([x, x]), jnp.full((2 * x.shape[0],), t))
      v_cond, v_uncond = jnp.split(both, 2)
      return rf.cfg_velocity(v_cond, v_uncond, self.guidance)

    noise = jax.random.normal(rng, (tokens.shape[0],) + s.latent_shape, jnp.float32)
    x0 = rf.euler_sample(velocity, noise, self.times)
    return x0, dict(
        scores=cond.scores,
        indices=cond.indices,
        valid=cond.valid,
        levels=cond.context["levels"],
        context_tokens=jnp.sum(cond.context["mask"], axis=1),
    )

  def __call__(
      self, caption: str, memory_latents: Sequence[np.ndarray], seed: int, start_image: np.ndarray | None = None
  ) -> tuple[np.ndarray, dict]:
    """Generates one shot. ``memory_latents`` are the earlier shots' latents [F, h, w, C], oldest first."""
    s = self.system
    f, h, w, c = s.latent_shape
    memory = np.zeros((1, self.max_memory_frames, h, w, c), np.float32)
    mask = np.zeros((1, self.max_memory_frames), bool)
    if memory_latents:
      bank = np.concatenate(list(memory_latents), axis=0)
      if bank.shape[0] > self.max_memory_frames:
        raise ValueError(
            f"memory holds {bank.shape[0]} latent frames but the sampler was built for "
            f"{self.max_memory_frames} (sample.max_shots too small)"
        )
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
    x0, info = self._generate(self.params, tokens, memory, mask, img, present, jax.random.key(seed))
    return np.asarray(x0[0]), jax.tree.map(lambda a: np.asarray(a[0]), info)

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


def _story_digest(story: story_lib.Story) -> str:
  return hashlib.sha256(json.dumps(story.captions, sort_keys=True).encode()).hexdigest()[:16]


def generate_story(
    generator: ShotGenerator,
    story: story_lib.Story,
    out_dir: str,
    *,
    seed: int,
    memory: str = "full",
    resume: bool = False,
    fps: int = 8,
) -> dict:
  """Generates every shot of ``story`` into ``out_dir``; returns the manifest.

  ``out_dir`` is locked for the run (:mod:`onestory_jax.locks`): a second writer gets :class:`locks.InUse`.
  """
  if memory not in MEMORY_MODES:
    raise ValueError(f"--memory must be one of {MEMORY_MODES}, got {memory!r}")
  with locks.exclusive(out_dir, "--out"):
    return _generate_story(generator, story, out_dir, seed=seed, memory=memory, resume=resume, fps=fps)


def _generate_story(
    generator: ShotGenerator, story: story_lib.Story, out_dir: str, *, seed: int, memory: str, resume: bool, fps: int
) -> dict:
  s = generator.system
  os.makedirs(out_dir, exist_ok=True)
  manifest_path = os.path.join(out_dir, "manifest.json")
  d = s.config.data
  start = story_lib.load_image(story.start_image, d.height, d.width) if story.start_image else None
  header = {
      "story_digest": _story_digest(story),
      "seed": seed,
      "memory": memory,
      "start_image": story.start_image,
      "num_shots": len(story.shots),
      "sampler": {"steps": generator.steps, "shift": generator.shift, "guidance": generator.guidance},
  }
  shots, latents, records = [], [], []
  if os.path.exists(manifest_path):
    if not resume:
      raise ValueError(
          f"{manifest_path} already exists: pass --resume to continue that story, or choose another " f"--out"
      )
    with open(manifest_path) as f:
      old = json.load(f)
    for k, v in header.items():
      if old.get(k) != v:
        raise ValueError(f"{manifest_path}: cannot resume, its {k}={old.get(k)!r} differs from this run's {v!r}")
    records = old["shots"]
    if records:
      shots = video_io.load_frames_npz(os.path.join(out_dir, "frames.npz"))[: len(records)]
      with np.load(os.path.join(out_dir, "latents.npz"), allow_pickle=False) as z:
        latents = [z[f"shot_{i}"] for i in range(len(records))]
    logging.info("Resuming %s at shot %d of %d", out_dir, len(records) + 1, len(story.shots))
  kernels = [tuple(k) for k in s.config.conditioner.kernels]
  for i, n in enumerate(s.tokenizer.dropped(story.captions)):
    if n:
      logging.warning(
          "shot %d: the caption is %d tokens longer than the text encoder takes (%d); its last %d tokens are "
          "dropped",
          i + 1,
          n,
          s.tokenizer.capacity(),
          n,
      )
  for i in range(len(records), len(story.shots)):
    caption = story.shots[i].caption
    shot_seed = seed + i
    mem = list(latents) if memory == "full" else []  # a copy: the new shot joins the bank only afterwards
    lat, info = generator(caption, mem, shot_seed, start_image=start if i == 0 else None)
    if not (np.isfinite(lat).all() and np.isfinite(info["scores"][info["indices"][info["valid"]]]).all()):
      raise ValueError(
          f"shot {i + 1}: the sampler produced non-finite values (the checkpoint's parameters or the sampler "
          f"settings {header['sampler']} are bad); nothing of this shot was written to {out_dir}"
      )
    frames = generator.decode(lat)
    shots.append(frames)
    latents.append(lat)
    records.append(
        {
            "index": i,
            "caption": caption,
            "seed": shot_seed,
            "memory_frames": int(sum(x.shape[0] for x in mem)),
            "context_tokens": int(info["context_tokens"]),
            "selected": selection_record(info, s.latent_shape[0], kernels),
        }
    )
    video_io.save_frames_npz(os.path.join(out_dir, "frames.npz"), shots)
    _save_latents(os.path.join(out_dir, "latents.npz"), latents)
    video_io.atomic_write_json(manifest_path, dict(header, shots=records, complete=False))
    logging.info("shot %d/%d: %s", i + 1, len(story.shots), caption)
  for i, frames in enumerate(shots):
    video_io.write_mp4(os.path.join(out_dir, f"shot_{i:02d}.mp4"), frames, fps=fps, scale=8)
  video_io.write_mp4(os.path.join(out_dir, "story.mp4"), np.concatenate(shots, axis=0), fps=fps, scale=8)
  video_io.save_png(
      os.path.join(out_dir, "contact_sheet.png"),
      video_io.contact_sheet(shots, [r["caption"] for r in records], scale=4),
  )
  manifest = dict(header, shots=records, complete=True)
  video_io.atomic_write_json(manifest_path, manifest)
  return manifest


def _save_latents(path: str, latents: Sequence[np.ndarray]) -> None:
  buf = io.BytesIO()
  np.savez(buf, **{f"shot_{i}": np.asarray(x) for i, x in enumerate(latents)})
  video_io.atomic_write_bytes(path, buf.getvalue())


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
        max_shots=3,
        steps=s.config.sample.steps,
        shift=s.config.sample.shift,
        guidance=s.config.sample.guidance,
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
