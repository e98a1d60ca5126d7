r"""The Python API: load a OneStory model once, then write stories shot by shot (paper Fig. 3b, Eq. 1).

  from onestory_jax import OneStoryPipeline
  pipe = OneStoryPipeline.from_pretrained()       # the shipped demo; or a workdir / an exported checkpoint
  story = pipe.generate(["a red round character moves left in a blue place, wide view.",
                         "the same first round character moves right in a new green place, close view."], seed=0)
  story.save("out/story")                          # the same files as `python -m onestory_jax.sample`

A :class:`GeneratedStory` grows one shot at a time (:meth:`GeneratedStory.next_shot`), so an application can show
each shot as it arrives. Shot ``i`` (0-based, as in ``shot_XX.mp4``) is generated from its caption ``C_i`` and the
memory of the shots before it, ``S_i = G(E, {S_j}_{j<i}, T, C_i)``; its latents join the memory bank (no decode /
encode round trip). Shot ``i``'s seed is the story seed + ``i`` unless given, so a shot can be regenerated alone:
:meth:`GeneratedStory.regenerate` rewrites shot ``k`` (another seed or caption) from the unchanged memory of the
shots before it, and then the shots after it, or keeps them as they are. :meth:`GeneratedStory.truncate` drops
shots from the end.

A story opened on a directory (``out=`` of :meth:`OneStoryPipeline.story`, or :meth:`OneStoryPipeline.open`)
writes every change through: ``frames.npz`` (lossless frames), ``latents.npz`` (the memory bank, so that a story
continues without re-encoding) and ``manifest.json`` (the plan of every shot, and for every finished shot its
seed, the memory frames that Frame Selection kept, their scores and patchifiers, and its generation time), each
atomically, the manifest last. Each finished shot's record holds a digest of its latents, so a story killed
between two writes reopens at the last shot whose files agree; nothing finished is lost, and the rest of the plan
continues (:meth:`GeneratedStory.resume`). :meth:`GeneratedStory.save` adds the videos and the contact sheet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from typing import Any, Sequence

from absl import logging
import numpy as np

from onestory_jax import logs
from onestory_jax import memory_strategies
from onestory_jax import sampler
from onestory_jax import story as story_lib
from onestory_jax import video_io

MEMORY_MODES = memory_strategies.STRATEGIES
MANIFEST = "manifest.json"
# Everything a story directory holds besides the manifest; `sample --overwrite` removes only these.
OUTPUT_FILES = ("frames.npz", "latents.npz", "start_image.png", "story.mp4", "contact_sheet.png")


@dataclasses.dataclass(frozen=True)
class Shot:
  """One generated shot.

  Attributes:
    index: 0-based position in the story.
    caption: its caption C_i.
    seed: the seed of its noise.
    frames: uint8 [T, H, W, 3].
    latents: float32 [F, h, w, C], the shot's entry in the memory bank.
    record: its manifest entry (memory frames given, Frame Selection's choice, context tokens, seconds).
  """

  index: int
  caption: str
  seed: int
  frames: np.ndarray
  latents: np.ndarray
  record: dict


def _digest(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def story_digest(captions: Sequence[str]) -> str:
  """The digest of a story's captions that manifests record (``evaluate`` compares it with its story file)."""
  return hashlib.sha256(json.dumps(list(captions), sort_keys=True).encode()).hexdigest()[:16]


class OneStoryPipeline:
  """A loaded OneStory model and its sampler settings; makes :class:`GeneratedStory` objects."""

  def __init__(
      self,
      system,
      params: Any,
      enc: dict,
      *,
      steps: int | None = None,
      shift: float | None = None,
      guidance: float | None = None,
      memory_guidance: float | None = None,
      source: str | None = None,
  ):
    """Wraps a loaded model (see :meth:`from_pretrained`); sampler settings default to the config's ``sample``
    (``memory_guidance``: :func:`sampler.guided_velocity`; 0, off, for configs written before it)."""
    sm = system.config.sample
    sampler.check_settings(steps=steps, shift=shift, guidance=guidance, memory_guidance=memory_guidance)
    self.system = system
    self.source = source
    self.generator = sampler.ShotGenerator(
        system,
        params,
        enc,
        steps=sm.steps if steps is None else steps,
        shift=sm.shift if shift is None else shift,
        guidance=sm.guidance if guidance is None else guidance,
        memory_guidance=(
            sm.get("memory_guidance", sampler.ADDED_SETTINGS["memory_guidance"])
            if memory_guidance is None
            else memory_guidance
        ),
    )

  @classmethod
  def from_pretrained(
      cls,
      path: str | None = None,
      *,
      steps: int | None = None,
      shift: float | None = None,
      guidance: float | None = None,
      memory_guidance: float | None = None,
  ) -> "OneStoryPipeline":
    """Loads a training workdir (its latest readable checkpoint), an exported checkpoint (``checkpoints export``)
    or, with no ``path``, the demo checkpoint shipped in the package. Raises ValueError naming what is wrong."""
    from onestory_jax import checkpoints  # pylint: disable=g-import-not-at-top  (orbax: only when loading)

    sampler.check_settings(steps=steps, shift=shift, guidance=guidance, memory_guidance=memory_guidance)
    system, params, enc = checkpoints.load_for_sampling(path)
    return cls(
        system, params, enc, steps=steps, shift=shift, guidance=guidance, memory_guidance=memory_guidance, source=path
    )

  def with_settings(self, **settings) -> "OneStoryPipeline":
    """The same loaded model under other sampler settings (``steps``, ``shift``, ``guidance``, ``memory_guidance``;
    the ones not given stay this pipeline's). Parameters and encoders are shared, not copied."""
    g = self.generator
    return OneStoryPipeline(self.system, g.params, g.enc, **{**self.settings, **settings}, source=self.source)

  @property
  def settings(self) -> dict:
    """The sampler settings that a manifest records (and that a story must keep to be continued)."""
    g = self.generator
    return {"steps": g.steps, "shift": g.shift, "guidance": g.guidance, "memory_guidance": g.memory_guidance}

  def story(
      self,
      *,
      seed: int = 0,
      start_image: str | np.ndarray | None = None,
      memory: str | None = None,
      out: str | None = None,
  ) -> "GeneratedStory":
    """An empty story. ``start_image`` (a path or uint8 [H, W, 3]) makes it I2MSV: shot 0 starts from it.
    ``memory`` names the strategy that gives each shot its memory frames (:mod:`onestory_jax.memory_strategies`:
    ``onestory`` (Frame Selection), ``none`` (the no-memory baseline), ``last_frame``, ``recent``, ``uniform``,
    ``keyframes``), all under the same context-token budget; default: the one the model was trained with
    (``config.selection.strategy``). With ``out``, every change is written through to that directory,
    which must not hold a story yet (:meth:`open` continues one)."""
    memory = memory_strategies.canonical(memory or self.system.config.selection.get("strategy", "onestory"))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
      raise ValueError(f"seed must be an int, got {seed!r}")
    source = None
    image = None
    if start_image is not None:
      self.system.check_start_image()
      d = self.system.config.data
      if isinstance(start_image, (str, os.PathLike)):
        source = os.path.abspath(os.fspath(start_image))
        image = story_lib.load_image(source, d.height, d.width)
      else:
        image = np.asarray(start_image)
        if image.dtype != np.uint8 or image.shape != (d.height, d.width, 3):
          raise ValueError(
              f"start_image must be uint8 [{d.height}, {d.width}, 3] (or a path), got {image.dtype} {image.shape}"
          )
        source = "<array>"
    if out is not None and os.path.exists(os.path.join(out, MANIFEST)):
      raise ValueError(
          f"{os.path.join(out, MANIFEST)} already exists: open that story to continue it, or choose "
          "another directory"
      )
    run = GeneratedStory(self, seed=int(seed), memory=memory, start_image=image, start_image_source=source, out=out)
    if out is not None:
      run._write_state()  # pylint: disable=protected-access
    return run

  def generate(
      self,
      captions: Sequence[str],
      *,
      seed: int = 0,
      start_image: str | np.ndarray | None = None,
      memory: str | None = None,
      out: str | None = None,
      progress: bool = False,
  ) -> "GeneratedStory":
    """Generates a whole story: :meth:`story`, then :meth:`GeneratedStory.next_shot` for every caption."""
    run = self.story(seed=seed, start_image=start_image, memory=memory, out=out)
    run.plan(captions)
    run.resume(progress=progress)
    return run

  def open(self, directory: str) -> "GeneratedStory":
    """Reopens a story directory written by this API or by ``sample``: its finished shots are loaded (the memory
    bank from ``latents.npz``), and its plan continues with :meth:`GeneratedStory.resume`. Raises ValueError if
    the directory holds no story, or one made with other sampler settings."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
      raise ValueError(f"{path}: no story there (no manifest)")
    m = video_io.read_json_object(path)
    for key in ("seed", "memory", "sampler", "plan", "shots"):
      if key not in m:
        raise ValueError(f"{path}: not a story manifest (no {key!r}); was it written by an older version?")
    recorded = {**sampler.ADDED_SETTINGS, **m["sampler"]}  # a manifest older than a setting was sampled without it
    if recorded != self.settings:
      raise ValueError(
          f"{path}: the story was sampled with sampler settings {recorded} but this pipeline uses "
          f"{self.settings}; its shots would not continue the same story (pass the same "
          "--steps/--shift/--guidance/--memory_guidance)"
      )
    image = None
    if m.get("start_image") is not None:
      d = self.system.config.data
      image = story_lib.load_image(os.path.join(directory, "start_image.png"), d.height, d.width)
    run = GeneratedStory(
        self,
        seed=int(m["seed"]),
        memory=memory_strategies.canonical(m["memory"]),
        start_image=image,
        start_image_source=m.get("start_image"),
    )
    run._plan = [dict(p) for p in m["plan"]]  # pylint: disable=protected-access
    records = m["shots"]
    if records:
      frames = video_io.load_frames_npz(os.path.join(directory, "frames.npz"))
      with np.load(os.path.join(directory, "latents.npz"), allow_pickle=False) as z:
        latents = [z[f"shot_{i}"] for i in range(len(z.files))]
      for i, r in enumerate(records):
        if i >= min(len(frames), len(latents)) or _digest(latents[i]) != r.get("latents_sha"):
          logging.warning(
              "%s: shot %d's files do not match its record (the story was stopped while writing it); the story "
              "continues from shot %d",
              directory,
              i,
              i,
          )
          break
        run.shots.append(Shot(i, r["caption"], int(r["seed"]), frames[i], latents[i], r))
    run.out = directory
    return run


class GeneratedStory:
  """A story being generated: its finished :attr:`shots`, the :meth:`plan` of the shots to come, and the memory."""

  def __init__(
      self,
      pipe: OneStoryPipeline,
      *,
      seed: int,
      memory: str,
      start_image: np.ndarray | None,
      start_image_source: str | None,
      out: str | None = None,
  ):
    self.pipe = pipe
    self.seed = seed
    self.memory = memory
    self.start_image = start_image
    self.start_image_source = start_image_source
    self.out = out
    self.shots: list[Shot] = []
    self._plan: list[dict] = []  # {"caption", "seed"} of every shot, finished or not

  # ------------------------------------------------------------------ reading
  def __len__(self) -> int:
    return len(self.shots)

  @property
  def captions(self) -> list[str]:
    return [s.caption for s in self.shots]

  @property
  def frames(self) -> list[np.ndarray]:
    return [s.frames for s in self.shots]

  @property
  def pending(self) -> list[dict]:
    """The planned shots that are not generated yet ({"caption", "seed"}), in order."""
    return [dict(p) for p in self._plan[len(self.shots) :]]

  @property
  def complete(self) -> bool:
    return len(self.shots) == len(self._plan)

  @property
  def manifest(self) -> dict:
    plan = [dict(p) for p in self._plan]
    return {
        "story_digest": story_digest([p["caption"] for p in plan]),
        "seed": self.seed,
        "memory": self.memory,
        "start_image": self.start_image_source,
        "num_shots": len(plan),
        "sampler": self.pipe.settings,
        "plan": plan,
        "shots": [s.record for s in self.shots],
        "complete": self.complete,
    }

  # ------------------------------------------------------------------ generating
  def plan(self, captions: Sequence[str], seeds: Sequence[int] | None = None) -> None:
    """Appends shots to the plan (generated by :meth:`resume`); seeds default to story seed + index."""
    captions = list(captions)
    for i, c in enumerate(captions):
      if not isinstance(c, str) or not c.strip():
        raise ValueError(f"caption {i}: must be a non-empty string, got {c!r}")
    first = len(self._plan)
    seeds = list(seeds) if seeds is not None else [self.seed + first + i for i in range(len(captions))]
    self._plan += [{"caption": c.strip(), "seed": int(s)} for c, s in zip(captions, seeds)]
    self._write_state()

  def resume(self, progress: bool = False) -> list[Shot]:
    """Generates every planned shot not generated yet, in order; returns them."""
    todo = self.pending
    bar = logs.progress(len(todo), "shots", progress, unit="shot")
    done = []
    try:
      for p in todo:
        done.append(self._generate(len(self.shots), p["caption"], p["seed"], progress=progress))
        bar.update(1)
    finally:
      bar.close()
    return done

  def next_shot(self, caption: str, *, seed: int | None = None, progress: bool = False) -> Shot:
    """Generates the next shot from ``caption`` and the memory of every shot so far. Planned shots that are not
    generated yet are dropped from the plan (the story takes another turn)."""
    i = len(self.shots)
    del self._plan[i:]
    self.plan([caption], None if seed is None else [seed])
    return self._generate(i, self._plan[i]["caption"], self._plan[i]["seed"], progress=progress)

  def regenerate(
      self,
      index: int,
      *,
      caption: str | None = None,
      seed: int | None = None,
      keep_later: bool = False,
      progress: bool = False,
  ) -> Shot:
    """Generates shot ``index`` again, from the same memory of the shots before it, with a new ``caption`` and /
    or ``seed`` (each defaults to the shot's own). The shots after it are generated again from the new memory
    (their captions and seeds kept), unless ``keep_later``, which keeps them as they are."""
    n = len(self.shots)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
      raise ValueError(f"shot {index!r}: the story has shots 0..{n - 1}" if n else "the story has no shots yet")
    if caption is not None:
      if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption: must be a non-empty string, got {caption!r}")
      self._plan[index]["caption"] = caption.strip()
    if seed is not None:
      self._plan[index]["seed"] = int(seed)
    later = self.shots[index + 1 :]
    del self.shots[index:]
    self._write_state()  # the manifest stops claiming shot `index` before its files change
    p = self._plan[index]
    shot = self._generate(index, p["caption"], p["seed"], progress=progress)
    if keep_later:
      self.shots += later
      self._write_state()
    else:
      self.resume(progress=progress)
    return shot

  def truncate(self, num_shots: int) -> None:
    """Keeps the first ``num_shots`` shots (and drops the rest of the plan)."""
    if not 0 <= num_shots <= len(self.shots):
      raise ValueError(f"truncate: num_shots must be in 0..{len(self.shots)}, got {num_shots!r}")
    del self.shots[num_shots:]
    del self._plan[num_shots:]
    self._write_state()

  def _memory(self, index: int) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """Shot ``index``'s memory bank (every earlier shot's latents; nothing for ``none``) and the strategy's choice
    in it (None: Frame Selection's)."""
    bank = [s.latents for s in self.shots[:index]] if self.memory != "none" else []
    if not bank or self.memory == "onestory":
      return bank, None
    frames = np.concatenate(bank)
    frame_shot = np.repeat(np.arange(len(bank)), [b.shape[0] for b in bank])
    k = int(self.pipe.system.config.selection.k_sel)
    return bank, memory_strategies.choose(self.memory, frames, frame_shot, k)

  def _generate(self, index: int, caption: str, seed: int, progress: bool) -> Shot:
    gen = self.pipe.generator
    tok = self.pipe.system.tokenizer
    for warning in _caption_warnings(tok, caption):
      logging.warning("shot %d: %s", index, warning)
    mem, choice = self._memory(index)
    bar = logs.progress(gen.steps, f"shot {index} denoising", progress, unit="step", leave=False)
    gen.on_step = (lambda done, total: bar.update(1)) if progress else None
    start = time.perf_counter()
    try:
      lat, info = gen(caption, mem, seed, start_image=self.start_image if index == 0 else None, choice=choice)
    finally:
      gen.on_step = None
      bar.close()
    if not (np.isfinite(lat).all() and np.isfinite(info["scores"][info["indices"][info["valid"]]]).all()):
      raise ValueError(
          f"shot {index}: the sampler produced non-finite values (the checkpoint's parameters or the sampler "
          f"settings {self.pipe.settings} are bad); nothing of this shot was kept"
      )
    frames = gen.decode(lat)
    s = self.pipe.system
    kernels = [tuple(k) for k in s.config.conditioner.kernels]
    record = {
        "index": index,
        "caption": caption,
        "seed": seed,
        "memory_frames": int(sum(x.shape[0] for x in mem)),
        "context_tokens": int(info["context_tokens"]),
        "selected": sampler.selection_record(info, s.latent_shape[0], kernels),
        "seconds": round(time.perf_counter() - start, 3),
        "latents_sha": _digest(lat),
    }
    shot = Shot(index, caption, seed, frames, lat, record)
    assert len(self.shots) == index
    self.shots.append(shot)
    self._write_state()
    return shot

  # ------------------------------------------------------------------ files
  def _write_state(self) -> None:
    """Writes the story through to :attr:`out` (if any): frames and latents first, the manifest last."""
    if self.out is None:
      return
    os.makedirs(self.out, exist_ok=True)
    if self.shots:
      video_io.save_frames_npz(os.path.join(self.out, "frames.npz"), self.frames)
      buf = io.BytesIO()
      np.savez(buf, **{f"shot_{i}": s.latents for i, s in enumerate(self.shots)})
      video_io.atomic_write_bytes(os.path.join(self.out, "latents.npz"), buf.getvalue())
    if self.start_image is not None:
      image_path = os.path.join(self.out, "start_image.png")
      if not os.path.exists(image_path):
        video_io.save_png(image_path, self.start_image)
    video_io.atomic_write_json(os.path.join(self.out, MANIFEST), self.manifest)

  def save(self, directory: str | None = None) -> str:
    """Writes the story's files to ``directory`` (default: the directory it is open on): ``shot_XX.mp4``,
    ``story.mp4``, ``contact_sheet.png``, ``frames.npz``, ``latents.npz``, ``manifest.json``. Returns the
    directory."""
    directory = directory or self.out
    if directory is None:
      raise ValueError("save: give a directory (this story is not open on one)")
    if not self.shots:
      raise ValueError("save: the story has no shots yet")
    if directory != self.out:
      if os.path.exists(os.path.join(directory, MANIFEST)):
        raise ValueError(f"save: {os.path.join(directory, MANIFEST)} already exists (another story is there)")
      out, self.out = self.out, directory
      try:
        self._write_state()
      finally:
        self.out = out
    else:
      self._write_state()
    d = self.pipe.system.config
    fps = float(d.sample.get("fps", 8))
    scale = max(1, 256 // max(d.data.height, d.data.width))  # the demo's 32 x 32 frames are shown 8x larger
    for name in os.listdir(directory):  # a shorter story than before leaves no stale shot videos behind
      if name.startswith("shot_") and name.endswith(".mp4") and name[5:-4].isdigit():
        if int(name[5:-4]) >= len(self.shots):
          os.remove(os.path.join(directory, name))
    for s in self.shots:
      video_io.write_mp4(os.path.join(directory, f"shot_{s.index:02d}.mp4"), s.frames, fps=fps, scale=scale)
    video_io.write_mp4(os.path.join(directory, "story.mp4"), np.concatenate(self.frames), fps=fps, scale=scale)
    video_io.save_png(
        os.path.join(directory, "contact_sheet.png"),
        video_io.contact_sheet(self.frames, self.captions, scale=max(1, scale // 2)),
    )
    return directory


def _caption_warnings(tokenizer, caption: str) -> list[str]:
  out = []
  (dropped,) = tokenizer.dropped([caption])
  if dropped:
    out.append(
        f"the caption is {dropped} tokens longer than the text encoder takes ({tokenizer.capacity()}); its last "
        f"{dropped} tokens are dropped"
    )
  unknown = tokenizer.unknown_words(caption) if hasattr(tokenizer, "unknown_words") else []
  if unknown:
    out.append(
        f"the demo's vocabulary does not know {', '.join(repr(w) for w in unknown)}; the model reads them as <unk> "
        f"(python -m onestory_jax.data.tokenizer --vocabulary prints the words it knows)"
    )
  return out
