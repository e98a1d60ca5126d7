r"""StoryWorld narrative metrics: C-Cons, E-Cons and caption following.

Usage::

  python -m onestory_jax.evaluate --story=STORY.json --samples=OUT [--output=METRICS.json] [--json]

``OUT/frames.npz`` holds one uint8 ``[T, H, W, 3]`` array per story shot under the keys ``shot_0``,
``shot_1``, ...; ``OUT/manifest.json`` is optional (its scalar fields are echoed, and a warning says when its story
digest is not the story file's). The headline figures are printed in one line; ``--json`` prints every metric as
one JSON object, and ``--output`` writes that object to a file. ``evaluate_story(story, frames)`` is the library entry point.

Real video (the paper's narrative metrics, :mod:`onestory_jax.metrics.narrative_metrics`)::

  python -m onestory_jax.evaluate --story=STORY.json --samples=OUT --dinov2=DIR --clip=DIR [--masks=MASKS.npz]

scores character and environment consistency from DINOv2 features of the character and background regions, and
caption alignment from CLIP, on any story file (:mod:`onestory_jax.story`: captions, and ``characters`` and
``environment`` per shot). ``OUT`` holds ``frames.npz`` or, for videos from elsewhere, ``shot_00.mp4``,
``shot_01.mp4``, ... Either tower may be left out; its metrics are then n/a. Without ``--masks`` the regions are
whole frames (the documented fallback).

The StoryWorld metrics are the entries of the metric registry (:mod:`onestory_jax.metrics`): the StoryWorld
metrics are defined in :mod:`onestory_jax.metrics.storyworld_metrics`, on the per-shot analysis of
:mod:`onestory_jax.metrics.shot_analysis`; docs/metrics.md states the same definitions with their
rationale. This module checks the inputs, runs every registered metric and adds the per-pair and
per-shot records.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from onestory_jax import video_io
from onestory_jax.metrics import registry
from onestory_jax.metrics import storyworld_metrics
from onestory_jax.metrics.shot_analysis import MetricConfig

ACTIONS = ("left", "right", "up", "down")


# ----------------------------------------------------------------------------- story level


def validate_story(story: Any) -> None:
  """Raises ValueError unless ``story`` has the StoryWorld fields that the metrics read."""
  if not isinstance(story, dict):
    raise ValueError(f"story: expected a JSON object, got {type(story).__name__}")
  shots = story.get("shots")
  if not isinstance(shots, list) or not shots:
    raise ValueError("story.shots: expected a non-empty list of shots")
  for key in ("height", "width"):
    if key in story and (isinstance(story[key], bool) or not isinstance(story[key], int) or story[key] < 1):
      raise ValueError(f"story.{key}: expected a positive int, got {story[key]!r}")
  for i, shot in enumerate(shots):
    if not isinstance(shot, dict):
      raise ValueError(f"story.shots[{i}]: expected an object, got {type(shot).__name__}")
    chars = shot.get("characters")
    if not isinstance(chars, list) or not all(isinstance(c, (int, str)) for c in chars):
      raise ValueError(f"story.shots[{i}].characters: expected a list of character ids, " f"got {chars!r}")
    if len(set(chars)) != len(chars):
      raise ValueError(f"story.shots[{i}].characters: duplicate ids in {chars!r}")
    if not isinstance(shot.get("environment"), (int, str)):
      raise ValueError(f"story.shots[{i}].environment: expected an environment id, " f"got {shot.get('environment')!r}")
    if shot.get("action") not in ACTIONS:
      raise ValueError(f"story.shots[{i}].action: expected one of {ACTIONS}, " f"got {shot.get('action')!r}")


def _check_frames(story: dict, frames: Sequence[np.ndarray], source: str) -> None:
  shots = story["shots"]
  if len(frames) != len(shots):
    raise ValueError(f"{source}: expected {len(shots)} shots (one per story shot), " f"got {len(frames)}")
  h, w = story.get("height"), story.get("width")
  for i, f in enumerate(frames):
    where = f"{source}: shot_{i}"
    if not isinstance(f, np.ndarray):
      raise ValueError(f"{where}: expected a numpy array, got {type(f).__name__}")
    if f.dtype != np.uint8:
      raise ValueError(f"{where}: expected dtype uint8, got {f.dtype}")
    if f.ndim != 4 or f.shape[-1] != 3:
      raise ValueError(f"{where}: expected shape [T, H, W, 3], got {list(f.shape)}")
    if f.shape[0] < 2:
      raise ValueError(f"{where}: expected at least 2 frames, got {f.shape[0]}")
    if (h is not None and f.shape[1] != h) or (w is not None and f.shape[2] != w):
      raise ValueError(
          f"{where}: expected frames of {h} x {w} pixels (story height x width), " f"got {f.shape[1]} x {f.shape[2]}"
      )


def evaluate_story(
    story: dict, frames: Sequence[np.ndarray], cfg: MetricConfig = MetricConfig(), *, source: str = "frames"
) -> dict:
  """All registered metrics of one generated StoryWorld story.

  Args:
    story: the story dict (``onestory_jax.data.storyworld`` format); only the shots' ``characters``,
      ``environment`` and ``action``, and ``height``/``width`` when present, are read.
    frames: one uint8 ``[T, H, W, 3]`` array per story shot.
    cfg: thresholds.
    source: name used in error messages (e.g. the path of frames.npz).

  Returns:
    A JSON-serialisable dict: every metric of the registry (:data:`onestory_jax.metrics.METRICS`)
    under its name (``None`` when undefined), then the records of
    :func:`storyworld_metrics.details`.
  """
  validate_story(story)
  _check_frames(story, frames, source)
  ev = registry.StoryEval(story, frames, cfg)
  return {**registry.compute(ev), **storyworld_metrics.details(ev)}


# ----------------------------------------------------------------------------- files and CLI


def load_story(path: str) -> dict:
  """Reads and validates a story JSON file."""
  if not os.path.isfile(path):
    raise ValueError(f"{path}: story file not found")
  try:
    with open(path) as f:
      story = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  try:
    validate_story(story)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return story


def load_samples(samples_dir: str, num_shots: int) -> list[np.ndarray]:
  """Reads ``samples_dir/frames.npz``, keys ``shot_0`` .. ``shot_{num_shots - 1}``."""
  path = os.path.join(samples_dir, "frames.npz")
  if not os.path.isfile(path):
    raise ValueError(f"{path}: not found (--samples must hold the sampler's frames.npz)")
  expected = [f"shot_{i}" for i in range(num_shots)]
  with np.load(path, allow_pickle=False) as data:
    keys = set(data.files)
    extra = sorted(k for k in keys if k.startswith("shot_") and k not in expected)
    if extra:
      raise ValueError(
          f"{path}: unexpected keys {extra}; the story has {num_shots} shots " f"(shot_0 .. shot_{num_shots - 1})"
      )
    for key in expected:
      if key not in keys:
        raise ValueError(
            f"{path}: missing key {key!r} (found {sorted(keys)}); expected one uint8 "
            f"[T, H, W, 3] array per story shot"
        )
    return [data[key] for key in expected]


def _load_manifest(samples_dir: str) -> dict | None:
  path = os.path.join(samples_dir, "manifest.json")
  if not os.path.isfile(path):
    return None
  manifest = video_io.read_json_object(path)
  return {k: v for k, v in manifest.items() if v is None or isinstance(v, (str, int, float, bool))}


def run(story_path: str, samples_dir: str, cfg: MetricConfig = MetricConfig()) -> dict:
  """Loads a story and its samples and returns the metrics that the CLI prints."""
  story = load_story(story_path)
  frames = load_samples(samples_dir, len(story["shots"]))
  metrics = evaluate_story(story, frames, cfg, source=os.path.join(samples_dir, "frames.npz"))
  manifest = _load_manifest(samples_dir)
  if manifest is not None:
    metrics["manifest"] = manifest
  metrics["story"] = story_path
  metrics["samples"] = samples_dir
  return metrics


def headline(metrics: dict) -> str:
  """The figures a reader looks for first, in one line."""
  fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
  return (
      f"character consistency {fmt(metrics['character_consistency'])} ({metrics['num_character_pairs']} pairs), "
      f"environment consistency {fmt(metrics['environment_consistency'])} ({metrics['num_environment_pairs']} "
      f"pairs), direction {fmt(metrics['direction_accuracy'])}, count {fmt(metrics['count_accuracy'])} "
      f"({metrics['num_shots']} shots)"
  )


def story_mismatch(story_path: str, samples_dir: str) -> str | None:
  """A warning when the samples' manifest says they were made from other captions than the story file's."""
  path = os.path.join(samples_dir, "manifest.json")
  if not os.path.isfile(path):
    return None
  recorded = video_io.read_json_object(path).get("story_digest")
  from onestory_jax import pipeline  # pylint: disable=g-import-not-at-top

  with open(story_path) as f:
    captions = [shot.get("caption") for shot in json.load(f)["shots"]]
  if recorded is not None and recorded != pipeline.story_digest(captions):
    return (
        f"{path} was written for other captions than those of {story_path} (story digest {recorded} != "
        f"{pipeline.story_digest(captions)}): the metrics compare the samples with another story's annotations"
    )
  return None


def load_videos(samples_dir: str, num_shots: int) -> list[np.ndarray]:
  """One ``[T, H, W, 3]`` array per shot: ``frames.npz`` when the folder has it, else ``shot_00.mp4``, ... (the
  metrics check the arrays)."""
  if os.path.isfile(os.path.join(samples_dir, "frames.npz")):
    return load_samples(samples_dir, num_shots)
  paths = [os.path.join(samples_dir, f"shot_{i:02d}.mp4") for i in range(num_shots)]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise ValueError(
        f"{samples_dir}: expected frames.npz or one video per story shot (shot_00.mp4 .. shot_{num_shots - 1:02d}"
        f".mp4); missing {missing[0]}"
    )
  return [video_io.read_mp4(p) for p in paths]


def run_narrative(story_path: str, samples_dir: str, encoders, masks: str | None, frames_per_shot: int = 8) -> dict:
  """The real-video narrative metrics of one story (:func:`narrative_metrics.score_story`) and the files used."""
  from onestory_jax import story as story_lib  # pylint: disable=g-import-not-at-top
  from onestory_jax.metrics import narrative_metrics  # pylint: disable=g-import-not-at-top

  story = story_lib.load_story(story_path)
  frames = load_videos(samples_dir, len(story.shots))
  metrics = narrative_metrics.score_story(
      story,
      frames,
      encoders,
      narrative_metrics.mask_source(masks),
      frames_per_shot=frames_per_shot,
      source=samples_dir,
  )
  manifest = _load_manifest(samples_dir)
  if manifest is not None:
    metrics["manifest"] = manifest
  metrics.update(story=story_path, samples=samples_dir, masks=masks)
  return metrics


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  del argv
  fl = flags.FLAGS
  if not fl.story or not fl.samples:
    raise ValueError("both --story=STORY.json and --samples=DIR are required")
  if fl.dinov2 or fl.clip:
    from onestory_jax.metrics import narrative_metrics  # pylint: disable=g-import-not-at-top

    encoders = narrative_metrics.Encoders.from_pretrained(fl.dinov2, fl.clip)
    metrics = run_narrative(fl.story, fl.samples, encoders, fl.masks, fl.frames_per_shot)
    line = narrative_metrics.headline(metrics)
  elif fl.masks:
    raise ValueError("--masks: the region masks serve the real-video metrics; pass --dinov2=DIR and/or --clip=DIR")
  else:
    metrics = run(fl.story, fl.samples)
    line = headline(metrics)
  warning = story_mismatch(fl.story, fl.samples)
  if warning:
    print(f"warning: {warning}", file=sys.stderr)
  text = json.dumps(metrics, indent=2, sort_keys=True)
  if fl.output:
    video_io.atomic_write_bytes(fl.output, (text + "\n").encode())
  print(text if fl.json else line + (f"; all metrics in {fl.output}" if fl.output else ""))


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string(
      "story", None, "Story JSON (the annotations: StoryWorld's, or any story file with --dinov2/--clip)."
  )
  flags.DEFINE_string("samples", None, "Directory holding frames.npz (keys shot_0, shot_1, ...).")
  flags.DEFINE_string("output", None, "Optional path to also write the metrics JSON to.")
  flags.DEFINE_bool("json", False, "Print every metric as JSON (per pair and per shot too), not the headline.")
  flags.DEFINE_string(
      "dinov2", None, "Real video: a DINOv2 folder (transformers save_pretrained) for C-Cons and E-Cons."
  )
  flags.DEFINE_string(
      "clip", None, "Real video: a CLIP folder (transformers CLIPModel + tokenizer.json) for alignment."
  )
  flags.DEFINE_string(
      "masks", None, "Real video: character masks, MASKS.npz (keys shot_{i}.character_{c}) or NAME:PATH of a backend."
  )
  flags.DEFINE_integer("frames_per_shot", 8, "Real video: frames sampled per shot, evenly spaced.")


if __name__ == "__main__":
  from onestory_jax import logs  # pylint: disable=g-import-not-at-top

  _define_flags()
  logs.run(main)
