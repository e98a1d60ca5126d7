"""Story files: the sampler's input (captions per shot, optional start image and seed).

OneStory (arXiv 2512.07802, Sec. 3) generates a multi-shot video from captions {C_i} and an
optional start image I (T2MSV without, I2MSV with). A story file carries exactly that:

  {"shots": [{"caption": str, "characters": [int]?, "environment": int?, ...}, ...],
   "start_image": str?, "seed": int?, ...}

Extra keys (e.g. "pattern", "characters", "environments" at top level, "action" / "framing"
per shot, as the StoryWorld exporter writes them) are allowed and kept (``ShotSpec.extra``,
``Story.raw``). ``start_image`` is resolved relative to the story file's directory. The
format is documented in docs/story_format.md.

Every validation error names the file and the field, e.g.
``story.json: shots[2].caption must be a non-empty string, got 5``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
import numpy as np
from PIL import Image, UnidentifiedImageError

PathLike = str | os.PathLike

_SHOT_KEYS = ("caption", "characters", "environment")


@dataclasses.dataclass(frozen=True)
class ShotSpec:
  """One shot of a story.

  Attributes:
    caption: the shot's caption C_i.
    characters: ids of the characters in the shot, or None if the file does not say.
    environment: id of the shot's environment, or None if the file does not say.
    extra: every other key of the shot's JSON object (e.g. "action", "framing").
  """

  caption: str
  characters: tuple[int, ...] | None = None
  environment: int | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Story:
  """A parsed story file.

  Attributes:
    shots: the shots, in order.
    start_image: absolute path of the start image (I2MSV), or None (T2MSV).
    seed: the story seed (per-shot seed = seed + shot index), or None.
    raw: the whole parsed JSON object, extra keys included.
  """

  shots: tuple[ShotSpec, ...]
  start_image: str | None = None
  seed: int | None = None
  raw: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def captions(self) -> list[str]:
    return [s.caption for s in self.shots]


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _describe(x: Any) -> str:
  return f"{json.dumps(x)[:60]}" if not isinstance(x, str) else repr(x)


def _parse_shot(where: str, i: int, shot: Any) -> ShotSpec:
  field = f"shots[{i}]"
  if not isinstance(shot, dict):
    raise ValueError(
        f"{where}: {field} must be an object with a 'caption', got " f"{type(shot).__name__} {_describe(shot)}"
    )
  if "caption" not in shot:
    raise ValueError(f"{where}: {field} has no 'caption'")
  caption = shot["caption"]
  if not isinstance(caption, str) or not caption.strip():
    raise ValueError(f"{where}: {field}.caption must be a non-empty string, got " f"{_describe(caption)}")
  characters = shot.get("characters")
  if characters is not None:
    if not isinstance(characters, list) or not all(_is_int(c) and c >= 0 for c in characters):
      raise ValueError(
          f"{where}: {field}.characters must be a list of non-negative ints, got " f"{_describe(characters)}"
      )
    characters = tuple(characters)
  environment = shot.get("environment")
  if environment is not None and not (_is_int(environment) and environment >= 0):
    raise ValueError(f"{where}: {field}.environment must be a non-negative int, got " f"{_describe(environment)}")
  extra = {k: v for k, v in shot.items() if k not in _SHOT_KEYS}
  return ShotSpec(caption=caption.strip(), characters=characters, environment=environment, extra=extra)


def parse_story(obj: Any, where: str = "<story>", base_dir: str | None = None, max_shots: int | None = None) -> Story:
  """Validates a parsed story object (see the module docstring for the format).

  Args:
    obj: the parsed JSON value.
    where: name used in error messages (the file path for :func:`load_story`).
    base_dir: directory that a relative start_image is resolved against (default: cwd).
    max_shots: if given, more shots than this is an error.

  Returns:
    The :class:`Story`.
  """
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: the top level must be a JSON object with 'shots', got " f"{type(obj).__name__}")
  shots = obj.get("shots")
  if not isinstance(shots, list) or not shots:
    raise ValueError(f"{where}: 'shots' must be a non-empty list, got {_describe(shots)}")
  if max_shots is not None and len(shots) > max_shots:
    raise ValueError(f"{where}: 'shots' has {len(shots)} shots, more than max_shots = " f"{max_shots}")
  specs = tuple(_parse_shot(where, i, s) for i, s in enumerate(shots))

  start_image = obj.get("start_image")
  if start_image is not None:
    if not isinstance(start_image, str) or not start_image.strip():
      raise ValueError(f"{where}: start_image must be a non-empty string path, got " f"{_describe(start_image)}")
    resolved = os.path.abspath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(start_image)))
    if not os.path.isfile(resolved):
      raise ValueError(f"{where}: start_image file not found: {start_image!r} (resolved to " f"{resolved})")
    start_image = resolved

  seed = obj.get("seed")
  if seed is not None and not _is_int(seed):
    raise ValueError(f"{where}: seed must be an int, got {_describe(seed)}")
  return Story(shots=specs, start_image=start_image, seed=seed, raw=obj)


# ---------------------------------------------------------------------------- StoryMem's ST-Bench scripts
def _st_bench_cut(where: str, field: str, value: Any) -> bool:
  if isinstance(value, bool):
    return value
  if isinstance(value, str) and value.strip().lower() in ("true", "false"):
    return value.strip().lower() == "true"
  raise ValueError(f'{where}: {field} must be true/false or "True"/"False", got {_describe(value)}')


def from_st_bench(obj: Any, where: str = "<st-bench>") -> dict:
  """A StoryMem ST-Bench script as a story object of this format (docs/story_format.md has the mapping).

  ST-Bench: ``{"story_overview": str, "scenes": [{"scene_num": int, "cut": [bool | "True" | "False", ...] or one
  value for the whole scene, "video_prompts": [str, ...]}]}``. Every video prompt becomes a shot whose caption is
  the prompt, with ``scene`` (the scene number) and ``cut`` (whether it starts with a cut) kept as extra keys;
  ``story_overview`` is kept at the top level.
  """
  if not isinstance(obj, dict) or not isinstance(obj.get("scenes"), list) or not obj["scenes"]:
    raise ValueError(f"{where}: an ST-Bench script needs a non-empty 'scenes' list")
  shots = []
  for i, scene in enumerate(obj["scenes"]):
    field = f"scenes[{i}]"
    if not isinstance(scene, dict):
      raise ValueError(f"{where}: {field} must be an object, got {_describe(scene)}")
    prompts = scene.get("video_prompts")
    if not isinstance(prompts, list) or not prompts:
      raise ValueError(f"{where}: {field}.video_prompts must be a non-empty list of strings")
    cut = scene.get("cut", [True] + [False] * (len(prompts) - 1))
    cuts = cut if isinstance(cut, list) else [cut] * len(prompts)
    if len(cuts) != len(prompts):
      raise ValueError(f"{where}: {field}.cut has {len(cuts)} entries for {len(prompts)} video_prompts")
    number = scene.get("scene_num", i + 1)
    for j, (prompt, c) in enumerate(zip(prompts, cuts)):
      shots.append({"caption": prompt, "scene": number, "cut": _st_bench_cut(where, f"{field}.cut[{j}]", c)})
  out = {"shots": shots}
  if "story_overview" in obj:
    out["story_overview"] = obj["story_overview"]
  return out


def to_st_bench(story: Story) -> dict:
  """The story as an ST-Bench script: consecutive shots with the same ``scene`` extra key form a scene (a story
  without scene numbers is one scene); ``cut`` defaults to true for a scene's first shot and false after it."""
  scenes: list[dict] = []
  for i, shot in enumerate(story.shots):
    number = shot.extra.get("scene", scenes[-1]["scene_num"] if scenes else 1)
    if not scenes or scenes[-1]["scene_num"] != number:
      scenes.append({"scene_num": number, "cut": [], "video_prompts": []})
    scene = scenes[-1]
    scene["cut"].append(bool(shot.extra.get("cut", not scene["video_prompts"])))
    scene["video_prompts"].append(shot.caption)
  return {"story_overview": story.raw.get("story_overview", ""), "scenes": scenes}


def load_story(path: PathLike, max_shots: int | None = None) -> Story:
  """Reads and validates a story JSON file (this format, or a StoryMem ST-Bench script: :func:`from_st_bench`);
  start_image is resolved against its directory."""
  where = os.fspath(path)
  try:
    with open(where, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{where}: story file not found") from e
  except OSError as e:
    raise ValueError(f"{where}: cannot read story file: {e}") from e
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise ValueError(f"{where}: story file is not UTF-8 text ({e})") from e

  def reject(constant: str):
    raise ValueError(f"{where}: {constant} is not JSON (story files are strict JSON: numbers must be finite)")

  try:
    obj = json.loads(text, parse_constant=reject)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: invalid JSON at line {e.lineno}, column {e.colno}: " f"{e.msg}") from e
  base_dir = os.path.dirname(os.path.abspath(where))
  if isinstance(obj, dict) and "scenes" in obj and "shots" not in obj:
    obj = from_st_bench(obj, where)
  return parse_story(obj, where=where, base_dir=base_dir, max_shots=max_shots)


def load_image(path: PathLike, height: int, width: int) -> np.ndarray:
  """Loads an image as uint8 [height, width, 3] RGB.

  An image of another size is centre-cropped to the target aspect ratio and resized
  (Lanczos); a note with both sizes is logged.
  """
  where = os.fspath(path)
  for name, value in (("height", height), ("width", width)):
    if not _is_int(value) or value < 1:
      raise ValueError(f"load_image({where}): {name} must be a positive int, got {value!r}")
  if not os.path.isfile(where):
    raise FileNotFoundError(f"load_image: no such image file: {where}")
  try:
    with Image.open(where) as im:
      im.load()
      image = im.convert("RGB")
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise ValueError(f"load_image: cannot read {where} as an image ({type(e).__name__}: " f"{e})") from e
  w0, h0 = image.size
  if (w0, h0) != (width, height):
    # Centre crop to the target aspect ratio, then resize.
    if w0 * height > h0 * width:  # too wide
      cw, ch = max(1, round(h0 * width / height)), h0
    else:
      cw, ch = w0, max(1, round(w0 * height / width))
    left, top = (w0 - cw) // 2, (h0 - ch) // 2
    image = image.crop((left, top, left + cw, top + ch)).resize((width, height), Image.Resampling.LANCZOS)
    logging.warning(
        "load_image: %s is %dx%d (WxH); centre-cropped to %dx%d and resized to %dx%d",
        where,
        w0,
        h0,
        cw,
        ch,
        width,
        height,
    )
  return np.asarray(image, dtype=np.uint8).copy()


def main(argv: list[str]) -> None:
  """``python -m onestory_jax.story --story=IN --out=OUT --format=onestory|st_bench``: converts a story file (either
  format in) to this project's format or to StoryMem's ST-Bench script."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from onestory_jax import video_io  # pylint: disable=g-import-not-at-top

  del argv
  fl = flags.FLAGS
  if not fl.story or not fl.out:
    raise ValueError("--story=IN and --out=OUT are required")
  story = load_story(fl.story)
  if fl.format == "st_bench":
    out = to_st_bench(story)
  else:
    out = dict(story.raw)  # an ST-Bench script was converted on loading
  video_io.atomic_write_json(fl.out, out)
  print(f"Wrote {len(story.shots)} shots to {fl.out} ({fl.format})")


if __name__ == "__main__":
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  from onestory_jax import logs  # pylint: disable=g-import-not-at-top

  _flags.DEFINE_string("story", None, "Story file: this project's format or an ST-Bench script.")
  _flags.DEFINE_string("out", None, "Output JSON file.")
  _flags.DEFINE_enum("format", "onestory", ["onestory", "st_bench"], "Output format.")
  logs.run(main)
