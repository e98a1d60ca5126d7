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
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from onestory_jax import next_shot
from onestory_jax import sharding

DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo_checkpoint")


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
    ValueError: the process count changed and the saved iterator states differ between processes.
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
    raise ValueError(
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


def _manager(workdir: str) -> tuple[ocp.CheckpointManager, int]:
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(path):
    raise ValueError(f"--workdir={workdir}: no checkpoints directory at {path}")
  mngr = ocp.CheckpointManager(path)
  step = mngr.latest_step()
  if step is None:
    raise ValueError(f"--workdir={workdir}: {path} holds no finished checkpoint")
  return mngr, step


def load_config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The config saved with the latest checkpoint of ``workdir``."""
  mngr, step = _manager(workdir)
  cfg = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  mngr.close()
  return config_from_dict(cfg)


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
  config = load_config_from_workdir(workdir)
  for key, value in (sample or {}).items():
    if value is None:
      continue
    if key not in config.sample:
      raise ValueError(f"export: config.sample has no field {key!r}; fields: {sorted(config.sample)}")
    config.sample[key] = type(config.sample[key])(value)
  _, _, abstract = _sampling_layout(config)
  mngr, step = _manager(workdir)
  params = restore_params(mngr, step, abstract)
  mngr.close()
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
  elif path == DEMO_CHECKPOINT:
    raise ValueError(f"the shipped demo checkpoint is missing at {DEMO_CHECKPOINT}; pass --workdir")
  else:
    config = load_config_from_workdir(path)
  system, mesh, abstract = _sampling_layout(config)
  if exported:
    params = restore_exported_params(path, abstract)
  else:
    mngr, step = _manager(path)
    params = restore_params(mngr, step, abstract)
    mngr.close()
  return system, params, system.encoder_params(jax.random.key(0), mesh=mesh)


def main(argv):
  """``python -m onestory_jax.checkpoints export --workdir=DIR --out=DIR [--sample_shift=S ...]``: parameter-only
  export; the ``--sample_*`` flags set the exported config's default sampler settings."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if len(argv) != 2 or argv[1] != "export":
    raise app.UsageError("usage: python -m onestory_jax.checkpoints export --workdir=DIR --out=DIR")
  f = flags.FLAGS
  export_params(
      f.workdir, f.out, sample={"steps": f.sample_steps, "shift": f.sample_shift, "guidance": f.sample_guidance}
  )
  print(f"Exported {flags.FLAGS.workdir} to {flags.FLAGS.out}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top

  _flags.DEFINE_string("workdir", None, "Training workdir to export (its latest checkpoint).")
  _flags.DEFINE_string("out", None, "Output directory (config.json + params/).")
  _flags.DEFINE_integer("sample_steps", None, "Default sampler steps of the export (default: as trained).")
  _flags.DEFINE_float("sample_shift", None, "Default sampling time shift of the export (default: as trained).")
  _flags.DEFINE_float("sample_guidance", None, "Default guidance scale of the export (default: as trained).")
  _flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
