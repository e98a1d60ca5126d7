"""Checkpoints: orbax managers for training state (+ grain iterator + config), and the parameter-only export.

* Training checkpoints live in ``WORKDIR/checkpoints/<step>/`` with three items: ``state`` (the TrainState,
  restored straight into its sharded layout, also on another mesh, device count or process count; every saved leaf
  is a global array, so multi-process runs save it whole), ``data`` (the grain iterator state, so the next batch after resume
  is the identical one) and ``config`` (JSON). Saves are asynchronous and atomic (orbax writes to a temporary
  directory and renames it when complete), so an interrupted run never leaves a half-written step behind.
* An exported checkpoint (``DIR/config.json`` + ``DIR/params/``) holds only the model parameters; the demo
  checkpoint shipped in ``onestory_jax/assets/demo_checkpoint`` is one. Only orbax and JSON are ever loaded.
* Sampling and exports read only the parameters of a training checkpoint (no optimiser state), onto the sampling
  mesh (:func:`sharding.inference_mesh`), never the training mesh: :func:`load_for_sampling`, :func:`export_params`.

Faults (docs/faults.md). :class:`TrainCheckpoints` is the training loop's side of this:

* A step that cannot be read (cut data files, missing metadata, an unparsable iterator state) is named with the
  reason in one line and moved aside to ``WORKDIR/checkpoints.unreadable/<step>/`` (never deleted), and the step
  before it is restored, down to the first. With nothing readable left the run does not start afresh on its own:
  it stops (:class:`NoReadableCheckpoint`) until the user moves ``checkpoints.unreadable/`` away. A checkpoint
  that reads but does not fit the run's model or optimiser is no fault of the checkpoint: the run stops with
  :class:`CheckpointMismatch` and leaves it in place. Sampling and exports from a workdir fall back the same way but
  never move anything: they only read a workdir.
* An asynchronous save that fails (disk full, permissions, quota) stops the run at the next step with
  :class:`SaveFailed`, one line naming the path and the cause; orbax leaves the failed step as a temporary directory
  that restore ignores, so the last committed checkpoint stays the one to resume from.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
from typing import Any, Callable, TypeVar

from absl import logging
from etils import epath
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from onestory_jax import logs
from onestory_jax import next_shot
from onestory_jax import sampler
from onestory_jax import sharding

DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo_checkpoint")
UNREADABLE = "checkpoints.unreadable"  # WORKDIR/<this>/<step>/: the steps that could not be read, moved aside
T = TypeVar("T")


class CheckpointMismatch(ValueError):
  """A readable checkpoint whose state does not fit the run's model or optimiser (the config changed)."""


class NoReadableCheckpoint(ValueError):
  """Every checkpoint of a workdir was unreadable and moved aside; a fresh start waits for the user."""


class SaveFailed(RuntimeError):
  """A checkpoint save failed; the message names the path, the cause and the last committed step."""


def error_reason(e: BaseException) -> str:
  """One line: the innermost cause of ``e`` (orbax wraps tensorstore's error in a dump of the whole spec)."""
  while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
    e = e.__cause__ if e.__cause__ is not None else e.__context__
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else '(no message)'}"


def _all_processes(ok: bool) -> bool:
  """True iff ``ok`` holds on every JAX process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _leaf_name(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _check_fits(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises CheckpointMismatch if the saved state of ``step`` has other leaves or shapes than ``abstract_state``.

  Reading the metadata may itself fail (a missing or cut ``_METADATA``): that error propagates as the step's
  unreadability.
  """
  state_dir = _step_dir(mngr, step) / "state"
  meta = ocp.StandardCheckpointHandler().metadata(state_dir)
  is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)  # saved as raw key data: shape differs
  leaves = jax.tree_util.tree_leaves_with_path
  wanted = {_leaf_name(p): (None if is_key(x) else tuple(x.shape)) for p, x in leaves(abstract_state)}
  saved = {_leaf_name(p): tuple(x.shape) for p, x in leaves(meta)}
  diffs = [f"{k}: not in the checkpoint" for k in sorted(wanted.keys() - saved.keys())]
  diffs += [f"{k}: in the checkpoint, not in the run" for k in sorted(saved.keys() - wanted.keys())]
  diffs += [
      f"{k}: checkpoint {saved[k]}, run {wanted[k]}"
      for k in sorted(wanted.keys() & saved.keys())
      if wanted[k] is not None and saved[k] != wanted[k]
  ]
  diffs.sort(key=lambda d: not d.startswith("params."))  # stable: the model's parameters first, then the optimiser's
  if diffs:
    raise CheckpointMismatch(
        f"checkpoint {step} in {mngr.directory} was saved by a run with another model or optimiser "
        f"({len(diffs)} differences, e.g. {'; '.join(diffs[:3])}); resume with the config it was saved with "
        f"(--config.* as in {_step_dir(mngr, step) / 'config'}) or use another --workdir"
    )


def _step_dir(mngr: ocp.CheckpointManager, step: int) -> epath.Path:
  return ocp.step.build_step_path(mngr.directory, ocp.step.standard_name_format(), step)


def _committed_steps(directory: epath.Path) -> list[int]:
  """The committed steps in ``directory`` as the file system has them now (orbax's own list may lag behind)."""
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def latest_readable(
    steps: list[int], read: Callable[[int], T], where: str, on_unreadable: Callable[[int, str], str]
) -> tuple[int, T] | None:
  """``(step, read(step))`` for the latest of ``steps`` that every process can read, or None.

  A step that fails on any process is reported in one warning (``where``, the step, the reason, and what
  ``on_unreadable(step, reason)`` did with it, which it returns as text) and the one before is tried.
  :class:`CheckpointMismatch` is not unreadability: it propagates.
  """
  with contextlib.ExitStack() as quiet:
    failed = False
    for step in sorted(steps, reverse=True):
      value, reason = None, None
      try:
        value = read(step)
      except CheckpointMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-exception-caught  (any reason a step cannot be read)
        reason = error_reason(e)
      if _all_processes(reason is None):
        if failed:
          gc.collect()  # a failed read's abandoned coroutines finalise now, while muted
        return step, value
      if not failed:
        quiet.enter_context(logs.muted_abandoned_io())  # orbax leaves the failed read's other reads behind
        failed = True
      reason = reason or "another process could not read it"
      done = on_unreadable(step, reason)
      logging.warning("Checkpoint %d in %s cannot be read (%s); %s", step, where, reason, done)
  return None


class TrainCheckpoints:
  """The training loop's checkpoints in ``WORKDIR/checkpoints``: restore with fallback, saves that fail stop the run.

  Saves are asynchronous (orbax); :meth:`check` (every step) and :meth:`save` raise :class:`SaveFailed` as soon as
  an earlier save is known to have failed, and :meth:`close` waits for the last one to commit.
  """

  def __init__(self, workdir: str, config):
    self.workdir = os.path.abspath(workdir)
    self.mngr = checkpoint_manager(workdir, config)
    self._keep = config.keep_checkpoints
    self._pending: int | None = None  # the step of the save that may still be in flight

  def restore(self, abstract_state: Any, data_iter=None) -> tuple[int, Any] | None:
    """``(step, state)`` of the latest readable checkpoint, moving unreadable later ones aside; None: fresh start.

    Raises:
      CheckpointMismatch: the latest checkpoint does not fit ``abstract_state``.
      NoReadableCheckpoint: no checkpoint is readable and some were moved aside (now or by an earlier run).
    """

    def read(step):
      _check_fits(self.mngr, step, abstract_state)
      return restore_checkpoint(self.mngr, step, abstract_state, data_iter)

    found = latest_readable(self.mngr.all_steps(), read, self.mngr.directory, self._move_aside)
    aside = epath.Path(self.workdir) / UNREADABLE
    if found is None and aside.exists() and any(aside.iterdir()):
      raise NoReadableCheckpoint(
          f"--workdir={self.workdir}: no readable checkpoint is left; the unreadable ones are in {aside} (each with "
          f"the reason in UNREADABLE.txt). To start afresh from step 0, move {aside} away and run the same command"
      )
    return found

  def _move_aside(self, step: int, reason: str) -> str:
    src, root = _step_dir(self.mngr, step), epath.Path(self.workdir) / UNREADABLE
    dst, n = root / str(step), 0
    while dst.exists():
      n += 1
      dst = root / f"{step}.{n}"
    if jax.process_index() == 0:
      root.mkdir(parents=True, exist_ok=True)
      src.rename(dst)
      (dst / "UNREADABLE.txt").write_text(reason + "\n")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    self.mngr.reload()
    return f"moved it to {dst} and trying the one before"

  def bytes_needed(self, abstract_state: Any) -> tuple[int, int]:
    """(bytes of one checkpoint's train state, uncompressed; bytes the workdir needs: ``keep_checkpoints`` of them
    plus the one being written)."""
    one = sum(
        math.prod(x.shape) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(abstract_state)
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    )
    return one, one * (self._keep + 1)

  def log_disk_need(self, abstract_state: Any) -> None:
    """Logs what the workdir needs (:meth:`bytes_needed`); warns when a local disk has less free space."""
    one, need = self.bytes_needed(abstract_state)
    logging.info(
        "Checkpoints: %.1f MiB of train state each (before compression); keep_checkpoints=%d plus the one being "
        "written need up to %.1f MiB in %s",
        one / 2**20,
        self._keep,
        need / 2**20,
        self.mngr.directory,
    )
    if "://" not in self.workdir:
      free = shutil.disk_usage(self.workdir).free
      if free < need:
        logging.warning(
            "%s has %.1f MiB free, less than the %.1f MiB that the checkpoints may need",
            self.workdir,
            free / 2**20,
            need / 2**20,
        )

  def save(self, step: int, state: Any, data_iter, config) -> None:
    """Starts the asynchronous save of ``step`` once the previous one has committed (orbax waits for it anyway)."""
    self._guard(self.mngr.wait_until_finished)  # a failure here is the previous save's
    self._pending = step
    self._guard(lambda: save_checkpoint(self.mngr, step, state, data_iter, config))

  def check(self) -> None:
    """Raises SaveFailed if a save has failed since the last call."""
    self._guard(self.mngr.check_for_errors)

  def close(self) -> None:
    """Waits for the last save to commit, then closes the manager."""
    self._guard(self.mngr.wait_until_finished)
    self.mngr.close()

  def _guard(self, fn: Callable[[], Any]) -> None:
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-exception-caught  (whatever the storage raised)
      reason = error_reason(e)
      with logs.muted_abandoned_io():
        for drain in (self.mngr.wait_until_finished, self.mngr.close):  # let the other writes end before reporting
          try:
            drain()
          except Exception:  # pylint: disable=broad-exception-caught  (the same failure again)
            pass
        gc.collect()  # the abandoned coroutines finalise now, while muted
      committed = _committed_steps(epath.Path(self.mngr.directory))
      last = (
          f"checkpoint {committed[-1]} ({_step_dir(self.mngr, committed[-1])}) is the last committed one and the "
          "same command resumes from it"
          if committed
          else "no checkpoint has committed yet"
      )
      raise SaveFailed(
          f"Saving checkpoint {self._pending} in {self.mngr.directory} failed ({reason}); training stopped, "
          f"{last} once the cause is fixed"
      ) from e


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True, enable_async_checkpointing=True
  )
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter, config) -> None:
  mngr.save(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iter),
          config=ocp.args.JsonSave(json.loads(config.to_json())),
      ),
  )


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter=None) -> Any:
  """The TrainState of ``step``, restored straight into the shardings of ``abstract_state``; ``data_iter`` resumes.

  The state may have been saved on any mesh shape, device count or process count: orbax reads each target shard
  from the saved global arrays. grain saves one iterator state per process (``data/process_<i>-of-<n>.json``);
  with the same process count each process takes its own. With another process count the iterator is set to the
  state that every saving process had in common, which :mod:`onestory_jax.data.pipeline` makes valid for any count
  (see :func:`_common_data_state`).

  Raises:
    CheckpointMismatch: the process count changed and the saved iterator states differ between processes.
  """
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  common = None
  if data_iter is not None:
    common = _common_data_state(mngr, step)
    if common is None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  state = mngr.restore(step, args=ocp.args.Composite(**items)).state
  if common is not None:
    data_iter.set_state(json.loads(common))
    logging.warning(
        "Checkpoint %d was saved by another number of processes than %d; every process resumes the data "
        "stream at the saved position (same samples per global batch, in another order within it)",
        step,
        jax.process_count(),
    )
  return state


def _common_data_state(mngr: ocp.CheckpointManager, step: int) -> str | None:
  """The grain iterator state for this process when the process count changed since ``step`` was saved, else None.

  :func:`onestory_jax.data.pipeline.make_train_dataset` shards the sample stream by index (process ``p`` of ``n``
  takes samples ``p, p + n, ...`` and batches ``batch_size / n`` of them), so after ``k`` steps every process stands
  at its local batch ``k``, the state saved by each is the same, and global batch ``k`` is samples
  ``[k * batch_size, (k + 1) * batch_size)`` whatever ``n``: that common state is also right for a new count.
  """
  data_dir = ocp.step.build_step_path(mngr.directory, ocp.step.standard_name_format(), step) / "data"
  own = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if own.exists():
    return None
  saved = sorted(data_dir.glob("process_*-of-*.json"))
  states = {f.read_text().strip() for f in saved}
  if len(states) != 1:
    raise CheckpointMismatch(
        f"{data_dir}: no data iterator state for process {jax.process_index()} of "
        f"{jax.process_count()}, and the {len(saved)} saved ones ({', '.join(f.name for f in saved)}) "
        "differ, so none of them fits another process count; resume with the process count that "
        "saved the checkpoint"
    )
  return states.pop()


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
  """A config from its JSON form (lists become tuples again)."""

  def fix(x):
    if isinstance(x, dict):
      return {k: fix(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(fix(v) for v in x)
    return x

  return ml_collections.ConfigDict(fix(d))


def _checkpoints_dir(workdir: str) -> str:
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(path):
    raise ValueError(f"--workdir={workdir}: no checkpoints directory at {path}")
  return path


def _read_config(mngr: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  return config_from_dict(mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)


def _read_latest(workdir: str, read: Callable[[ocp.CheckpointManager, int], T]) -> tuple[int, T]:
  """``(step, read(mngr, step))`` for the latest checkpoint of ``workdir`` that reads; unreadable later ones are
  reported and skipped, never moved (a reader does not own the workdir)."""
  path = _checkpoints_dir(workdir)
  mngr = ocp.CheckpointManager(path)
  try:
    found = latest_readable(
        mngr.all_steps(),
        lambda step: read(mngr, step),
        path,
        lambda step, reason: "using the one before (the next training run in the workdir moves it aside)",
    )
  finally:
    mngr.close()
  if found is None:
    raise ValueError(f"--workdir={workdir}: {path} holds no readable finished checkpoint")
  return found


def load_config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The config saved with the latest readable checkpoint of ``workdir``."""
  return _read_latest(workdir, _read_config)[1]


def _read_params(
    mngr: ocp.CheckpointManager, step: int
) -> tuple[ml_collections.ConfigDict, next_shot.System, Any, Any]:
  """The config of ``step``, its system and sampling mesh (:func:`_sampling_layout`), and the parameters on it."""
  config = _read_config(mngr, step)
  system, mesh, abstract = _sampling_layout(config)
  return config, system, mesh, restore_params(mngr, step, abstract)


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
  """The parameters of the train state saved at ``step``, restored into ``abstract_params`` (a tree of
  ``jax.ShapeDtypeStruct`` with shardings); the optimiser state is not read."""
  item = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
  )
  return mngr.restore(step, args=ocp.args.Composite(state=args)).state["params"]


def _sampling_layout(config) -> tuple[next_shot.System, jax.sharding.Mesh, Any]:
  """The system of ``config``, the sampling mesh, and the model's abstract parameters sharded over it."""
  system = next_shot.make_system(config)
  mesh = sharding.inference_mesh(config)
  boxed = jax.eval_shape(system.init_params, jax.random.key(0))
  return (
      system,
      mesh,
      sharding.with_shardings(sharding.strip_boxes(boxed), sharding.fitted_shardings(boxed, mesh, config)),
  )


def export_params(workdir: str, out_dir: str, sample: dict | None = None) -> None:
  """Writes the latest parameters of ``workdir`` (no optimiser state) and its config to ``out_dir``.

  ``sample`` optionally replaces fields of the exported config's ``sample`` section (the sampler settings that
  ``sample`` uses by default, e.g. ``{"shift": 3.0}``); training fields are exported as trained.
  """
  step, (config, _, _, params) = _read_latest(workdir, _read_params)
  for key, value in (sample or {}).items():
    if value is None:
      continue
    current = config.sample.get(key, sampler.ADDED_SETTINGS.get(key))  # or a field newer than the run's config
    if current is None:
      raise ValueError(f"export: config.sample has no field {key!r}; fields: {sorted(config.sample)}")
    config.sample[key] = type(current)(value)
  os.makedirs(out_dir, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(os.path.abspath(out_dir), "params"), params, force=True)
  ckptr.wait_until_finished()
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))
  with open(os.path.join(out_dir, "step.txt"), "w") as f:
    f.write(f"{step}\n")


def _exported_params_dir(path: str) -> str:
  params_dir = os.path.join(os.path.abspath(path), "params")
  if not os.path.isdir(params_dir):
    raise ValueError(
        f"{path}: not an exported checkpoint (no params/ directory); write one with "
        "python -m onestory_jax.checkpoints export --workdir=WORKDIR --out=DIR"
    )
  return params_dir


def exported_param_shapes(path: str) -> Any:
  """The parameter tree of the export ``path`` as ``jax.ShapeDtypeStruct`` leaves (metadata only, nothing loaded)."""
  meta = ocp.StandardCheckpointer().metadata(_exported_params_dir(path)).item_metadata
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), dict(meta))


def restore_exported_params(path: str, abstract_params: Any) -> Any:
  """The parameters of the exported checkpoint ``path`` (``path/params``), restored into ``abstract_params``.

  ``abstract_params`` is a tree of ``jax.ShapeDtypeStruct`` (with a ``sharding`` to restore straight into a sharded
  layout). Only orbax is read.

  Raises:
    ValueError: ``path`` is not an export, or its parameters differ from ``abstract_params`` in names or shapes
      (every difference is listed).
  """
  params_dir = _exported_params_dir(path)
  shapes = lambda tree: {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  saved, wanted = shapes(exported_param_shapes(path)), shapes(abstract_params)
  diffs = [f"{k}: missing from the export" for k in sorted(wanted.keys() - saved.keys())]
  diffs += [f"{k}: in the export, not in the run's model" for k in sorted(saved.keys() - wanted.keys())]
  diffs += [
      f"{k}: export has shape {saved[k]}, the run's model {wanted[k]}"
      for k in sorted(wanted.keys() & saved.keys())
      if saved[k] != wanted[k]
  ]
  if diffs:
    plural = "s" if len(diffs) > 1 else ""
    raise ValueError(
        f"{params_dir} does not fit the run's model ({len(diffs)} difference{plural}; the export's "
        "config.json holds the sizes it was trained with):\n  " + "\n  ".join(diffs[:20])
    )
  return ocp.StandardCheckpointer().restore(params_dir, abstract_params)


def load_for_sampling(path: str | None) -> tuple[next_shot.System, Any, dict]:
  """(System, params, encoder params) from a training workdir or an exported checkpoint (default: the demo).

  Everything lands on the sampling mesh (:func:`sharding.inference_mesh`); the frozen encoders are loaded once.
  """
  path = path or DEMO_CHECKPOINT
  exported = os.path.exists(os.path.join(path, "config.json"))
  if exported:
    with open(os.path.join(path, "config.json")) as f:
      config = config_from_dict(json.load(f))
    system, mesh, abstract = _sampling_layout(config)
    params = restore_exported_params(path, abstract)
  elif path == DEMO_CHECKPOINT:
    raise ValueError(f"the shipped demo checkpoint is missing at {DEMO_CHECKPOINT}; pass --workdir")
  else:
    _, (config, system, mesh, params) = _read_latest(path, _read_params)
  return system, params, system.encoder_params(jax.random.key(0), mesh=mesh)


def main(argv):
  """``python -m onestory_jax.checkpoints export --workdir=DIR --out=DIR [--sample_shift=S ...]``: parameter-only
  export; the ``--sample_*`` flags set the exported config's default sampler settings."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if len(argv) != 2 or argv[1] != "export":
    raise ValueError(
        f"expected the command 'export', got {argv[1:]}: python -m onestory_jax.checkpoints export "
        "--workdir=DIR --out=DIR"
    )
  f = flags.FLAGS
  export_params(
      f.workdir,
      f.out,
      sample={
          "steps": f.sample_steps,
          "shift": f.sample_shift,
          "guidance": f.sample_guidance,
          "memory_guidance": f.sample_memory_guidance,
      },
  )
  print(f"Exported {flags.FLAGS.workdir} to {flags.FLAGS.out}")


if __name__ == "__main__":
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top

  _flags.DEFINE_string("workdir", None, "Training workdir to export (its latest checkpoint).")
  _flags.DEFINE_string("out", None, "Output directory (config.json + params/).")
  _flags.DEFINE_integer("sample_steps", None, "Default sampler steps of the export (default: as trained).")
  _flags.DEFINE_float("sample_shift", None, "Default sampling time shift of the export (default: as trained).")
  _flags.DEFINE_float("sample_guidance", None, "Default guidance scale of the export (default: as trained).")
  _flags.DEFINE_float(
      "sample_memory_guidance", None, "Default memory guidance scale of the export, 0 = off (default: as trained)."
  )
  _flags.mark_flags_as_required(["workdir", "out"])
  logs.run(main, positional=True)
