r"""StoryWorld: procedural multi-shot videos with referential captions.

StoryWorld is the built-in data set of the demo. A seed fully determines a *story*:
a few characters (flat-coloured shapes), a few environments (piecewise-flat muted
backgrounds) and 2..6 shots, each showing some characters moving in one environment,
with a caption that refers back to earlier shots the way the paper's captions do
(OneStory, arXiv 2512.07802, Sec. 3 and the benchmark of Sec. 5.1):

* at first sight an entity is named only coarsely ("a red round character",
  "a green place"); its exact colour, shape size and the layout of the place exist
  only in the pixels, so a model has to recall them from memory;
* later shots refer back ("the same first round character", "the green place from
  shot 1"), never repeating a returning character's colour.

Stories follow the three patterns of the paper's benchmark:

* ``consistency``: the same main character(s) in every shot, in changing places;
* ``recall`` (insert-and-recall): main character; an intervening shot with a new
  character (and usually a new place); then the main character again, and later
  shots may revisit either;
* ``compose``: characters introduced one per shot, then composed in one shot.

A story is a JSON-compatible dict (also the story-file format of the sampler)::

  {"seed", "pattern", "height", "width", "frames_per_shot",
   "characters": [{"id", "kind", "color", "color_name", "size"}],
   "environments": [{"id", "layout", "colors", "color_name", "params"}],
   "shots": [{"caption", "characters", "environment", "action", "framing",
              "speed", "start"}]}

``size`` is a relative scale (about 1) of the framing's nominal size (7 px wide view,
13 px close view, at 32 px); ``speed`` is in pixels per frame at 32 px; ``start`` holds
the characters' centres at frame 0 in pixels. Both ``speed`` and ``start`` are optional
render details: without them rendering picks defaults deterministically.

Frame-selection pseudo-labels (paper App. A.2 uses DINOv2/CLIP similarities) come from
the annotations here; see :func:`pseudo_labels`.

Export one story, or build the TFDS dataset::

  python -m onestory_jax.data.storyworld export --seed=3 --pattern=recall --out=/tmp/s3
  python -m onestory_jax.data.storyworld_tfds --data_dir=/data/tfds --config=demo
"""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np

PATTERNS = ("consistency", "recall", "compose")
MIN_SHOTS_FOR_PATTERN = {"consistency": 2, "recall": 3, "compose": 3}
KINDS = ("round", "square", "triangle", "diamond", "cross", "ring")
LAYOUTS = ("horizon", "vertical", "diagonal", "band")
ACTIONS = ("left", "right", "up", "down")
FRAMINGS = ("wide", "close")
HUE_NAMES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
GRAY = "gray"
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")
# Shot numbers are written as digits, so stories have at most 9 shots.
MAX_SHOTS_LIMIT = 9

# Upper edges (degrees) of the hue bins of HUE_NAMES; hues >= 345 wrap to red.
_HUE_EDGES = (15.0, 45.0, 70.0, 160.0, 200.0, 260.0, 290.0, 345.0)
# Nominal character diameter in pixels at 32 px per framing.
FRAMING_SIZE_PX = {"wide": 7.0, "close": 13.0}
_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_FUNCTION_WORDS = (
    "a",
    "new",
    "the",
    "same",
    "and",
    "character",
    "moves",
    "move",
    "together",
    "in",
    "place",
    "from",
    "shot",
    "view",
)
_PUNCTUATION = (",", ".")


@dataclasses.dataclass(frozen=True)
class StoryWorldConfig:
  """Size of generated stories.

  Attributes:
    height: frame height in pixels.
    width: frame width in pixels.
    frames_per_shot: frames per shot.
    min_shots: fewest shots in a story (patterns may need more: recall and compose
      need 3).
    max_shots: most shots in a story (at most 9).
  """

  height: int = 32
  width: int = 32
  frames_per_shot: int = 8
  min_shots: int = 2
  max_shots: int = 6

  def __post_init__(self):
    for name in ("height", "width"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 8:
        raise ValueError(f"StoryWorldConfig.{name} must be an int >= 8, got {value!r}")
    if not isinstance(self.frames_per_shot, int) or self.frames_per_shot < 1:
      raise ValueError("StoryWorldConfig.frames_per_shot must be an int >= 1, got " f"{self.frames_per_shot!r}")
    if not 2 <= self.min_shots <= self.max_shots <= MAX_SHOTS_LIMIT:
      raise ValueError(
          "StoryWorldConfig needs 2 <= min_shots <= max_shots <= "
          f"{MAX_SHOTS_LIMIT}, got min_shots={self.min_shots}, "
          f"max_shots={self.max_shots}"
      )

  @classmethod
  def from_config(cls, data: Any, **overrides: int) -> StoryWorldConfig:
    """The story sizes of an experiment's ``config.data`` (or of anything with those attributes).

    Reads the attributes named like this class's fields (height, width, frames_per_shot,
    min_shots, max_shots); one that ``data`` lacks keeps its default (configs of older
    checkpoints may lack min_shots and max_shots). ``overrides`` replace fields.
    """
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"StoryWorldConfig.from_config: unknown fields {unknown}")
    values = {}
    for field in dataclasses.fields(cls):
      value = overrides.get(field.name, getattr(data, field.name, None))
      if value is not None:
        values[field.name] = int(value)
    return cls(**values)


def story_seed(base_seed: int, index: int) -> int:
  """Fixed hash of (base_seed, index) to a story seed in [0, 2**31).

  Stable across processes and platforms (unlike Python's ``hash``); used by the
  training pipeline and the TFDS builder to map a story index to its seed.
  """
  digest = hashlib.blake2b(f"storyworld:{int(base_seed)}:{int(index)}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") & 0x7FFFFFFF


def hue_name(hue: float) -> str:
  """Coarse colour name of a hue in [0, 1)."""
  degrees = (hue % 1.0) * 360.0
  for name, edge in zip(HUE_NAMES, _HUE_EDGES):
    if degrees < edge:
      return name
  return HUE_NAMES[0]


def vocabulary() -> list[str]:
  """Every word a StoryWorld caption can contain, in a fixed order."""
  words = (
      list(_FUNCTION_WORDS)
      + list(ACTIONS)
      + list(FRAMINGS)
      + list(HUE_NAMES)
      + [GRAY]
      + list(KINDS)
      + list(ORDINALS)
      + [str(k) for k in range(1, MAX_SHOTS_LIMIT + 1)]
      + list(_PUNCTUATION)
  )
  if len(set(words)) != len(words):
    raise AssertionError("StoryWorld vocabulary has duplicate words")
  return words


# ----------------------------------------------------------------------------- drawing


def _hue_distance(a: float, b: float) -> float:
  d = abs(a - b) % 1.0
  return min(d, 1.0 - d)


def _rgb(h: float, s: float, v: float) -> list[float]:
  return [round(float(c), 4) for c in colorsys.hsv_to_rgb(h % 1.0, s, v)]


def character_rgb(rng: np.random.Generator, hue: float) -> list[float]:
  """A character colour of ``hue``: bright and saturated (s in [0.6, 1], v in [0.75, 1], drawn from ``rng``)."""
  sat = float(rng.uniform(0.6, 1.0))
  val = float(rng.uniform(0.75, 1.0))
  return _rgb(hue, sat, val)


def _draw_characters(rng: np.random.Generator, count: int) -> list[dict[str, Any]]:
  """Bright, saturated characters; any two differ in kind or clearly in hue."""
  characters, hues = [], []
  while len(characters) < count:
    kind = KINDS[int(rng.integers(len(KINDS)))]
    hue = float(rng.random())
    color = character_rgb(rng, hue)
    size = round(float(rng.uniform(0.85, 1.15)), 3)
    name = hue_name(hue)
    if not all(
        kind != c["kind"] or (name != c["color_name"] and _hue_distance(hue, h) >= 0.2)
        for c, h in zip(characters, hues)
    ):
      continue
    characters.append({"id": len(characters), "kind": kind, "color": color, "color_name": name, "size": size})
    hues.append(hue)
  return characters


def _draw_environments(rng: np.random.Generator, count: int) -> list[dict[str, Any]]:
  """Piecewise-flat muted backgrounds (s <= 0.45, v in [0.25, 0.7])."""
  environments = []
  while len(environments) < count:
    layout = LAYOUTS[int(rng.integers(len(LAYOUTS)))]
    hue = float(rng.random())
    sat = float(rng.uniform(0.0, 0.45))
    name = GRAY if sat < 0.15 else hue_name(hue)
    if any(layout == e["layout"] and name == e["color_name"] for e in environments):
      continue
    num_regions = 3 if layout == "band" else 2
    values = [float(rng.uniform(0.25, 0.7))]
    while len(values) < num_regions:
      v = float(rng.uniform(0.25, 0.7))
      if abs(v - values[-1]) >= 0.15:
        values.append(v)
    colors = []
    for v in values:
      h = hue + float(rng.uniform(-0.04, 0.04))
      s = float(np.clip(sat + rng.uniform(-0.05, 0.05), 0.0, 0.45))
      colors.append(_rgb(h, s, v))
    if layout in ("horizon", "vertical"):
      params = {"split": round(float(rng.uniform(0.35, 0.65)), 3)}
    elif layout == "diagonal":
      params = {"direction": int(rng.choice([-1, 1])), "offset": round(float(rng.uniform(-0.2, 0.2)), 3)}
    else:
      params = {"lo": round(float(rng.uniform(0.25, 0.4)), 3), "hi": round(float(rng.uniform(0.6, 0.75)), 3)}
    environments.append(
        {"id": len(environments), "layout": layout, "colors": colors, "color_name": name, "params": params}
    )
  return environments


def _next_environment(rng: np.random.Generator, used: int, previous: int, p_new: float, max_envs: int) -> int:
  """A new environment id (probability p_new) or a previous one, not the last one."""
  others = [e for e in range(used) if e != previous]
  if used < max_envs and (not others or rng.random() < p_new):
    return used
  if not others:
    return previous
  return int(others[int(rng.integers(len(others)))])


def _plan(rng: np.random.Generator, pattern: str, n: int) -> list[tuple[list[int], int]]:
  """Per shot: (character ids, environment id). Ids appear in introduction order."""
  shots: list[tuple[list[int], int]] = []

  def add(chars: list[int], env: int | None = None, p_new: float = 0.6):
    used = 1 + max((e for _, e in shots), default=-1)
    previous = shots[-1][1] if shots else -1
    if env is None:
      env = 0 if not shots else _next_environment(rng, used, previous, p_new, n)
    shots.append((sorted(chars), env))

  if pattern == "consistency":
    main = [0, 1] if rng.random() < 0.35 else [0]
    for _ in range(n):
      add(main, p_new=0.65)
  elif pattern == "recall":
    add([0])
    add([1], env=1 if rng.random() < 0.7 else 0)
    add([0], env=0 if rng.random() < 0.6 else None, p_new=0.5)
    options = ([0], [1], [0, 1])
    for _ in range(n - 3):
      add(options[int(rng.choice(3, p=[0.4, 0.3, 0.3]))], p_new=0.4)
  elif pattern == "compose":
    m = 3 if n >= 4 and rng.random() < 0.5 else 2
    for c in range(m):
      add([c], p_new=0.7)
    used = 1 + max(e for _, e in shots)
    reuse = rng.random() < 0.6
    add(list(range(m)), env=int(rng.integers(used)) if reuse else used)
    for _ in range(n - m - 1):
      size = int(rng.integers(1, m + 1))
      add([int(c) for c in rng.choice(m, size=size, replace=False)], p_new=0.4)
  else:
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
  return shots


def _scale(height: int, width: int) -> float:
  return min(height, width) / 32.0


def _draw_starts(
    rng: np.random.Generator, sizes_px: Sequence[float], action: str, speed: float, height: int, width: int, frames: int
) -> list[list[float]]:
  """Start centres so that every centre stays in frame and characters are apart.

  Characters take evenly spaced slots (with jitter) across the motion, so centres are
  at least 0.6 * extent / n apart: partial overlap at most, never full occlusion.
  """
  dx, dy = _DIRECTIONS[action]
  horizontal = dx != 0
  along, across = (width, height) if horizontal else (height, width)
  travel = speed * _scale(height, width) * (frames - 1)
  n = len(sizes_px)
  slots = rng.permutation(n)
  starts = []
  for k, size in enumerate(sizes_px):
    margin = min(size / 2.0, max((along - travel) / 2.0, 0.0))
    lo, hi = margin, along - margin - travel
    u = float(rng.uniform(lo, hi)) if hi > lo else (along - travel) / 2.0
    if (dx if horizontal else dy) < 0:
      u = along - u
    v = (slots[k] + 0.5) / n * across + float(rng.uniform(-0.2, 0.2)) * across / n
    x, y = (u, v) if horizontal else (v, u)
    starts.append([round(x, 3), round(y, 3)])
  return starts


def _character_sizes(story: dict[str, Any], shot: dict[str, Any]) -> list[float]:
  scale = _scale(story["height"], story["width"])
  base = FRAMING_SIZE_PX[shot["framing"]]
  by_id = {c["id"]: c for c in story["characters"]}
  return [base * float(by_id[c].get("size", 1.0)) * scale for c in shot["characters"]]


# ----------------------------------------------------------------------------- captions


def caption_for_shot(story: dict[str, Any], index: int) -> str:
  """Referential caption of shot `index`, from the story's annotations.

  Grammar: ``<subject> <verb> <action> [together] in <place>, <framing> view.`` where
  the subject lists the shot's characters ("a red round character" at the first shot
  of the story, "a new red round character" when introduced later, "the same first
  round character" when it comes back alone, "the first round character" in a group,
  ordinals in order of introduction) and the place is "a green place" / "a new green
  place" at first sight and "the green place from shot K" afterwards (K counts from 1).

  A character's colour is its appearance, and back-references never repeat it: like the
  paper's rewritten captions ("the same man, now ..."), they keep only the identity class
  (the kind), which tells Frame Selection which memory frames matter, so every shade of a
  returning character, even its hue name, can only come from memory (docs/design.md,
  "StoryWorld captions").
  """
  shots = story["shots"]
  by_id = {c["id"]: c for c in story["characters"]}
  env_by_id = {e["id"]: e for e in story["environments"]}
  introduced: list[int] = []
  first_env_shot: dict[int, int] = {}
  for j, s in enumerate(shots[:index]):
    for c in s["characters"]:
      if c not in introduced:
        introduced.append(c)
    first_env_shot.setdefault(s["environment"], j)
  shot = shots[index]
  ids = shot["characters"]
  article = "a" if index == 0 else "a new"
  phrases = []
  for c in ids:
    ch = by_id[c]
    if c in introduced:
      ordinal = ORDINALS[introduced.index(c)]
      phrases.append(
          f"the same {ordinal} {ch['kind']} character" if len(ids) == 1 else f"the {ordinal} {ch['kind']} character"
      )
    else:
      phrases.append(f"{article} {ch['color_name']} {ch['kind']} character")
  if len(ids) == 1:
    verb = f"moves {shot['action']}"
  else:
    verb = f"move {shot['action']} together"
  env = shot["environment"]
  if env in first_env_shot:
    place = f"the {env_by_id[env]['color_name']} place from shot {first_env_shot[env] + 1}"
  else:
    place = f"{article} {env_by_id[env]['color_name']} place"
  subject = phrases[0] if len(phrases) == 1 else (f"{', '.join(phrases[:-1])} and {phrases[-1]}")
  return f"{subject} {verb} in {place}, {shot['framing']} view."


# ----------------------------------------------------------------------------- stories


def generate_story(
    seed: int, pattern: str | None = None, cfg: StoryWorldConfig = StoryWorldConfig(), num_shots: int | None = None
) -> dict[str, Any]:
  """Generates the story of `seed` (a pure function of its arguments).

  Args:
    seed: non-negative int.
    pattern: 'consistency', 'recall' or 'compose'; None draws it from the seed.
    cfg: sizes.
    num_shots: shot count; None draws it in [max(min_shots, pattern minimum), max_shots].

  Returns:
    The story dict described in the module docstring.
  """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  rng = np.random.default_rng(int(seed))
  feasible = [p for p in PATTERNS if MIN_SHOTS_FOR_PATTERN[p] <= cfg.max_shots]
  drawn = feasible[int(rng.integers(len(feasible)))]
  if pattern is None:
    pattern = drawn
  if pattern not in PATTERNS:
    raise ValueError(f"pattern must be one of {PATTERNS} (or None), got {pattern!r}")
  lo = max(cfg.min_shots, MIN_SHOTS_FOR_PATTERN[pattern])
  if num_shots is None:
    if lo > cfg.max_shots:
      raise ValueError(f"pattern {pattern!r} needs >= {lo} shots but " f"StoryWorldConfig.max_shots={cfg.max_shots}")
    num_shots = int(rng.integers(lo, cfg.max_shots + 1))
  elif not lo <= num_shots <= cfg.max_shots:
    raise ValueError(f"num_shots for pattern {pattern!r} must be in [{lo}, " f"{cfg.max_shots}], got {num_shots!r}")
  plan = _plan(rng, pattern, num_shots)
  num_chars = 1 + max(c for chars, _ in plan for c in chars)
  num_envs = 1 + max(e for _, e in plan)
  story: dict[str, Any] = {
      "seed": int(seed),
      "pattern": pattern,
      "height": cfg.height,
      "width": cfg.width,
      "frames_per_shot": cfg.frames_per_shot,
      "characters": _draw_characters(rng, num_chars),
      "environments": _draw_environments(rng, num_envs),
      "shots": [],
  }
  for chars, env in plan:
    shot = {
        "caption": "",
        "characters": chars,
        "environment": env,
        "action": ACTIONS[int(rng.integers(len(ACTIONS)))],
        "framing": FRAMINGS[int(rng.integers(len(FRAMINGS)))],
        "speed": round(float(rng.uniform(0.75, 1.25)), 3),
    }
    shot["start"] = _draw_starts(
        rng, _character_sizes(story, shot), shot["action"], shot["speed"], cfg.height, cfg.width, cfg.frames_per_shot
    )
    story["shots"].append(shot)
  for i, shot in enumerate(story["shots"]):
    shot["caption"] = caption_for_shot(story, i)
  return story


def _check_story(story: Any) -> None:
  if not isinstance(story, dict):
    raise ValueError(f"story must be a dict, got {type(story).__name__}")
  for key in ("height", "width", "frames_per_shot", "characters", "environments", "shots"):
    if key not in story:
      raise ValueError(f"story is missing the field {key!r}")


# ----------------------------------------------------------------------------- rendering


def _environment_image(env: dict[str, Any], height: int, width: int) -> np.ndarray:
  """Float [H, W, 3] background with 2-3 flat regions."""
  y = (np.arange(height, dtype=np.float64)[:, None] + 0.5) / height
  x = (np.arange(width, dtype=np.float64)[None, :] + 0.5) / width
  layout, params = env.get("layout"), env.get("params", {})
  if layout == "horizon":
    region = np.broadcast_to(y >= params["split"], (height, width)).astype(int)
  elif layout == "vertical":
    region = np.broadcast_to(x >= params["split"], (height, width)).astype(int)
  elif layout == "diagonal":
    region = ((x - 0.5) * params["direction"] + (y - 0.5) > params["offset"]).astype(int)
  elif layout == "band":
    yy = np.broadcast_to(y, (height, width))
    region = (yy >= params["lo"]).astype(int) + (yy >= params["hi"]).astype(int)
  else:
    raise ValueError(f"environment {env.get('id')!r}: layout must be one of {LAYOUTS}, " f"got {layout!r}")
  colors = np.asarray(env["colors"], dtype=np.float64)
  if colors.ndim != 2 or colors.shape[1] != 3 or colors.shape[0] <= region.max():
    raise ValueError(
        f"environment {env.get('id')!r}: colors must be a list of "
        f"{region.max() + 1} RGB triples, got {env['colors']!r}"
    )
  return colors[region]


def _signed_distance(kind: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Approximate signed distance (pixels) to a shape of radius r centred at 0."""
  ax, ay = np.abs(dx), np.abs(dy)
  if kind == "round":
    return np.hypot(dx, dy) - r
  if kind == "square":
    return np.maximum(ax, ay) - 0.82 * r
  if kind == "diamond":
    return (ax + ay - 1.1 * r) / np.sqrt(2.0)
  if kind == "triangle":  # apex up (image y grows downwards)
    big = 1.15 * r
    edges = np.maximum(np.maximum(dy, 0.866 * dx - 0.5 * dy), -0.866 * dx - 0.5 * dy)
    return edges - big / 2.0
  if kind == "cross":
    arm, half = r, 0.38 * r
    return np.minimum(np.maximum(ax - arm, ay - half), np.maximum(ax - half, ay - arm))
  if kind == "ring":
    return np.abs(np.hypot(dx, dy) - 0.72 * r) - 0.28 * r
  raise ValueError(f"character kind must be one of {KINDS}, got {kind!r}")


def render_shot(story: dict[str, Any], shot_index: int) -> np.ndarray:
  """Renders shot `shot_index` of `story` as uint8 [T, H, W, 3] (deterministic).

  Characters move in a straight line (direction from the shot's action) from their
  start centres at `speed` px/frame (scaled with the frame size); edges are
  anti-aliased with a one-pixel ramp of the signed distance.
  """
  _check_story(story)
  shots = story["shots"]
  if isinstance(shot_index, bool) or not 0 <= int(shot_index) < len(shots):
    raise ValueError(f"shot_index must be in [0, {len(shots)}), got {shot_index!r}")
  shot = shots[int(shot_index)]
  for key in ("characters", "environment", "action", "framing"):
    if key not in shot:
      raise ValueError(f"story shot {shot_index} is missing the field {key!r}")
  if shot["action"] not in ACTIONS:
    raise ValueError(f"shot {shot_index}: action must be one of {ACTIONS}, " f"got {shot['action']!r}")
  if shot["framing"] not in FRAMINGS:
    raise ValueError(f"shot {shot_index}: framing must be one of {FRAMINGS}, " f"got {shot['framing']!r}")
  height, width, frames = (int(story["height"]), int(story["width"]), int(story["frames_per_shot"]))
  envs = {e["id"]: e for e in story["environments"]}
  chars = {c["id"]: c for c in story["characters"]}
  if shot["environment"] not in envs:
    raise ValueError(f"shot {shot_index}: unknown environment {shot['environment']!r}")
  for c in shot["characters"]:
    if c not in chars:
      raise ValueError(f"shot {shot_index}: unknown character {c!r}")
  speed = float(shot.get("speed", 1.0))
  sizes = _character_sizes(story, shot)
  starts = shot.get("start")
  if starts is None:
    rng = np.random.default_rng([int(story.get("seed", 0)), int(shot_index)])
    starts = _draw_starts(rng, sizes, shot["action"], speed, height, width, frames)
  if len(starts) != len(shot["characters"]):
    raise ValueError(f"shot {shot_index}: 'start' needs one [x, y] per character, " f"got {starts!r}")
  background = _environment_image(envs[shot["environment"]], height, width)
  image = np.broadcast_to(background, (frames, height, width, 3)).copy()
  t = np.arange(frames, dtype=np.float64)[:, None, None]
  py = np.arange(height, dtype=np.float64)[None, :, None] + 0.5
  px = np.arange(width, dtype=np.float64)[None, None, :] + 0.5
  step = speed * _scale(height, width)
  dirx, diry = _DIRECTIONS[shot["action"]]
  for cid, (x0, y0), size in zip(shot["characters"], starts, sizes):
    ch = chars[cid]
    cx = x0 + dirx * step * t
    cy = y0 + diry * step * t
    dist = _signed_distance(ch["kind"], px - cx, py - cy, size / 2.0)
    alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]
    image = image * (1.0 - alpha) + np.asarray(ch["color"], np.float64) * alpha
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_story(story: dict[str, Any]) -> list[np.ndarray]:
  """All shots of `story`, each uint8 [T, H, W, 3]."""
  _check_story(story)
  return [render_shot(story, i) for i in range(len(story["shots"]))]


def pseudo_labels(story: dict[str, Any], memory_shot_indices: Sequence[int], target_index: int) -> np.ndarray:
  """Frame-selection pseudo-labels of memory shots for a target shot.

  StoryWorld replaces the paper's DINOv2/CLIP similarity labels (App. A.2, Eq. 11)
  by the ground-truth annotations. For memory shot j and target shot t with
  character sets C_j, C_t and environments env_j, env_t:

    y_j = 0.75 * |C_j ∩ C_t| / max(|C_t|, 1) + 0.25 * [env_j == env_t]   in [0, 1].

  Every frame of a memory shot carries its shot's label.

  Returns:
    float32 [len(memory_shot_indices)].
  """
  _check_story(story)
  shots = story["shots"]
  for i in list(memory_shot_indices) + [target_index]:
    if not 0 <= int(i) < len(shots):
      raise ValueError(f"shot index must be in [0, {len(shots)}), got {i!r}")
  target = shots[int(target_index)]
  c_t = set(target["characters"])
  labels = []
  for j in memory_shot_indices:
    shot = shots[int(j)]
    overlap = len(set(shot["characters"]) & c_t) / max(len(c_t), 1)
    same_env = float(shot["environment"] == target["environment"])
    labels.append(0.75 * overlap + 0.25 * same_env)
  return np.asarray(labels, dtype=np.float32)


def export_story(story: dict[str, Any], out_dir: str) -> None:
  """Writes out_dir/story.json and out_dir/frames.npz (keys shot_0, shot_1, ...)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "story.json"), "w") as f:
    json.dump(story, f, indent=2)
  frames = render_story(story)
  np.savez_compressed(os.path.join(out_dir, "frames.npz"), **{f"shot_{i}": x for i, x in enumerate(frames)})


# ----------------------------------------------------------------------------- CLI


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_integer("seed", 0, "export: story seed (>= 0).")
  flags.DEFINE_string("pattern", None, f"export: one of {PATTERNS}; default: drawn from " "the seed.")
  flags.DEFINE_string("out", None, "export: output directory.")
  flags.DEFINE_integer("num_shots", None, "export: number of shots; default: drawn from " "the seed.")
  flags.DEFINE_integer("height", 32, "export: frame height.")
  flags.DEFINE_integer("width", 32, "export: frame width.")
  flags.DEFINE_integer("frames_per_shot", 8, "export: frames per shot.")
  flags.DEFINE_integer("max_shots", 6, "export: most shots per story.")


_USAGE = (
    "usage: python -m onestory_jax.data.storyworld export --seed=S "
    "--pattern=<consistency|recall|compose> --out=DIR [--num_shots=N]\n"
    "(the TFDS build: python -m onestory_jax.data.storyworld_tfds --data_dir=DIR [--config=demo|tiny])"
)


def _main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  fl = flags.FLAGS
  command = list(argv[1:])
  if command != ["export"]:
    raise ValueError(f"expected the command 'export', got {command}; {_USAGE.splitlines()[0]}")
  if not fl.out:
    raise ValueError("export needs --out=DIR")
  cfg = StoryWorldConfig.from_config(fl)  # the size flags (min_shots keeps its default)
  story = generate_story(fl.seed, fl.pattern, cfg, fl.num_shots)
  export_story(story, fl.out)
  print(f"wrote {len(story['shots'])} shots ({story['pattern']}) to {fl.out}")
  for i, shot in enumerate(story["shots"]):
    print(f"  shot {i + 1}: {shot['caption']}")


if __name__ == "__main__":
  from onestory_jax import logs  # pylint: disable=g-import-not-at-top

  _define_flags()
  logs.run(_main, positional=True)
