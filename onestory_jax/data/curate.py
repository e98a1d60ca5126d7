r"""Curates raw videos into multi-shot story units with per-shot captions (paper Sec. 3).

  python -m onestory_jax.data.curate --videos='DIR/*.mp4' [--captions=FILE.jsonl | --captioner=MODEL_DIR] \
      --out=CURATED [--fps=16 --frames_per_shot=81 --height=480 --width=832] [--workers=N] [--verbose]

Decodes each video (PyAV), finds its shots (PySceneDetect), rejects shots that are too short or long, black, static
or a near-duplicate of the previous shot, matches captions, and cuts consecutive kept shots into 2- and 3-shot story
units. Writes CURATED/manifest.jsonl (one line per unit), CURATED/rejected.jsonl (each video or shot left out, with
a reason code), CURATED/summary.json, and CURATED/videos/ (one result per video: a rerun resumes where a run
stopped). Bad videos are rejections; bad flags or inputs stop the run with one line and exit status 2 (the
traceback with --verbose). See docs/curation.md for every flag, filter and file format.
"""

import dataclasses

from absl import flags

from onestory_jax import locks
from onestory_jax import logs
from onestory_jax.data.curation import captions
from onestory_jax.data.curation import pipeline
from onestory_jax.data.curation.config import CurationConfig

_D = CurationConfig  # flag defaults are the config's
_VIDEOS = flags.DEFINE_multi_string("videos", None, "Glob of the input videos (quote it; ** recurses); repeatable.")
_CAPTIONS = flags.DEFINE_string("captions", None, "Per-shot captions, JSONL (docs/curation.md).")
_MIN_IOU = flags.DEFINE_float("caption_min_iou", 0.5, "Time IoU above which a caption matches a detected shot.")
_CAPTIONER = flags.DEFINE_string(
    "captioner", None, "Without --captions: a local transformers vision-language model folder that captions the shots."
)
_CAPTIONER_DEVICE = flags.DEFINE_string("captioner_device", "cpu", "Torch device of --captioner.")
_CAPTIONER_DTYPE = flags.DEFINE_string("captioner_dtype", "float32", "Torch dtype of --captioner's weights.")
_CAPTIONER_TOKENS = flags.DEFINE_integer("captioner_max_new_tokens", 96, "Longest caption of --captioner, in tokens.")
_OUT = flags.DEFINE_string("out", None, "Output directory (created; a rerun resumes in it).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes that curate videos in parallel.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bar with ETA on stderr.")
flags.DEFINE_float("fps", _D.fps, "Frame rate that videos are resampled to.")
flags.DEFINE_integer("frames_per_shot", _D.frames_per_shot, "Frames of a training shot (each kept shot's clip).")
flags.DEFINE_integer("height", _D.height, "Training frame height (scale to cover, centre crop).")
flags.DEFINE_integer("width", _D.width, "Training frame width.")
flags.DEFINE_integer("analysis_size", _D.analysis_size, "Longer side of the frames that detection and filters see.")
flags.DEFINE_string("detector", _D.detector, "Shot detector: adaptive | content (PySceneDetect) | a registered one.")
flags.DEFINE_float("detector_threshold", None, "Detector threshold (default: PySceneDetect's: adaptive 3, content 27).")
flags.DEFINE_float("detector_min_scene_seconds", _D.detector_min_scene_seconds, "No two cuts closer than this.")
flags.DEFINE_float("min_shot_seconds", None, "Shortest kept shot (default: frames_per_shot / fps).")
flags.DEFINE_float("max_shot_seconds", _D.max_shot_seconds, "Longest kept shot.")
flags.DEFINE_float("black_luma", _D.black_luma, "Shots with mean luma (0..255) below this are 'black'.")
flags.DEFINE_float("static_motion", _D.static_motion, "Shots with mean frame difference below this are 'static'.")
flags.DEFINE_float("duplicate_similarity", _D.duplicate_similarity, "Similarity to the previous shot for 'duplicate'.")
flags.DEFINE_string("similarity", _D.similarity, "Shot embedding for 'duplicate': thumbnail | a registered one.")
flags.DEFINE_float("keyframes_per_second", _D.keyframes_per_second, "Analysis frames kept for the shot embedding.")
flags.DEFINE_integer("caption_frames", _D.caption_frames, "Frames per shot for a captioner that looks at pixels.")
flags.DEFINE_integer("max_shots_per_unit", _D.max_shots_per_unit, "Story units have 2 to this many shots (2 or 3).")

FLAGS = flags.FLAGS


def config_from_flags() -> CurationConfig:
  """The CurationConfig of the command line (ValueError naming the field for a bad value)."""
  return CurationConfig(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(CurationConfig)})


def _captioner() -> captions.Captioner | None:
  if _CAPTIONS.value and _CAPTIONER.value:
    raise ValueError("give --captions (captions that exist) or --captioner (a model that writes them), not both")
  if _CAPTIONS.value:
    return captions.JsonlCaptions(_CAPTIONS.value, _MIN_IOU.value)
  if _CAPTIONER.value:
    from onestory_jax.data.curation import vlm  # pylint: disable=g-import-not-at-top

    captioner = vlm.VlmCaptioner(
        _CAPTIONER.value, _CAPTIONER_TOKENS.value, device=_CAPTIONER_DEVICE.value, dtype=_CAPTIONER_DTYPE.value
    )
    if _WORKERS.value == 1:  # a broken model stops the run here, in one line, not each video later
      try:
        captioner.load()
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"--captioner: cannot load {_CAPTIONER.value}: {e}") from e
    return captioner
  return None


def main(argv):
  del argv  # logs.run: no positional arguments
  for flag in (_VIDEOS, _OUT):
    if not flag.value:
      raise ValueError(f"--{flag.name} is required")
  if _WORKERS.value < 1:
    raise ValueError(f"--workers must be >= 1, got {_WORKERS.value}")
  config = config_from_flags()
  videos = pipeline.find_videos(_VIDEOS.value)
  captioner = _captioner()
  summary = pipeline.curate(videos, _OUT.value, config, captioner, _WORKERS.value, _PROGRESS.value)
  sizes = ", ".join(f"{n}-shot: {c}" for n, c in summary["units_by_shots"].items()) or "none"
  print(
      f"Curated {summary['videos']} videos: {summary['units']} story units ({sizes}) from "
      f"{summary['shots_in_units']} of {summary['shots_detected']} shots; rejected videos "
      f"{summary['rejected_videos'] or 'none'}, shots {summary['rejected_shots'] or 'none'}; wrote {_OUT.value}"
  )


if __name__ == "__main__":
  logs.run(main, bad_input=(locks.InUse, ValueError, OSError))  # flags, globs, the captions file, --out
