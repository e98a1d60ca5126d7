r"""OneStory studio: a local web app (Gradio) to write a story shot by shot and see the memory behind every shot.

  python -m onestory_jax.studio [--workdir=DIR] [--port=7860] [--root=DIR] [--steps=N] [--guidance=G] \
      [--memory_guidance=G_M]

The page (bound to 127.0.0.1) holds the plan of a story (a table of shots: caption, characters, environment, seed),
the story settings (seed, memory, guidance, steps, an optional start image), the buttons *Generate next shot*,
*Regenerate this shot* and *Continue from here*, and for the selected shot its video and the frames of memory that
Frame Selection kept for it (score and patchifier under each). See docs/studio.md.

The logic is plain Python, testable without a browser: :class:`Studio` (the loaded model, shared by every browser
tab, and one :class:`StudioSession` per tab) and :class:`StudioSession` (a story being written: its plan, its
settings and the :class:`~onestory_jax.pipeline.GeneratedStory` that holds the generated shots). Every action of a
session raises ValueError with a message for bad input and then leaves the session as it was. :func:`build_app`
lays the Gradio page over it, thinly.

Files: every session writes to its own folder under ``--root``; there ``story.json`` (the plan, in the story format
of docs/story_format.md, written after every action) and one folder per story version, ``story-01``, ``story-02``
..., each a write-through story directory of the pipeline (``manifest.json``, ``frames.npz``, ``latents.npz``,
``shot_XX.mp4``, ``story.mp4``, ``contact_sheet.png``) plus ``view/`` (the memory thumbnails). A new version starts
when the story restarts (*New story*, a loaded story file, or a *Regenerate* after the story settings changed); the
older ones stay on disk.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
from typing import Any, Sequence

import numpy as np

from onestory_jax import memory_strategies
from onestory_jax import pipeline as pipeline_lib
from onestory_jax import sampler
from onestory_jax import story as story_lib
from onestory_jax import video_io

STORY_FILE = "story.json"
MEMORY_DEFAULT = "onestory"  # Frame Selection over every earlier shot (memory_strategies)
STORY_IMAGE = "story_start.png"  # the start image that story.json names (next to it)
TABLE_HEADERS = ["shot", "status", "caption", "characters", "environment", "seed"]
THUMB_PIXELS = 128  # a memory thumbnail: 4x


@dataclasses.dataclass
class ShotEntry:
  """One shot of the plan (a row of the shot table, a shot of the story file).

  Attributes:
    caption: the caption C_i.
    characters: free text, comma-separated names (the story file keeps ids and a names table).
    environment: free text, one name.
    seed: the shot's seed, or None for the story seed + its index.
    extra: the other keys of the shot in a loaded story file (e.g. StoryWorld's "action"), written back on save.
  """

  caption: str
  characters: str = ""
  environment: str = ""
  seed: int | None = None
  extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ShotView:
  """What the page shows for one generated shot.

  Attributes:
    index: the shot's index.
    video: path of its mp4 (upscaled, nearest).
    memory: (thumbnail path, caption) of every memory frame Frame Selection kept, best first; captions read
      "shot 0 frame 2 · score 0.83 · 1x2x2" (frame: the latent frame within that shot).
    details: a Markdown table of the same choice (pixel frames, rank, score, patchifier) and the shot's numbers.
    caption: the caption it was generated from.
    seed: its seed.
  """

  index: int
  video: str
  memory: list[tuple[str, str]]
  details: str
  caption: str
  seed: int


def _settings_key(settings: dict) -> tuple:
  return (
      int(settings["steps"]),
      float(settings["shift"]),
      float(settings["guidance"]),
      float(settings["memory_guidance"]),
  )


class Studio:
  """The loaded model, shared by every session, and the sessions (one per browser tab), each with a folder under
  ``root``.

  Sampler settings vary per story: pipelines for other ``steps`` / ``guidance`` share the loaded model (``system``,
  ``params``, ``enc``) and are kept in a small cache. The model is not thread-safe: :attr:`model_lock` serializes
  every generation, whichever session asks.
  """

  MAX_PIPELINES = 4

  def __init__(self, pipe: pipeline_lib.OneStoryPipeline, root: str):
    self.pipe = pipe
    self.root = os.path.abspath(root)
    os.makedirs(self.root, exist_ok=True)
    self.model_lock = threading.Lock()
    self._pipes = {_settings_key(pipe.settings): pipe}
    self._sessions: dict[str, StudioSession] = {}
    self._lock = threading.Lock()

  @property
  def defaults(self) -> dict:
    """The sampler settings a new story starts with (``--steps`` / ``--guidance``, else the checkpoint's)."""
    return dict(self.pipe.settings)

  def pipeline(self, steps: int, guidance: float) -> pipeline_lib.OneStoryPipeline:
    """The pipeline for these settings (``shift`` and ``memory_guidance`` stay the loaded pipeline's), built on the
    loaded model."""
    sampler.check_settings(steps=steps, guidance=guidance)
    key = _settings_key({**self.pipe.settings, "steps": steps, "guidance": guidance})
    with self._lock:
      pipe = self._pipes.get(key)
      if pipe is None:
        pipe = self.pipe.with_settings(steps=key[0], guidance=key[2])
        base = _settings_key(self.pipe.settings)
        while len(self._pipes) >= self.MAX_PIPELINES:  # oldest first; the loaded one stays
          del self._pipes[next(k for k in self._pipes if k != base)]
      else:
        del self._pipes[key]
      self._pipes[key] = pipe
      return pipe

  def session(self, key: str) -> "StudioSession":
    """The session of ``key`` (a browser tab's session hash), made on first use with a new folder under root."""
    with self._lock:
      s = self._sessions.get(key)
      if s is None:
        safe = re.sub(r"[^A-Za-z0-9]", "", str(key))[:12] or "session"
        folder = tempfile.mkdtemp(prefix=f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}-", dir=self.root)
        s = self._sessions[key] = StudioSession(self, folder)
      return s

  def sessions(self) -> list["StudioSession"]:
    """The sessions in memory (one per open tab)."""
    with self._lock:
      return list(self._sessions.values())

  def forget(self, key: str) -> None:
    """Drops a session from memory (its tab closed); its folder stays."""
    with self._lock:
      self._sessions.pop(key, None)


class StudioSession:
  """A story being written in one browser tab: the plan (:attr:`entries`), the story settings, the generated story
  (:attr:`run`) and its folder. Every action raises ValueError with a message for bad input and leaves the session
  as it was; a generation that fails midway keeps the shots finished before it."""

  def __init__(self, studio: Studio, folder: str):
    self.studio = studio
    self.folder = folder
    self.lock = threading.RLock()
    self.entries: list[ShotEntry] = []
    d = studio.defaults
    self.seed = 0
    self.memory = MEMORY_DEFAULT
    self.steps = int(d["steps"])
    self.guidance = float(d["guidance"])
    self.start_image: np.ndarray | None = None
    self.start_image_name: str | None = None
    self.run: pipeline_lib.GeneratedStory | None = None
    self.selected: int | None = None
    self._run_params: tuple | None = None
    self._version = 0
    self._raw: dict = {}  # top-level keys of a loaded story file that the studio does not edit (kept on save)
    self._memory_views: dict[tuple[int, str], list[tuple[str, str]]] = {}
    data = studio.pipe.system.config.data
    self.height, self.width = int(data.height), int(data.width)

  # ------------------------------------------------------------------ reading
  @property
  def shots(self) -> list[pipeline_lib.Shot]:
    return list(self.run.shots) if self.run is not None else []

  @property
  def version_dir(self) -> str | None:
    """The story directory of the current version (None before the first shot)."""
    return self.run.out if self.run is not None else None

  @property
  def story_path(self) -> str:
    return os.path.join(self.folder, STORY_FILE)

  def default_seed(self, index: int) -> int:
    return self.seed + index

  def entry_seed(self, index: int) -> int:
    e = self.entries[index]
    return self.default_seed(index) if e.seed is None else e.seed

  def status(self, index: int) -> str:
    """ "generated", "edited" (its caption or seed in the plan differs from the generated shot: regenerate to
    apply) or "planned"."""
    shots = self.shots
    if index >= len(shots):
      return "planned"
    e, s = self.entries[index], shots[index]
    return "generated" if e.caption == s.caption and (e.seed is None or e.seed == s.seed) else "edited"

  def table(self) -> list[list]:
    """The shot table: [shot, status, caption, characters, environment, seed ('' = story seed + shot)]."""
    return [
        [i, self.status(i), e.caption, e.characters, e.environment, "" if e.seed is None else str(e.seed)]
        for i, e in enumerate(self.entries)
    ]

  def shot_choices(self) -> list[tuple[str, int]]:
    out = []
    for s in self.shots:
      text = s.caption if len(s.caption) <= 48 else s.caption[:47] + "…"
      out.append((f"{s.index}: {text}", s.index))
    return out

  def shot_view(self, index: int | None = None) -> ShotView | None:
    """The selected shot (or ``index``) as the page shows it; None when there is no such shot."""
    index = self.selected if index is None else index
    shots = self.shots
    if index is None or not 0 <= index < len(shots):
      return None
    s = shots[index]
    r = s.record
    f = self.studio.pipe.system.latent_shape[0]
    t = self.studio.pipe.system.frames_per_shot
    lines = [
        f"**Shot {s.index}** · seed {s.seed} · {r.get('seconds', 0):.2f} s · memory frames given: "
        f"{r.get('memory_frames', 0)} · context tokens: {r.get('context_tokens', 0)}",
        "",
    ]
    if r["selected"]:
      lines += [
          "| rank | shot | latent frame | pixel frames | score | patchifier |",
          "|---|---|---|---|---|---|",
      ]
      for sel in r["selected"]:
        a, b = _pixel_frames(sel["latent_frame_in_shot"], f, t)
        lines.append(
            f"| {sel['rank']} | {sel['shot']} | {sel['latent_frame_in_shot']} | {a}–{b} | {sel['score']:.3f} | "
            f"{_kernel_text(sel['patchifier'])} |"
        )
    else:
      lines.append("No memory: " + ("the first shot." if index == 0 else f"memory = {self.run.memory!r}."))
    return ShotView(
        index=s.index,
        video=os.path.join(self.version_dir, f"shot_{s.index:02d}.mp4"),
        memory=list(self._memory_views.get((s.index, r["latents_sha"]), [])),
        details="\n".join(lines),
        caption=s.caption,
        seed=s.seed,
    )

  def files(self) -> list[str]:
    """The files to download: the story file, and the current version's story.mp4, contact sheet and manifest."""
    out = [self.story_path] if os.path.exists(self.story_path) else []
    if self.version_dir and self.shots:
      for name in ("story.mp4", "contact_sheet.png", pipeline_lib.MANIFEST):
        p = os.path.join(self.version_dir, name)
        if os.path.exists(p):
          out.append(p)
    return out

  def story_video(self) -> str | None:
    if not self.shots:
      return None
    p = os.path.join(self.version_dir, "story.mp4")
    return p if os.path.exists(p) else None

  def start_image_view(self) -> np.ndarray | None:
    if self.start_image is None:
      return None
    return video_io.upscale(self.start_image[None], _scale(self.height, self.width, THUMB_PIXELS))[0]

  # ------------------------------------------------------------------ editing the plan and the settings
  def set_settings(
      self,
      *,
      seed: Any = None,
      memory: str | None = None,
      steps: Any = None,
      guidance: Any = None,
  ) -> None:
    """Sets the story settings (None: unchanged). They apply to a new story; a story that has shots keeps its own
    until it is regenerated (:meth:`regenerate` re-samples it with the new ones)."""
    with self.lock:
      new_seed = self.seed if seed is None else _as_int(seed, "the story seed")
      if memory is not None:
        memory = memory_strategies.canonical(memory)  # ValueError naming the strategies
      new_steps = self.steps if steps is None else _as_int(steps, "steps")
      new_guidance = self.guidance if guidance is None else _as_float(guidance, "guidance")
      if new_steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
      sampler.check_settings(steps=new_steps, guidance=new_guidance)
      self.seed, self.steps, self.guidance = new_seed, new_steps, new_guidance
      if memory is not None:
        self.memory = memory

  def set_start_image(self, path: str | None) -> str:
    """Loads the start image (I2MSV: the first frame of shot 0), or clears it with None. It applies to a new story
    (or a regenerated shot 0). Raises ValueError for a file that is not a readable image."""
    with self.lock:
      if path is None:
        self.start_image, self.start_image_name = None, None
        return "Start image removed."
      try:
        image = story_lib.load_image(path, self.height, self.width)
      except FileNotFoundError as e:
        raise ValueError(str(e)) from e
      except ValueError as e:
        raise ValueError(f"{os.path.basename(path)} is not an image that can be read ({e})") from e
      self.start_image, self.start_image_name = image, os.path.basename(path)
      note = "" if not self.shots else " It applies when shot 0 is regenerated (the story is then re-sampled)."
      return f"Start image {self.start_image_name} loaded ({self.width}x{self.height} as the model sees it).{note}"

  def add_shot(self, caption: str, characters: str = "", environment: str = "", seed: Any = None) -> str:
    """Appends a shot to the plan. Raises ValueError for an empty caption."""
    with self.lock:
      notes = self._add(caption, characters, environment, seed)
      return " ".join([f"Shot {len(self.entries) - 1} added to the plan."] + notes)

  def _add(self, caption: Any, characters: Any = "", environment: Any = "", seed: Any = None) -> list[str]:
    entry = ShotEntry(
        caption=_caption(caption, "the next shot"),
        characters=_text(characters),
        environment=_text(environment),
        seed=None if seed in (None, "") else _as_int(seed, "the shot's seed"),
    )
    self.entries.append(entry)
    self.write_story_file()
    return self._caption_notes(entry.caption)

  def set_plan(self, rows: Sequence[Sequence[Any]]) -> str:
    """Replaces the plan with the shot table's rows ([shot, status, caption, characters, environment, seed]; the
    first two are ignored). Rows with nothing in them are dropped. Generated shots stay; one whose caption or seed
    changed shows as "edited" until it is regenerated. Raises ValueError (and keeps the plan) for a row without a
    caption, a seed that is not an int, or fewer rows than generated shots."""
    with self.lock:
      entries = []
      for n, row in enumerate(rows or []):
        cells = [("" if c is None or (isinstance(c, float) and math.isnan(c)) else c) for c in list(row)]
        cells += [""] * (len(TABLE_HEADERS) - len(cells))
        _, _, caption, characters, environment, seed = cells[: len(TABLE_HEADERS)]
        if not any(str(c).strip() for c in (caption, characters, environment, seed)):
          continue
        i = len(entries)
        old = self.entries[i] if i < len(self.entries) else ShotEntry("")
        entries.append(
            ShotEntry(
                caption=_caption(str(caption), f"shot {i} (table row {n + 1})"),
                characters=_text(characters),
                environment=_text(environment),
                seed=None if str(seed).strip() == "" else _as_int(seed, f"shot {i}'s seed"),
                extra=dict(old.extra),
            )
        )
      n = len(self.shots)
      if len(entries) < n:
        raise ValueError(
            f"the table has {len(entries)} shots but {n} are generated: to drop generated shots, select the last one "
            f"to keep and press Continue from here"
        )
      self.entries = entries
      self.write_story_file()
      return "Plan updated."

  def new_story(self) -> str:
    """Starts over: an empty plan; the current story stays on disk (its version folder)."""
    with self.lock:
      old = self.version_dir
      self.entries, self.run, self._run_params, self.selected, self._raw = [], None, None, None, {}
      self.write_story_file()
      return "New story." + (f" The previous one stays in {old}." if old else "")

  # ------------------------------------------------------------------ story files
  def load_story(self, path: str) -> str:
    """Loads a story file (docs/story_format.md) as the plan; the story restarts (the current one stays on disk).
    A start image that the file names is loaded when it is found next to the file. Raises ValueError (and keeps
    everything) for a file that does not parse."""
    with self.lock:
      where = os.path.basename(path)
      try:
        with open(path, "rb") as f:
          text = f.read().decode("utf-8-sig")
        obj = json.loads(text, parse_constant=_reject_constant)
      except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{where}: not a story file ({type(e).__name__}: {e})") from e
      if not isinstance(obj, dict):
        raise ValueError(f"{where}: the top level must be a JSON object with 'shots', got {type(obj).__name__}")
      image_name = obj.get("start_image")
      parsed = story_lib.parse_story({k: v for k, v in obj.items() if k != "start_image"}, where=where)
      notes = []
      image = None
      if image_name is not None:
        if not isinstance(image_name, str) or not image_name.strip():
          raise ValueError(f"{where}: start_image must be a non-empty string path, got {image_name!r}")
        p = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(image_name))
        try:
          image = story_lib.load_image(p, self.height, self.width)
        except (FileNotFoundError, ValueError):
          notes.append(f"Its start image {image_name!r} is not next to the file: upload it as the start image.")
      studio = obj.get("studio") if isinstance(obj.get("studio"), dict) else {}
      settings = {k: studio[k] for k in ("memory", "steps", "guidance") if k in studio}
      try:
        self.set_settings(seed=parsed.seed, **settings)
      except ValueError as e:
        self.set_settings(seed=parsed.seed)
        notes.append(f"Its studio settings were not used ({e}).")
      characters = _names(obj.get("characters"))
      environments = _names(obj.get("environments"))
      entries = []
      for spec in parsed.shots:
        extra = dict(spec.extra)
        seed = extra.pop("seed", None)
        entries.append(
            ShotEntry(
                caption=spec.caption,
                characters=", ".join(characters.get(c, f"#{c}") for c in (spec.characters or ())),
                environment=""
                if spec.environment is None
                else environments.get(spec.environment, f"#{spec.environment}"),
                seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                extra=extra,
            )
        )
      self.new_story()
      self.entries = entries
      self._raw = {k: v for k, v in obj.items() if k not in ("shots", "seed", "start_image", "studio")}
      if image is not None:
        self.start_image, self.start_image_name = image, image_name
      elif image_name is None:  # a text-only story (T2MSV); one whose image was not found keeps the page's
        self.start_image, self.start_image_name = None, None
      self.write_story_file()
      for e in entries:
        notes += self._caption_notes(e.caption)
      return " ".join([f"Loaded {where}: {len(entries)} shots planned."] + notes)

  def story_object(self) -> dict:
    """The plan as a story file object (docs/story_format.md): shots with caption, character ids and environment
    id, the names of both in top-level tables, the seed, the start image (``story_start.png`` next to the file),
    and the studio's own settings under "studio"."""
    obj = {k: v for k, v in self._raw.items() if k not in ("characters", "environments")}
    obj["seed"] = self.seed
    if self.start_image is not None:
      obj["start_image"] = STORY_IMAGE
    obj["studio"] = {"memory": self.memory, "steps": self.steps, "guidance": self.guidance}
    char_table = _Table(self._raw.get("characters"))
    env_table = _Table(self._raw.get("environments"))
    shots = []
    for e in self.entries:
      shot = {"caption": e.caption}
      names = [n.strip() for n in e.characters.split(",") if n.strip()]
      if names:
        shot["characters"] = [char_table.id(n) for n in names]
      if e.environment.strip():
        shot["environment"] = env_table.id(e.environment.strip())
      if e.seed is not None:
        shot["seed"] = e.seed
      shot.update({k: v for k, v in e.extra.items() if k not in shot})
      shots.append(shot)
    if char_table.entries:
      obj["characters"] = char_table.entries
    if env_table.entries:
      obj["environments"] = env_table.entries
    obj["shots"] = shots
    return obj

  def write_story_file(self) -> str:
    """Writes story.json (and its start image) to the session folder; returns its path. An empty plan writes
    nothing (a story file needs a shot)."""
    os.makedirs(self.folder, exist_ok=True)
    if self.start_image is not None:
      video_io.save_png(os.path.join(self.folder, STORY_IMAGE), self.start_image)
    if self.entries:
      video_io.atomic_write_json(self.story_path, self.story_object())
    return self.story_path

  def save(self) -> list[str]:
    """Writes the story file and the current version's videos, contact sheet and manifest; returns
    :meth:`files`."""
    with self.lock:
      self.write_story_file()
      if self.shots:
        self.run.save()
      return self.files()

  # ------------------------------------------------------------------ generating
  def generate_next(self, caption: str = "", characters: str = "", environment: str = "") -> str:
    """Generates the first planned shot that is not generated yet. A ``caption`` is first added to the end of the
    plan. Raises ValueError when there is nothing to generate (no caption and nothing planned)."""
    with self.lock:
      notes = []
      if any(_text(x) for x in (caption, characters, environment)):
        notes += self._add(caption, characters, environment)
      n = len(self.shots)
      if n >= len(self.entries):
        raise ValueError("the caption of the next shot is empty: type it, then press Generate next shot")
      notes += self._check_run_settings()
      start = time.perf_counter()
      self._generate(range(n, n + 1))
      self.selected = n
      return " ".join([f"Generated shot {n} in {time.perf_counter() - start:.1f} s."] + notes)

  def regenerate(self, index: Any, caption: str | None = None, seed: Any = None, keep_later: bool = False) -> str:
    """Generates shot ``index`` again from the memory of the shots before it, with ``caption`` / ``seed`` (None:
    the plan's). The shots after it are generated again from the new memory (with the plan's captions), unless
    ``keep_later``. If the story settings (seed, memory, steps, guidance, start image) changed since the story
    started, the whole story is re-sampled with the new ones, in a new version folder (a story has one set of
    settings), and ``keep_later`` does not apply."""
    with self.lock:
      n = len(self.shots)
      k = _as_int(index, "the shot to regenerate") if index not in (None, "") else None
      if k is None or not 0 <= k < n:
        raise ValueError(
            f"select a generated shot to regenerate (the story has shots 0..{n - 1})"
            if n
            else "the story has no shots yet: generate one first"
        )
      new_caption = self.entries[k].caption if caption is None else _caption(caption, f"shot {k}")
      new_seed = self.entries[k].seed if seed in (None, "") else _as_int(seed, f"shot {k}'s seed")
      if new_seed == self.default_seed(k):
        new_seed = None
      self.entries[k].caption, self.entries[k].seed = new_caption, new_seed
      self.write_story_file()
      start = time.perf_counter()
      self.selected = k
      notes = self._caption_notes(new_caption)
      if self._params() != self._run_params:
        self._new_run()
        self._generate(range(n))
        what = f"The story settings changed: re-sampled shots 0..{n - 1} into {os.path.basename(self.version_dir)}"
        if keep_later and k < n - 1:
          what += " (later shots cannot be kept across settings)"
        return " ".join([f"{what} in {time.perf_counter() - start:.1f} s."] + notes)
      if keep_later:
        try:
          self._generate_locked(
              lambda: self.run.regenerate(k, caption=new_caption, seed=self.entry_seed(k), keep_later=True)
          )
          self._memory_thumbnails()
        finally:
          self.save()
        return " ".join([f"Regenerated shot {k} in {time.perf_counter() - start:.1f} s (later shots kept)."] + notes)
      self.run.truncate(k)
      self._generate(range(k, n))
      later = f" and shots {k + 1}..{n - 1}" if k < n - 1 else ""
      return " ".join([f"Regenerated shot {k}{later} in {time.perf_counter() - start:.1f} s."] + notes)

  def regenerate_with_fields(self, index: Any, caption: str | None, seed: Any, keep_later: bool = False) -> str:
    """:meth:`regenerate` from the page's Caption and Seed fields, which show the selected shot's own: a field
    changed from it wins, an unchanged one leaves the plan's (so an edited row of the shot table applies)."""
    with self.lock:
      shots = self.shots
      k = _as_int(index, "the shot to regenerate") if index not in (None, "") else None
      if k is not None and 0 <= k < len(shots):
        if caption is not None and caption.strip() == shots[k].caption:
          caption = None
        if seed not in (None, "") and _is_number(seed) and float(seed) == shots[k].seed:
          seed = None
      return self.regenerate(index, caption, seed, keep_later)

  def continue_from(self, index: Any) -> str:
    """Drops the shots after ``index`` and generates every planned shot after it (the plan stays). With nothing
    planned after it, the next shot is the user's to type."""
    with self.lock:
      n = len(self.shots)
      k = _as_int(index, "the shot to continue from") if index not in (None, "") else None
      if k is None or not 0 <= k < n:
        raise ValueError(
            f"select the shot to continue from (the story has shots 0..{n - 1})"
            if n
            else "the story has no shots yet: generate one first"
        )
      notes = self._check_run_settings()
      start = time.perf_counter()
      self.run.truncate(k + 1)
      todo = range(k + 1, len(self.entries))
      self._generate(todo)
      self.selected = len(self.shots) - 1
      if not todo:
        self.save()
        dropped = f"Dropped shots {k + 1}..{n - 1}; " if k < n - 1 else ""
        return dropped + "nothing more is planned: type the next shot's caption and press Generate next shot."
      return " ".join(
          [f"Continued from shot {k}: generated shots {todo[0]}..{todo[-1]} in {time.perf_counter() - start:.1f} s."]
          + notes
      )

  # ------------------------------------------------------------------ internals
  def _params(self) -> tuple:
    image = None if self.start_image is None else hashlib.sha256(self.start_image.tobytes()).hexdigest()[:16]
    return (self.seed, self.memory, self.steps, self.guidance, image)

  def _check_run_settings(self) -> list[str]:
    """Notes that the story keeps its settings when the page's differ (Generate / Continue keep the story's)."""
    if self.run is None or not self.run.shots or self._params() == self._run_params:
      return []
    seed, memory, steps, guidance, _ = self._run_params
    return [
        f"Note: this story keeps the settings it started with (seed {seed}, memory {memory}, steps {steps}, "
        f"guidance {guidance:g}, its start image); Regenerate re-samples it with the new ones."
    ]

  def _new_run(self) -> None:
    """Starts a story version in a new folder, with the current settings."""
    while True:
      self._version += 1
      out = os.path.join(self.folder, f"story-{self._version:02d}")
      if not os.path.exists(out):
        break
    pipe = self.studio.pipeline(self.steps, self.guidance)
    self.run = pipe.story(seed=self.seed, start_image=self.start_image, memory=self.memory, out=out)
    self._run_params = self._params()

  def _generate_locked(self, fn):
    with self.studio.model_lock:
      return fn()

  def _generate(self, indices: Sequence[int]) -> None:
    """Generates the planned shots ``indices`` (consecutive, from len(shots)) one after the other; what is
    finished stays if one fails. Then writes the videos and the memory thumbnails."""
    try:
      for i in indices:
        if self.run is None or (not self.run.shots and self._params() != self._run_params):
          self._new_run()  # the first shot of a story (or of one whose first try failed, with new settings)
        assert i == len(self.run.shots), (i, len(self.run.shots))
        e = self.entries[i]
        self._generate_locked(lambda e=e, i=i: self.run.next_shot(e.caption, seed=self.entry_seed(i)))
        self._memory_thumbnails()
    finally:
      self.save()

  def _memory_thumbnails(self) -> None:
    """Writes the thumbnails of the memory that Frame Selection kept for each shot not seen yet, from the frames
    of the shots before it as they are now (so a shot kept by Regenerate's keep-later keeps its own)."""
    s = self.studio.pipe.system
    f, t = s.latent_shape[0], s.frames_per_shot
    scale = _scale(self.height, self.width, THUMB_PIXELS)
    view = os.path.join(self.version_dir, "view")
    for shot in self.run.shots:
      key = (shot.index, shot.record["latents_sha"])
      if key in self._memory_views:
        continue
      items = []
      for sel in shot.record["selected"]:
        j = sel["latent_frame_in_shot"]
        frames = self.run.shots[sel["shot"]].frames
        a, b = _pixel_frames(j, f, t)
        image = video_io.upscale(frames[(a + b) // 2][None], scale)[0]
        path = os.path.join(view, f"memory_{shot.index:02d}_{key[1]}_{sel['rank']:02d}.png")
        os.makedirs(view, exist_ok=True)
        video_io.save_png(path, image)
        items.append(
            (path, f"shot {sel['shot']} frame {j} · score {sel['score']:.2f} · {_kernel_text(sel['patchifier'])}")
        )
      self._memory_views[key] = items

  def _caption_notes(self, caption: str) -> list[str]:
    tok = self.studio.pipe.system.tokenizer
    notes = []
    if hasattr(tok, "unknown_words"):
      unknown = tok.unknown_words(caption)
      if unknown:
        notes.append(
            f"Note: the model's vocabulary does not know {', '.join(repr(w) for w in unknown)} (read as <unk>)."
        )
    (dropped,) = tok.dropped([caption])
    if dropped:
      notes.append(f"Note: the caption is {dropped} tokens too long; its last {dropped} tokens are dropped.")
    return notes


class _Table:
  """A story file's names table ("characters" / "environments": [{"id", "name", ...}]): maps the names typed in
  the page to ids, keeping the entries of a loaded file and adding {"id", "name"} for new names."""

  def __init__(self, entries: Any):
    self.entries = [dict(e) for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    self._by_name = {v: k for k, v in _names(self.entries).items()}

  def id(self, name: str) -> int:
    if name in self._by_name:
      return self._by_name[name]
    m = re.fullmatch(r"#?(\d+)", name)
    if m:
      return int(m.group(1))
    ids = [e["id"] for e in self.entries if _is_int(e.get("id"))] + list(self._by_name.values())
    new = max(ids, default=-1) + 1
    self.entries.append({"id": new, "name": name})
    self._by_name[name] = new
    return new


def _names(entries: Any) -> dict[int, str]:
  """id -> name of a names table: its "name", else StoryWorld's "color_name kind/layout"; names that two ids share
  get "#id"."""
  out = {}
  if not isinstance(entries, list):
    return out
  for e in entries:
    if not isinstance(e, dict) or not _is_int(e.get("id")):
      continue
    name = e.get("name")
    if not isinstance(name, str) or not name.strip():
      name = " ".join(str(e[k]) for k in ("color_name", "kind", "layout") if isinstance(e.get(k), str))
    out[e["id"]] = name.strip() or f"#{e['id']}"
  counts = {}
  for n in out.values():
    counts[n] = counts.get(n, 0) + 1
  return {i: (n if counts[n] == 1 else f"{n} #{i}") for i, n in out.items()}


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
  try:
    return math.isfinite(float(x))
  except (TypeError, ValueError):
    return False


def _reject_constant(constant: str):
  raise ValueError(f"{constant} is not JSON")


def _caption(text: Any, what: str) -> str:
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"the caption of {what} is empty")
  return text.strip()


def _text(value: Any) -> str:
  return "" if value is None else str(value).strip()


def _as_int(value: Any, what: str) -> int:
  try:
    f = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{what} must be an integer, got {value!r}") from None
  if isinstance(value, bool) or not math.isfinite(f) or not f.is_integer():
    raise ValueError(f"{what} must be an integer, got {value!r}")
  return int(f)


def _as_float(value: Any, what: str) -> float:
  try:
    f = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{what} must be a number, got {value!r}") from None
  if not math.isfinite(f):
    raise ValueError(f"{what} must be a finite number, got {value!r}")
  return f


def _scale(height: int, width: int, pixels: int) -> int:
  return max(1, pixels // max(height, width))


def _pixel_frames(latent_frame: int, latent_frames: int, pixel_frames: int) -> tuple[int, int]:
  """The pixel frames [first, last] that latent frame ``latent_frame`` of a shot stands for (proportionally)."""
  a = latent_frame * pixel_frames // latent_frames
  b = max(a, (latent_frame + 1) * pixel_frames // latent_frames - 1)
  return a, b


def _kernel_text(kernel: Sequence[int] | None) -> str:
  return "—" if kernel is None else "x".join(str(k) for k in kernel)


# ---------------------------------------------------------------------------- the page (Gradio), thinly
_CSS = """
#status {min-height: 1.5em}
#status .error {color: #c0392b}
#memory-gallery .caption-label {white-space: normal; max-width: 100%; left: 0; font-size: 11px; opacity: 0.9}
"""

_HELP = """Write captions with the words the model knows (the demo: StoryWorld's words, e.g. *a red round character
moves left in a blue place, wide view.*). **Generate next shot** adds the caption below (if any) to the plan and
generates the first planned shot not generated yet; **Regenerate this shot** makes the selected shot again (its
caption, seed) and the shots after it; **Continue from here** drops the shots after the selected one and generates
the planned ones."""


def build_app(studio: Studio):
  """The Gradio page over ``studio`` (gr.Blocks, queued: one generation at a time). Returns the Blocks."""
  import gradio as gr  # pylint: disable=g-import-not-at-top  (the 'studio' extra; the logic above needs no gradio)

  d = studio.defaults

  def sess(request: gr.Request | None) -> StudioSession:
    return studio.session(getattr(request, "session_hash", None) or "local")

  with gr.Blocks(title="OneStory studio", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
    gr.Markdown(
        f"## OneStory studio\nModel: `{studio.pipe.source or 'the shipped demo checkpoint'}` · files: "
        f"`{studio.root}`\n\n{_HELP}"
    )
    status = gr.Markdown(elem_id="status")
    with gr.Row(equal_height=False):
      with gr.Column(scale=5):
        with gr.Accordion("Story settings", open=True):
          with gr.Row():
            seed_in = gr.Number(label="Story seed", value=0, precision=0, elem_id="story-seed", min_width=90)
            memory_in = gr.Dropdown(
                list(pipeline_lib.MEMORY_MODES),
                value=MEMORY_DEFAULT,
                label="Memory",
                elem_id="memory-mode",
                min_width=90,
            )
            guidance_in = gr.Number(label="Guidance", value=d["guidance"], elem_id="guidance", min_width=90)
            steps_in = gr.Number(label="Steps", value=d["steps"], precision=0, minimum=1, elem_id="steps", min_width=90)
          with gr.Row():
            start_file = gr.File(
                label="Start image (optional: the first frame of shot 0)",
                type="filepath",
                height=160,
                elem_id="start-image",
            )
            start_view = gr.Image(label="Start image, as the model sees it", interactive=False, height=160)
        table = gr.Dataframe(
            value=[],
            headers=TABLE_HEADERS,
            datatype=["number", "str", "str", "str", "str", "str"],
            type="array",
            interactive=True,
            static_columns=[0, 1],
            label="Shots (edit captions, characters, environment, seed: blank = story seed + shot)",
            wrap=True,
            column_widths=["9%", "17%", "40%", "13%", "12%", "9%"],
            elem_id="shots",
        )
        with gr.Row():
          caption_in = gr.Textbox(label="Next shot caption", scale=3, elem_id="next-caption")
          chars_in = gr.Textbox(label="Characters (comma-separated)", scale=1, elem_id="next-characters")
          env_in = gr.Textbox(label="Environment", scale=1, elem_id="next-environment")
        with gr.Row():
          add_btn = gr.Button("Add to plan")
          gen_btn = gr.Button("Generate next shot", variant="primary")
        with gr.Accordion("Story files", open=True):
          with gr.Row():
            story_in = gr.File(label="Load a story file (JSON)", type="filepath", height=120, elem_id="story-file")
            with gr.Column():
              save_btn = gr.Button("Save story file")
              new_btn = gr.Button("New story")
          downloads = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
      with gr.Column(scale=5):
        shot_pick = gr.Dropdown(label="Shot", choices=[], value=None, interactive=True, elem_id="shot-pick")
        with gr.Row():
          video = gr.Video(label="Shot", interactive=False, autoplay=True, loop=True, height=280, elem_id="shot-video")
          story_video = gr.Video(
              label="Story so far", interactive=False, autoplay=True, loop=True, height=280, elem_id="story-video"
          )
        gallery = gr.Gallery(
            label="Memory: the frames chosen for this shot (score, patchifier)",
            columns=4,
            height=210,
            object_fit="contain",
            elem_id="memory-gallery",
        )
        details = gr.Markdown(elem_id="details")
        with gr.Row():
          regen_caption = gr.Textbox(label="Caption", scale=3, elem_id="regen-caption")
          regen_seed = gr.Number(label="Seed", precision=0, scale=1, elem_id="regen-seed")
          keep_later = gr.Checkbox(label="Keep later shots", value=False, scale=1)
        with gr.Row():
          regen_btn = gr.Button("Regenerate this shot", variant="primary")
          cont_btn = gr.Button("Continue from here")

    shot_outputs = [shot_pick, video, gallery, details, regen_caption, regen_seed, story_video, downloads]
    all_outputs = [status, seed_in, memory_in, guidance_in, steps_in, start_view, table, caption_in, chars_in, env_in]
    all_outputs += shot_outputs
    settings_inputs = [seed_in, memory_in, steps_in, guidance_in, table]

    def message(text: str | None, error: bool) -> str:
      if not text:
        return ""
      return f'<span class="error">⚠ {text}</span>' if error else text

    def run_action(session: StudioSession, fn) -> tuple[str, bool]:
      try:
        return fn(), False
      except (ValueError, OSError) as e:
        gr.Warning(str(e))
        return str(e), True

    def shot_values(session: StudioSession) -> list:
      with session.lock:
        v = session.shot_view()
        return [
            gr.update(choices=session.shot_choices(), value=None if v is None else v.index),
            None if v is None else v.video,
            [] if v is None else v.memory,
            "" if v is None else v.details,
            "" if v is None else v.caption,
            None if v is None else v.seed,
            session.story_video(),
            session.files() or None,
        ]

    def render(session: StudioSession, text: str | None, error: bool, clear_next: bool = False) -> list:
      with session.lock:
        keep = gr.update()
        return [
            message(text, error),
            session.seed,
            session.memory,
            session.guidance,
            session.steps,
            session.start_image_view(),
            session.table(),
            "" if clear_next and not error else keep,
            "" if clear_next and not error else keep,
            "" if clear_next and not error else keep,
        ] + shot_values(session)

    def apply(session: StudioSession, seed, memory, steps, guidance, rows) -> None:
      session.set_settings(seed=seed, memory=memory, steps=steps, guidance=guidance)
      session.set_plan(rows)

    def on_generate(seed, memory, steps, guidance, rows, caption, chars, env, request: gr.Request):
      s = sess(request)
      text, error = run_action(
          s, lambda: (apply(s, seed, memory, steps, guidance, rows), s.generate_next(caption, chars, env))[1]
      )
      return render(s, text, error, clear_next=True)

    def on_add(seed, memory, steps, guidance, rows, caption, chars, env, request: gr.Request):
      s = sess(request)
      text, error = run_action(
          s, lambda: (apply(s, seed, memory, steps, guidance, rows), s.add_shot(caption, chars, env))[1]
      )
      return render(s, text, error, clear_next=True)

    def on_regenerate(seed, memory, steps, guidance, rows, pick, caption, shot_seed, keep, request: gr.Request):
      s = sess(request)

      def regenerate():
        apply(s, seed, memory, steps, guidance, rows)
        return s.regenerate_with_fields(pick, caption, shot_seed, bool(keep))

      text, error = run_action(s, regenerate)
      return render(s, text, error)

    def on_continue(seed, memory, steps, guidance, rows, pick, request: gr.Request):
      s = sess(request)
      text, error = run_action(s, lambda: (apply(s, seed, memory, steps, guidance, rows), s.continue_from(pick))[1])
      return render(s, text, error)

    def on_save(seed, memory, steps, guidance, rows, request: gr.Request):
      s = sess(request)

      def save():
        apply(s, seed, memory, steps, guidance, rows)
        if not s.entries:
          raise ValueError("the plan is empty: add a shot first (a story file needs one)")
        s.save()
        return f"Saved {s.story_path}" + (f" and the story in {s.version_dir}." if s.shots else ".")

      text, error = run_action(s, save)
      return render(s, text, error)

    def on_new(request: gr.Request):
      s = sess(request)
      text, error = run_action(s, s.new_story)
      return render(s, text, error)

    def on_load(path, request: gr.Request):
      s = sess(request)
      text, error = run_action(s, lambda: s.load_story(path))
      return render(s, text, error)

    def on_start_image(path, request: gr.Request):
      s = sess(request)
      text, error = run_action(s, lambda: s.set_start_image(path))
      return message(text, error), s.start_image_view()

    def on_start_clear(request: gr.Request):
      return on_start_image(None, request)

    def on_table_edit(rows, request: gr.Request):
      s = sess(request)
      text, error = run_action(s, lambda: s.set_plan(rows))
      return message(text, error)

    def on_pick(pick, request: gr.Request):
      s = sess(request)
      with s.lock:
        if pick is not None and 0 <= int(pick) < len(s.shots):
          s.selected = int(pick)
      return shot_values(s)

    def on_table_select(evt: gr.SelectData, request: gr.Request):
      s = sess(request)
      with s.lock:
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else None
        if row is not None and 0 <= row < len(s.shots):
          s.selected = int(row)
      return shot_values(s)

    def on_unload(request: gr.Request):
      studio.forget(getattr(request, "session_hash", None) or "local")

    model = dict(concurrency_id="model", concurrency_limit=1)
    gen_btn.click(
        on_generate, settings_inputs + [caption_in, chars_in, env_in], all_outputs, **model, api_name="generate"
    )
    caption_in.submit(on_generate, settings_inputs + [caption_in, chars_in, env_in], all_outputs, **model)
    add_btn.click(on_add, settings_inputs + [caption_in, chars_in, env_in], all_outputs, api_name="add")
    regen_btn.click(
        on_regenerate,
        settings_inputs + [shot_pick, regen_caption, regen_seed, keep_later],
        all_outputs,
        **model,
        api_name="regenerate",
    )
    cont_btn.click(on_continue, settings_inputs + [shot_pick], all_outputs, **model, api_name="continue")
    save_btn.click(on_save, settings_inputs, all_outputs, api_name="save")
    new_btn.click(on_new, None, all_outputs, api_name="new")
    story_in.upload(on_load, story_in, all_outputs, api_name="load")
    start_file.upload(on_start_image, start_file, [status, start_view])
    start_file.clear(on_start_clear, None, [status, start_view])
    table.input(on_table_edit, table, status)
    table.select(on_table_select, None, shot_outputs)
    shot_pick.input(on_pick, shot_pick, shot_outputs)
    demo.unload(on_unload)
  return demo


def launch(studio: Studio, port: int = 7860, *, block: bool = True):
  """Serves the page on 127.0.0.1:``port`` (queued: one generation at a time, whichever tab). With ``block=False``
  returns at once (the server runs in a thread: ``demo.close()`` stops it). Returns the Blocks."""
  demo = build_app(studio)
  demo.queue(default_concurrency_limit=1)
  demo.launch(
      server_name="127.0.0.1",
      server_port=port,
      allowed_paths=[studio.root],
      prevent_thread_lock=not block,
      show_error=True,
      quiet=not block,
      css=_CSS,
      footer_links=[],
  )
  return demo


def main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  from onestory_jax import compilation_cache  # pylint: disable=g-import-not-at-top
  from onestory_jax import logs  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  logs.quiet_libraries()
  compilation_cache.enable()
  try:
    sampler.check_settings(steps=f.steps, shift=f.shift, guidance=f.guidance, memory_guidance=f.memory_guidance)
    if not 0 < f.port < 65536:
      raise ValueError(f"--port must be in 1..65535, got {f.port}")
    try:
      import gradio  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise ValueError(f'the studio needs gradio: pip install -e ".[studio]" ({e})') from e
    pipe = pipeline_lib.OneStoryPipeline.from_pretrained(
        f.workdir, steps=f.steps, shift=f.shift, guidance=f.guidance, memory_guidance=f.memory_guidance
    )
    studio = Studio(pipe, f.root)
  except (ValueError, OSError) as e:
    logs.exit_with(e, 2, False)
  print(f"OneStory studio: http://127.0.0.1:{f.port} (stories under {studio.root})", flush=True)
  launch(studio, f.port)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Training workdir or exported checkpoint; default: the shipped demo.")
  flags.DEFINE_integer("port", 7860, "Port on 127.0.0.1.")
  flags.DEFINE_string("root", "studio_runs", "Folder for the sessions' stories (one folder per browser tab).")
  flags.DEFINE_integer("steps", None, "Sampler steps of a new story (default: the checkpoint config's).")
  flags.DEFINE_float("guidance", None, "Guidance scale of a new story (default: the checkpoint config's).")
  flags.DEFINE_float("shift", None, "Sampling time shift (default: the checkpoint config's).")
  flags.DEFINE_float(
      "memory_guidance", None, "Memory guidance scale of every story, 0 = off (default: the checkpoint config's)."
  )


if __name__ == "__main__":
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main)
