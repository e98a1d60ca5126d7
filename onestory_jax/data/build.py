r"""Builds training records from curated story units: latents, caption embeddings, pseudo-labels (paper Sec. 3).

  python -m onestory_jax.data.build --curated=CURATED --pretrained=CONVERTED_WAN [--dinov2=DIR --clip=DIR] \
      --out=RECORDS [--config=configs/onestory.py:VARIANT] [--runner=DirectRunner|DataflowRunner|FlinkRunner|...] \
      [--augmentations=1 --dtype=float16 --seed=0] [beam pipeline flags, e.g. --direct_num_workers=2 \
      --direct_running_mode=multi_processing]

Reads CURATED/manifest.jsonl (``python -m onestory_jax.data.curate``), encodes every story unit with the run
config's Wan VAE and umT5 (the conversion in --pretrained), computes the App. A.2 pseudo-labels with DINOv2 and
CLIP, and writes ArrayRecord shards of the TFDS dataset ``multishot`` under RECORDS/multishot/<name>/1.0.0 through a
Beam pipeline (TFDS's Beam support). Train on them with ``--config.data.source=multishot
--config.data.records=RECORDS``. A unit whose video cannot be read is skipped and named, never fatal; bad flags or
inputs stop the run with one line and exit status 2 (the traceback with --verbose). A rerun after a kill encodes only
the units that were not finished. See docs/records.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging as py_logging
import os
import sys
import threading
import time

from absl import flags
from absl import logging
from etils import epath
from ml_collections import config_flags

from onestory_jax import locks
from onestory_jax import logs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "onestory.py")

# allow_override: other entry modules (plan, benchmark, curate, sample) define --config, --out, --progress, --seed
# and --overwrite too; a test process may import several of them.
_CURATED = flags.DEFINE_string(
    "curated", None, "Curation output folder (its manifest.jsonl), or a manifest file.", allow_override=True
)
_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "The --dst of python -m onestory_jax.convert (Wan VAE, umT5).", allow_override=True
)
_DINOV2 = flags.DEFINE_string(
    "dinov2",
    None,
    "DINOv2 for the pseudo-labels: a transformers folder (default: --pretrained's dinov2).",
    allow_override=True,
)
_CLIP = flags.DEFINE_string(
    "clip",
    None,
    "CLIP for the pseudo-labels: a transformers folder (default: --pretrained's image_encoder).",
    allow_override=True,
)
_OUT = flags.DEFINE_string("out", None, "Output TFDS data dir (RECORDS); a rerun resumes in it.", allow_override=True)
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    f"Run configuration (configs/onestory.py:VARIANT; default {DEFAULT_CONFIG}'s default variant).",
    lock_config=False,
    allow_override=True,
)
_RUNNER = flags.DEFINE_string(
    "runner", "DirectRunner", "Beam runner (DirectRunner, DataflowRunner, FlinkRunner, ...).", allow_override=True
)
_NAME = flags.DEFINE_string(
    "name", None, "Name of the build under RECORDS/multishot/ (default: the config variant).", allow_override=True
)
_AUGMENTATIONS = flags.DEFINE_integer(
    "augmentations", 1, "Augmented copies of each shot but the last.", allow_override=True
)
_DTYPE = flags.DEFINE_string(
    "dtype", "float16", "Stored dtype of latents and text embeddings: float16 | float32.", allow_override=True
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the augmentations.", allow_override=True)
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir",
    None,
    "Finished units, for resume (default RECORDS/cache/<name>; shared storage for a cluster).",
    allow_override=True,
)
_KEEP_CACHE = flags.DEFINE_bool(
    "keep_cache", False, "Keep the unit cache after a successful build.", allow_override=True
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a finished build of other inputs under the same name.", allow_override=True
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bar with ETA on stderr.", allow_override=True)

BEAM_ARGS: list[str] = []  # the command line's Beam pipeline options (split off in __main__)


# ---------------------------------------------------------------------------- command line
def split_argv(argv: list[str], known: set[str]) -> tuple[list[str], list[str]]:
  """(this command's arguments, Beam pipeline options): a ``--name[=value]`` whose name (or, for ``--noname``,
  ``name``) is a flag of this command, or of ``--config.``, is ours; every other argument is Beam's (with its value
  when that is the next argument)."""
  ours, beam = [argv[0]], []
  i = 1
  while i < len(argv):
    arg = argv[i]
    name = arg.lstrip("-").split("=", 1)[0]
    mine = arg.startswith("-") and (
        name in known or (name.startswith("no") and name[2:] in known) or name.startswith("config.")
    )
    if not arg.startswith("--") or arg == "--":
      mine = True  # positional arguments: logs.run refuses them
    dest = ours if mine else beam
    dest.append(arg)
    if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-") and not mine:
      dest.append(argv[i + 1])
      i += 1
    i += 1
  return ours, beam


def check_beam_args(args: list[str]) -> None:
  """Raises ValueError naming the first argument that is neither this command's flag nor a Beam pipeline option."""
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top

  parsers = []
  beam_log = py_logging.getLogger(pipeline_options.__name__)
  level = beam_log.level
  beam_log.setLevel(py_logging.ERROR)  # its "Discarding unparseable args" warning: the error below says it
  try:
    pipeline_options.PipelineOptions(args).get_all_options(add_extra_args_fn=parsers.append)
  finally:
    beam_log.setLevel(level)
  _, unknown = parsers[0].parse_known_args(args)
  if unknown:
    raise ValueError(
        f"unknown flag {unknown[0]}: neither a flag of this command (--help lists them) nor an Apache Beam "
        "pipeline option"
    )


def load_config():
  config = _CONFIG.value
  if config is None:
    spec = importlib.util.spec_from_file_location("onestory_config", DEFAULT_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  return config


def manifest_path(curated: str) -> str:
  p = epath.Path(curated)
  return os.fspath(p / "manifest.jsonl") if p.is_dir() else os.fspath(p)


def check_units(lines: list[str], path: str, config) -> None:
  """Every manifest line parses, and was curated at the config's frame size (ValueError naming the line)."""
  from onestory_jax.data.multishot import encoder  # pylint: disable=g-import-not-at-top

  if not lines:
    raise ValueError(f"{path}: no story units (the manifest is empty)")
  d = config.data
  for i, line in enumerate(lines):
    unit = encoder.parse_unit(line, f"{path}:{i + 1}")
    if (int(unit["height"]), int(unit["width"])) != (int(d.height), int(d.width)):
      raise ValueError(
          f"{path}:{i + 1}: unit {unit['id']} was curated at {unit['height']}x{unit['width']}, but "
          f"config.data is {d.height}x{d.width}: curate with --height={d.height} --width={d.width}, or pick the "
          "config of that size"
      )


def check_pretrained(config) -> None:
  """The conversion has what the build reads (ValueError saying what to convert)."""
  from onestory_jax import weights  # pylint: disable=g-import-not-at-top
  from onestory_jax.data.multishot import layout  # pylint: disable=g-import-not-at-top

  dst = config.pretrained
  if not os.path.isdir(dst):
    raise ValueError(f"--pretrained={dst}: not a directory (the --dst of python -m onestory_jax.convert)")
  need = []
  if config.codec.name == "wan_vae":
    need.append("vae")
  if layout.RecordLayout.from_config(config).text_dim:
    need.append("text_encoder")
  for component in need:
    if not os.path.isdir(weights.converted_path(dst, component)):
      raise ValueError(
          f"--pretrained={dst}: no converted {component!r}; run python -m onestory_jax.convert --src=<release> "
          f"--dst={dst} --components={component}"
      )


# ---------------------------------------------------------------------------- progress
class Progress:
  """Counts the finished and failed units in the unit cache while the pipeline runs (any runner: the cache is where
  the workers write), as a bar with ETA on stderr."""

  def __init__(self, cache, wanted: dict[int, str], done_before: int, on: bool):
    self.cache = cache
    self.wanted = {f"{i:09d}-{d}.npz" for i, d in wanted.items()}
    self.total = len(wanted)
    self.done_before = done_before
    self.bar = logs.progress(self.total, "encoding story units", on=on, unit="unit")
    self.bar.update(done_before)
    self.count = done_before
    self._stop = threading.Event()
    remote = "://" in os.fspath(cache.root)
    self._interval = 30.0 if remote else 1.0
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _poll(self) -> None:
    try:
      n = len(self.cache.done() & self.wanted) + len(self.cache.failures())
    except OSError:
      return
    if n > self.count:
      self.bar.update(n - self.count)
      self.count = n

  def _run(self) -> None:
    while not self._stop.wait(self._interval):
      self._poll()

  def __enter__(self) -> "Progress":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self._poll()
    self.bar.close()


# ---------------------------------------------------------------------------- the build
def build(
    *,
    manifest: str,
    config,
    out: str,
    name: str,
    dinov2: str | None = None,
    clip: str | None = None,
    augmentations: int = 1,
    dtype: str = "float16",
    seed: int = 0,
    cache_dir: str | None = None,
    beam_args: list[str] | tuple[str, ...] = ("--runner=DirectRunner",),
    keep_cache: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
  """Builds (or finishes, or finds built) the records of ``manifest`` under ``out``; returns a summary dict.

  ``config.pretrained`` must name the conversion. The summary has ``dataset_dir``, ``units``, ``records``,
  ``failed`` (:class:`encoder.Failure` dicts), ``cached_before`` (units a killed run had finished), ``encoded``
  (units encoded by this run), ``seconds``, ``units_per_second`` (of the units encoded by this run, start-up and
  compilation included), ``steady_units_per_second`` (between the first and the last unit this run encoded) and
  ``already_built``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top

  from onestory_jax.data.multishot import encoder  # pylint: disable=g-import-not-at-top
  from onestory_jax.data.multishot import layout  # pylint: disable=g-import-not-at-top
  from onestory_jax.data.multishot import multishot_dataset_builder as mdb  # pylint: disable=g-import-not-at-top

  if augmentations < 1:
    raise ValueError(f"--augmentations must be >= 1, got {augmentations}")
  if dtype not in layout.STORED_DTYPES:
    raise ValueError(f"--dtype must be one of {layout.STORED_DTYPES}, got {dtype!r}")
  check_pretrained(config)
  lines = encoder.read_manifest(manifest)
  check_units(lines, manifest, config)
  tfds.disable_progress_bar()
  cache_dir = cache_dir or os.path.join(out, "cache", name)
  settings = encoder.BuildSettings(
      manifest=os.fspath(manifest),
      config=config,
      dinov2=dinov2,
      clip=clip,
      augmentations=int(augmentations),
      dtype=dtype,
      seed=int(seed),
      cache_dir=os.fspath(cache_dir),
  )
  encoder.check_release(settings)
  fp = encoder.fingerprint(settings)
  settings = encoder.BuildSettings(**{**settings.__dict__, "fingerprint": fp})
  manifest_digest = hashlib.sha256("\n".join(l.strip() for l in lines).encode()).hexdigest()[:24]
  build_dir = epath.Path(out) / mdb.NAME / name
  dataset_dir = build_dir / mdb.VERSION
  summary = {"dataset_dir": os.fspath(dataset_dir), "units": len(lines)}

  if (dataset_dir / "dataset_info.json").exists():
    meta = json.loads((dataset_dir / "metadata.json").read_text())
    if meta.get("fingerprint") == fp and meta.get("manifest_digest") == manifest_digest:
      failed = meta.get("failed", [])
      return dict(
          summary,
          records=len(lines) - len(failed),
          failed=failed,
          cached_before=0,
          encoded=0,
          seconds=0.0,
          units_per_second=0.0,
          steady_units_per_second=0.0,
          already_built=True,
      )
    if not overwrite:
      raise ValueError(
          f"--out={out} holds a build {name!r} of other inputs (another manifest, config, weights or build flag): "
          f"pass --overwrite to replace it, or --name / --out for a new one"
      )
    dataset_dir.rmtree()
  if build_dir.exists():  # what a killed TFDS run leaves: its incomplete.* directory
    for stale in build_dir.iterdir():
      if stale.name.startswith("incomplete"):
        stale.rmtree()

  cache = encoder.UnitCache(settings.cache_dir)
  cache.clear_failures()  # failures are retried on every run
  wanted = {i: encoder.unit_digest(settings, line) for i, line in enumerate(lines)}
  finished = cache.done()
  cached_before = sum(f"{i:09d}-{d}.npz" in finished for i, d in wanted.items())
  if cached_before:
    logging.info("Resuming: %d of %d story units were encoded already (%s)", cached_before, len(lines), cache_dir)

  builder = mdb.make_builder(
      os.fspath(out),
      mdb.MultiShotConfig(name=name, settings=settings, num_units=len(lines), manifest_digest=manifest_digest),
  )
  options = pipeline_options.PipelineOptions(flags=list(beam_args))
  start = time.time()
  try:
    with Progress(cache, wanted, cached_before, progress):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(beam_options=options))
  except Exception as e:  # pylint: disable=broad-except
    failed = cache.failures()
    if failed and len(failed) == len(lines):
      raise AllFailed([dataclasses.asdict(f) for f in failed]) from e
    raise
  seconds = time.time() - start
  meta = json.loads((dataset_dir / "metadata.json").read_text())
  failed = meta.get("failed", [])
  (build_dir / "failed.jsonl").write_text("".join(json.dumps(f) + "\n" for f in failed))
  encoded = len(lines) - cached_before - len(failed)
  # Steady rate: between the first and the last unit this run finished (compilation and start-up left out).
  stamps = sorted(
      p.stat().mtime for p in (cache.path(i, d) for i, d in wanted.items()) if p.name not in finished and p.exists()
  )
  steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 2 and stamps[-1] > stamps[0] else 0.0
  if not keep_cache:
    cache.remove()
  return dict(
      summary,
      records=len(lines) - len(failed),
      failed=failed,
      cached_before=cached_before,
      encoded=encoded,
      seconds=round(seconds, 3),
      units_per_second=round(encoded / seconds, 4) if seconds > 0 else 0.0,
      steady_units_per_second=round(steady, 4),
      already_built=False,
  )


class AllFailed(RuntimeError):
  """No story unit could be encoded, so there is nothing to write."""

  def __init__(self, failed: list[dict]):
    super().__init__(f"none of the {len(failed)} story units could be encoded")
    self.failed = failed


def failure_line(f: dict) -> str:
  where = f"shot {f['shot']} " if f.get("shot") is not None else ""
  return (
      f"skipped unit {f['unit']} (manifest line {f['index'] + 1}, {f['source']}): {where}{f['reason']}: {f['message']}"
  )


def main(argv):
  del argv  # logs.run: no positional arguments
  for flag in (_CURATED, _PRETRAINED, _OUT):
    if not flag.value:
      raise ValueError(f"--{flag.name} is required")
  if not _RUNNER.value:
    raise ValueError("--runner must name a Beam runner")
  beam_args = [f"--runner={_RUNNER.value}"] + BEAM_ARGS
  check_beam_args(beam_args)
  config = load_config()
  config.pretrained = os.path.abspath(_PRETRAINED.value)
  name = _NAME.value or str(config.get("variant", "default"))
  if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
    raise ValueError(f"--name={name!r}: use letters, digits, '_', '-' and '.'")
  with locks.exclusive(_OUT.value, "--out"):
    try:
      summary = build(
          manifest=manifest_path(_CURATED.value),
          config=config,
          out=_OUT.value,
          name=name,
          dinov2=_DINOV2.value,
          clip=_CLIP.value,
          augmentations=_AUGMENTATIONS.value,
          dtype=_DTYPE.value,
          seed=_SEED.value,
          cache_dir=_CACHE_DIR.value,
          beam_args=beam_args,
          keep_cache=_KEEP_CACHE.value,
          overwrite=_OVERWRITE.value,
          progress=_PROGRESS.value,
      )
    except AllFailed as e:
      for f in e.failed:
        print(failure_line(f), file=sys.stderr)
      print(str(e), file=sys.stderr, flush=True)
      sys.exit(1)
    except ValueError as e:  # logs.run prints an error's first line: a config mismatch lists its fields below it
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]
      if len(lines) > 1:
        raise ValueError(" ".join(lines)) from e
      raise
  for f in summary["failed"]:
    print(failure_line(f), file=sys.stderr)
  reasons = {}
  for f in summary["failed"]:
    reasons[f["reason"]] = reasons.get(f["reason"], 0) + 1
  if summary["already_built"]:
    print(f"Already built: {summary['records']} records of {summary['units']} story units in {summary['dataset_dir']}")
    return
  print(
      f"Built {summary['records']} records of {summary['units']} story units (skipped: {reasons or 'none'}; "
      f"resumed with {summary['cached_before']} done); encoded {summary['encoded']} units in "
      f"{summary['seconds']:.1f} s ({summary['units_per_second']:.3f} units/s, "
      f"{summary['steady_units_per_second']:.3f} after the first); wrote {summary['dataset_dir']}"
  )


def quiet_beam_import() -> None:
  """Apache Beam warns on import that its BigQuery client is missing (the ``gcp`` extra, which only Dataflow needs);
  the command leaves that line out."""
  py_logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())


def run() -> None:
  """The entry point: Beam's pipeline options are split off the command line before absl parses the rest."""
  global BEAM_ARGS
  quiet_beam_import()
  known = set(flags.FLAGS) | {"help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok"}
  sys.argv, BEAM_ARGS = split_argv(sys.argv, known)
  logs.run(main, bad_input=(locks.InUse, ValueError, OSError))


if __name__ == "__main__":
  run()
