"""Curation of a set of videos into story units, resumable: :func:`curate_video` for one video, :func:`curate` for a
run that writes ``OUT/manifest.jsonl``, ``OUT/rejected.jsonl`` and ``OUT/summary.json`` (docs/curation.md).

One video: decode at the analysis size (one pass: shot detection and the filters' frame features), cut into shots,
judge each shot (filters.py), look up captions, cut the consecutive kept shots into story units (units.py) and, for a
captioner that looks at pixels, caption each unit from a second, seeking decode at the training size.

Resume: each finished video's result is written atomically to ``OUT/videos/<key>.json`` with a fingerprint of what
decided it (the source file's size and modification time, the config, the captioner's key for the video). A run
skips the videos whose result is there with the same fingerprint and curates the rest, so a run killed part way
redoes only the videos it had not finished. The manifest, the rejections and the summary are then assembled from
the per-video results, in input order, and written atomically.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import glob
import hashlib
import json
import multiprocessing
import os
import re
import sys
import traceback
from typing import Any, Iterator, Sequence

from absl import logging
import numpy as np
import tqdm

from onestory_jax import locks
from onestory_jax import video_io
from onestory_jax.data.curation import captions as captions_lib
from onestory_jax.data.curation import decode
from onestory_jax.data.curation import filters
from onestory_jax.data.curation import shots as shots_lib
from onestory_jax.data.curation import units as units_lib
from onestory_jax.data.curation.config import CurationConfig

FORMAT = 1  # of the per-video results; a change makes every video be curated again

# The stable reason codes of rejected.jsonl: for a video (shot null) or for one shot.
REASONS = {
    "undecodable": "video: the file is not a video that can be decoded",
    "no_cut": "video: a single shot",
    "too_few_shots": "video: no two consecutive shots were kept, so no story unit",
    "failed": "video: curation failed on it (a backend's or this code's error; the message has it)",
    "too_short": "shot: shorter than min_shot_seconds",
    "too_long": "shot: longer than max_shot_seconds",
    "black": "shot: mean luma below black_luma",
    "static": "shot: mean frame difference below static_motion",
    "duplicate": "shot: similarity with the previous shot above duplicate_similarity",
    "no_captions": "shot: no caption",
    "unpaired": "shot: kept, but no consecutive kept shot to make a story unit with",
}


def find_videos(patterns: Sequence[str]) -> list[str]:
  """Absolute paths of the files that the glob patterns match (``**`` recurses), sorted, each once. ValueError if a
  pattern matches no file."""
  found: dict[str, None] = {}
  for pattern in patterns:
    matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not matched:
      raise ValueError(f"--videos: no files match {pattern!r}")
    found.update((os.path.abspath(p), None) for p in matched)
  return sorted(found)


def video_key(path: str) -> str:
  """The name of a video's result file: its readable stem and a hash of its absolute path."""
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(path))[0])[:48] or "video"
  return f"{stem}-{hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]}"


def fingerprint(path: str, config: CurationConfig, captioner: captions_lib.Captioner | None) -> str:
  try:
    st = os.stat(path)
    source = [st.st_size, st.st_mtime_ns]
  except OSError as e:
    source = [f"unreadable: {e.strerror}"]
  what = {
      "format": FORMAT,
      "source": source,
      "config": config.to_dict(),
      "captioner": None if captioner is None else captioner.cache_key(path),
  }
  return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _clip(start: int, end: int, frames: int) -> list[int]:
  """The centred window of ``frames`` frames in [start, end) (the whole shot if it is shorter)."""
  if end - start <= frames:
    return [start, end]
  first = start + (end - start - frames) // 2
  return [first, first + frames]


def _caption_frames(path: str, config: CurationConfig, shots: Sequence[dict]) -> list[np.ndarray]:
  """For each shot, ``caption_frames`` frames spread over its clip at height x width (one seeking decode)."""
  wanted = []
  for shot in shots:
    a, b = shot["clip"]
    wanted.append(np.unique(np.linspace(a, b - 1, min(config.caption_frames, b - a)).round().astype(int)))
  need = set(np.concatenate(wanted).tolist())
  got = {}
  for k, frame in decode.iter_frames(path, config.fps, config.height, config.width, min(need), max(need) + 1):
    if k in need:
      got[k] = frame
  return [np.stack([got[k] for k in ks if k in got]) for ks in wanted]


def curate_video(
    path: str,
    config: CurationConfig,
    captioner: captions_lib.Captioner | None = None,
    embed: filters.Embedding | None = None,
    new_detector: shots_lib.DetectorFactory | None = None,
) -> dict[str, Any]:
  """The result record of one video (docs/curation.md, "Per-video results"); bad input is a rejection in it, never
  an exception. ``embed`` and ``new_detector`` default to the config's (``similarity``, ``detector``)."""
  path = os.path.abspath(path)
  record: dict[str, Any] = {"format": FORMAT, "source": path, "video": None, "shots": [], "units": [], "rejected": None}

  def reject_video(reason: str, message: str) -> dict[str, Any]:
    record["rejected"] = {"reason": reason, "message": message}
    return record

  embed = embed or filters.make_similarity(config)
  detector = (new_detector or shots_lib.detector_factory(config))(config)
  features = filters.FrameFeatures(config)
  height, width = config.analysis_shape
  try:
    info = decode.probe(path)
    for _, frame in decode.iter_frames(path, config.fps, height, width):
      detector.push(frame)
      features.add(frame)
  except decode.Undecodable as e:
    return reject_video("undecodable", str(e))
  n = len(features)
  record["video"] = {
      "codec": info.codec,
      "width": info.width,
      "height": info.height,
      "source_fps": None if info.fps is None else round(info.fps, 6),
      "frames": n,
      "seconds": round(n / config.fps, 6),
  }
  ranges = shots_lib.shots_from_cuts(detector.cuts(), n)
  if len(ranges) < 2:
    return reject_video("no_cut", f"one shot of {n / config.fps:.2f} s: no cut found")
  stats = filters.shot_stats(features, ranges, embed)
  shots = record["shots"]
  for index, ((start, end), st) in enumerate(zip(ranges, stats)):
    verdict = filters.judge(st, start, end, config)
    shots.append(
        {
            "index": index,
            "start_frame": start,
            "end_frame": end,
            "start_s": round(start / config.fps, 6),
            "end_s": round(end / config.fps, 6),
            "clip": _clip(start, end, config.frames_per_shot),
            "luma": round(st.luma, 3),
            "motion": round(st.motion, 4),
            "similarity": None if st.similarity is None else round(st.similarity, 4),
            "caption": None,
            "reason": verdict[0] if verdict else None,
            "message": verdict[1] if verdict else None,
        }
    )

  def no_caption(shot: dict, why: str) -> None:
    shot["reason"], shot["message"], shot["caption"] = "no_captions", why, None

  passed = [s for s in shots if s["reason"] is None]
  if captioner is None:
    for shot in passed:
      no_caption(shot, "no captions file and no captioner")
  elif not captioner.needs_frames:
    spans = [(s["start_s"], s["end_s"]) for s in passed]
    for shot, text in zip(passed, captioner.caption_shots([None] * len(passed), video=path, spans=spans)):
      if text:
        shot["caption"] = text
      else:
        no_caption(shot, "no caption matches the shot")
  units = units_lib.story_units([s["reason"] is None for s in shots], config.max_shots_per_unit)
  if captioner is not None and captioner.needs_frames:
    captioned = []
    for unit in units:
      members = [shots[i] for i in unit]
      spans = [(s["start_s"], s["end_s"]) for s in members]
      texts = captioner.caption_shots(_caption_frames(path, config, members), video=path, spans=spans)
      if all(texts) and len(texts) == len(members):
        for shot, text in zip(members, texts):
          shot["caption"] = text
        captioned.append(unit)
      else:
        for shot in members:
          no_caption(shot, "the captioner gave no caption for a shot of its story unit")
    units = captioned
  record["units"] = units
  in_unit = {i for unit in units for i in unit}
  for shot in shots:
    if shot["reason"] is None and shot["index"] not in in_unit:
      shot["reason"], shot["message"] = "unpaired", "kept, but no consecutive kept shot to make a story unit with"
  if not units:
    kept = sum(s["reason"] in (None, "unpaired") for s in shots)
    apart = ", none of them consecutive" if kept > 1 else ""
    return reject_video("too_few_shots", f"{kept} of {len(shots)} shots kept{apart}")
  return record


def manifest_lines(record: dict[str, Any], config: CurationConfig) -> list[dict[str, Any]]:
  """One manifest line per story unit of a video's record."""
  key, out = video_key(record["source"]), []
  for u, unit in enumerate(record["units"]):
    shots = [record["shots"][i] for i in unit]
    out.append(
        {
            "id": f"{key}/{u}",
            "source": record["source"],
            "fps": config.fps,
            "height": config.height,
            "width": config.width,
            "shots": [
                {k: s[k] for k in ("index", "start_s", "end_s", "start_frame", "end_frame", "clip", "caption")}
                for s in shots
            ],
        }
    )
  return out


def rejected_lines(record: dict[str, Any]) -> list[dict[str, Any]]:
  """One line per shot of the video that is in no story unit, and one for the video if it gives no unit."""
  out = []
  for s in record["shots"]:
    if s["reason"] is not None:
      out.append(
          {
              "source": record["source"],
              "shot": s["index"],
              "start_s": s["start_s"],
              "end_s": s["end_s"],
              "reason": s["reason"],
              "message": s["message"],
          }
      )
  if record["rejected"] is not None:
    out.append({"source": record["source"], "shot": None, **record["rejected"]})
  return out


# ----------------------------------------------------------------------------- a run

_WORKER: dict[str, Any] = {}


def _init_worker(
    config: CurationConfig,
    captioner: captions_lib.Captioner | None,
    results: str,
    embed: filters.Embedding,
    new_detector: shots_lib.DetectorFactory,
) -> None:
  """Sets what every video of the run shares (in each worker process: the backends come from the parent, so that
  backends registered there are used)."""
  _WORKER.update(config=config, captioner=captioner, results=results, embed=embed, new_detector=new_detector)


def _curate_one(path: str, stamp: str) -> dict[str, Any]:
  """Curates one video in a worker (or in this process) and writes its result file; returns the record."""
  config, captioner = _WORKER["config"], _WORKER["captioner"]
  try:
    record = curate_video(path, config, captioner, _WORKER["embed"], _WORKER["new_detector"])
  except Exception as e:  # pylint: disable=broad-except
    # Not bad input (that is a rejection): a failure of a backend or of this code. Reported, and the run goes on.
    logging.warning("curation failed on %s: %s", path, "".join(traceback.format_exception(e)).rstrip())
    record = {"format": FORMAT, "source": path, "video": None, "shots": [], "units": []}
    record["rejected"] = {"reason": "failed", "message": f"{type(e).__name__}: {e}".splitlines()[0]}
    stamp = None  # never "done": the next run tries the video again
  record["fingerprint"] = stamp
  video_io.atomic_write_json(os.path.join(_WORKER["results"], video_key(path) + ".json"), record)
  return record


def _read_record(path: str) -> dict[str, Any] | None:
  try:
    return video_io.read_json_object(path)
  except (OSError, ValueError):
    return None


def _jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
  return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows).encode("utf-8")


@contextlib.contextmanager
def _pool(workers: int, init_args: tuple) -> Iterator[Any]:
  if workers <= 1:
    _init_worker(*init_args)
    yield None
    return
  context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads (jax, tqdm)
  with concurrent.futures.ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=init_args) as pool:
    yield pool


def curate(
    videos: Sequence[str],
    out: str,
    config: CurationConfig,
    captioner: captions_lib.Captioner | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
  """Curates ``videos`` (absolute paths) into ``out``, resuming where an earlier run with the same inputs stopped.

  Returns the summary (also written to ``out/summary.json``): counts of videos, shots, units and rejections.
  Raises ValueError for an unknown detector or similarity and locks.InUse if another run holds ``out``; bad videos
  are rejections, never errors.
  """
  new_detector = shots_lib.detector_factory(config)  # unknown names stop the run before any work
  embed = filters.make_similarity(config)
  inside_out = os.path.abspath(out) + os.sep
  videos = [v for v in videos if not v.startswith(inside_out)]  # a broad glob must not take our own files
  if isinstance(captioner, captions_lib.JsonlCaptions):
    captioner.bind(videos)
  results = os.path.join(out, "videos")
  with locks.exclusive(out, "--out"):
    os.makedirs(results, exist_ok=True)
    for stale in glob.glob(os.path.join(results, ".*.tmp")):  # a killed run's unfinished write
      with contextlib.suppress(OSError):
        os.remove(stale)
    stamps = {v: fingerprint(v, config, captioner) for v in videos}
    records: dict[str, dict[str, Any]] = {}
    for v in videos:
      record = _read_record(os.path.join(results, video_key(v) + ".json"))
      if record is not None and record.get("fingerprint") == stamps[v] and record.get("source") == v:
        records[v] = record
    todo = [v for v in videos if v not in records]
    if records:
      logging.info("Resuming: %d of %d videos were done already", len(records), len(videos))
    bar = tqdm.tqdm(total=len(todo), unit="video", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    units = 0
    with bar, _pool(workers, (config, captioner, results, embed, new_detector)) as pool:
      if pool is None:
        done = (_curate_one(v, stamps[v]) for v in todo)
      else:
        futures = [pool.submit(_curate_one, v, stamps[v]) for v in todo]
        done = (f.result() for f in concurrent.futures.as_completed(futures))
      for record in done:
        records[record["source"]] = record
        units += len(record["units"])
        bar.set_postfix(units=units, refresh=False)
        bar.update()
    ordered = [records[v] for v in videos]
    manifest = [line for r in ordered for line in manifest_lines(r, config)]
    rejected = [line for r in ordered for line in rejected_lines(r)]
    summary = summarize(ordered, manifest, rejected, config)
    video_io.atomic_write_bytes(os.path.join(out, "manifest.jsonl"), _jsonl(manifest))
    video_io.atomic_write_bytes(os.path.join(out, "rejected.jsonl"), _jsonl(rejected))
    video_io.atomic_write_json(os.path.join(out, "summary.json"), summary)
  return summary


def summarize(
    records: Sequence[dict[str, Any]], manifest: Sequence[dict], rejected: Sequence[dict], config: CurationConfig
) -> dict[str, Any]:
  shot_reasons = collections.Counter(r["reason"] for r in rejected if r["shot"] is not None)
  video_reasons = collections.Counter(r["reason"] for r in rejected if r["shot"] is None)
  sizes = collections.Counter(len(line["shots"]) for line in manifest)
  return {
      "videos": len(records),
      "videos_with_units": sum(bool(r["units"]) for r in records),
      "shots_detected": sum(len(r["shots"]) for r in records),
      "shots_in_units": sum(len(u) for r in records for u in r["units"]),
      "units": len(manifest),
      "units_by_shots": {str(k): sizes[k] for k in sorted(sizes)},
      "rejected_videos": dict(sorted(video_reasons.items())),
      "rejected_shots": dict(sorted(shot_reasons.items())),
      "config": config.to_dict(),
  }
