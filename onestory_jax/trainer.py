"""OneStory training (paper Sec. 4.4): the optimiser, the sharded train state and step, and the loop.

The loss of Eq. 12 and the decoupled-conditioning warm-up are :mod:`onestory_jax.objective`; the batches of
3-shot triplets come from :mod:`onestory_jax.data.pipeline`. :func:`build_train_program` is the one definition of
the sharded state and the jitted step (frozen encoders as sharded arguments): the :class:`Trainer` runs it,
``python -m onestory_jax.plan`` compiles it for TPU topologies and ``python -m onestory_jax.benchmark`` times it.

State is a :class:`TrainState`; checkpoints (orbax, asynchronous) hold it, the grain iterator and the config, so
re-running the same command resumes exactly.

Published weights: with ``config.pretrained`` (the ``--dst`` of ``python -m onestory_jax.convert``) a fresh start
restores the Wan DiT (``params["dit"]``, converted component ``transformer``) and, for umT5, the text encoder
(``params["text_encoder"]``) straight into their shardings; Frame Selection starts fresh and the Adaptive
Conditioner's patchifiers start from the restored patch embedding (FramePack initialisation, design notes); AdamW
moments start at zero. A run that resumes from its workdir never re-reads ``config.pretrained`` for them.

Fine-tuning: with ``config.init_params`` (an exported checkpoint) a fresh start takes every parameter from it; the
run may change the Adaptive Conditioner's kernels, and a new kernel starts from the export's patch embedding.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from onestory_jax import checkpoints
from onestory_jax import chips
from onestory_jax import flops
from onestory_jax import locks
from onestory_jax import next_shot
from onestory_jax import objective
from onestory_jax import preemption
from onestory_jax import pretrained
from onestory_jax import sharding
from onestory_jax import weights
from onestory_jax.data import pipeline

NEW_MODULES = ("frame_selection", "adaptive_conditioner")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


# ---------------------------------------------------------------------------- optimiser
def param_groups(params: Any, config) -> Any:
  """'new' for the OneStory modules, 'frozen' for config.optim.frozen, 'pretrained' for the rest."""
  frozen = set(config.optim.frozen)
  unknown = frozen - set(params.keys())
  if unknown:
    raise ValueError(f"config.optim.frozen names unknown modules {sorted(unknown)}; have {sorted(params.keys())}")

  def group(name):
    return "frozen" if name in frozen else ("new" if name in NEW_MODULES else "pretrained")

  return {k: jax.tree.map(lambda _, g=group(k): g, v) for k, v in params.items()}


def learning_rate(config, base_lr: float) -> optax.Schedule:
  o = config.optim
  return optax.warmup_cosine_decay_schedule(
      0.0, base_lr, max(o.warmup_steps, 1), max(config.num_train_steps, o.warmup_steps + 1), base_lr * 0.1
  )


def make_optimizer(config, params: Any) -> optax.GradientTransformation:
  o = config.optim

  def adamw(lr):
    return optax.adamw(learning_rate(config, lr), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)

  tx = optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.multi_transform(
          {"new": adamw(o.lr), "pretrained": adamw(o.pretrained_lr), "frozen": optax.set_to_zero()},
          param_groups(params, config),
      ),
  )
  return optax.apply_if_finite(tx, config.skip_nonfinite_steps) if config.skip_nonfinite_steps else tx


def init_train_state(system: next_shot.System, config, rng: jax.Array) -> TrainState:
  """A fresh train state with boxed (logically partitioned) parameters; trace it with ``jax.eval_shape``."""
  r_init, r_state = jax.random.split(rng)
  params = system.init_params(r_init)
  plain = sharding.strip_boxes(params)
  opt_state = make_optimizer(config, plain).init(plain)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=r_state)


# ---------------------------------------------------------------------------- the step
def train_step(
    state: TrainState, batch: dict, enc: dict, *, system: next_shot.System, tx: optax.GradientTransformation
):
  """One optimiser step on :func:`objective.loss_fn`; ``enc`` holds the frozen encoders' parameters."""
  rng, step_rng = jax.random.split(state.rng)
  # Frozen collections (config.optim.frozen, e.g. the pretrained umT5) are not differentiated: no backward pass
  # through them, and their zero gradients stay out of the global-norm clipping.
  frozen = {k: jax.lax.stop_gradient(v) for k, v in state.params.items() if k in system.config.optim.frozen}
  trainable = {k: v for k, v in state.params.items() if k not in frozen}
  grad_fn = jax.value_and_grad(
      lambda p: objective.loss_fn({**frozen, **p}, system, enc, batch, step_rng, state.step), has_aux=True
  )
  (_, metrics), grads = grad_fn(trainable)
  grads = {**grads, **jax.tree.map(jnp.zeros_like, frozen)}
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.global_norm(grads)
  metrics["update_norm"] = optax.global_norm(updates)
  # optax.apply_if_finite (config.skip_nonfinite_steps) leaves the parameters as they were after a non-finite
  # gradient; any other non-finite step stops the run (the loop reads ``nonfinite``).
  skipped = ~opt_state.last_finite if isinstance(opt_state, optax.ApplyIfFiniteState) else jnp.zeros((), bool)
  finite = lambda *xs: functools.reduce(jnp.logical_and, [jnp.isfinite(x) for x in xs])
  metrics["nonfinite_skipped"] = skipped.astype(jnp.float32)
  metrics["nonfinite"] = ~finite(metrics["update_norm"]) | ~(skipped | finite(metrics["loss"], metrics["grad_norm"]))
  metrics["nonfinite"] = metrics["nonfinite"].astype(jnp.float32)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """The sharded train step of one config on one mesh, and the abstract arguments it compiles for.

  ``abstract_*`` are ``jax.ShapeDtypeStruct`` trees carrying their shardings: nothing is allocated, so ``plan``
  compiles the program for TPU topologies that are not attached.
  """

  system: next_shot.System
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  state_shardings: TrainState
  abstract_state: TrainState
  batch_sharding: jax.sharding.NamedSharding
  abstract_batch: dict
  encoder_shardings: dict
  abstract_encoders: dict
  step: Any  # jitted (state, batch, enc) -> (state, metrics); the state is donated

  def lower(self):
    """The step lowered for the abstract arguments (call ``.compile()`` on it)."""
    with sharding.use_mesh(self.mesh, self.system.config):
      return self.step.lower(self.abstract_state, self.abstract_batch, self.abstract_encoders)


def build_train_program(
    config: ml_collections.ConfigDict, system: next_shot.System, mesh: jax.sharding.Mesh
) -> TrainProgram:
  """The one builder of the sharded train state and step (trainer, ``plan`` and ``benchmark`` all use it).

  Parameters are sharded by ``config.logical_axis_rules``, AdamW's moments like their parameters, ``step`` and
  ``rng`` replicated (:func:`sharding.train_state_shardings`); the batch along the ``batch`` rule; the frozen
  encoders' parameters by the rules too, with the dimensions the mesh does not divide replicated
  (:func:`sharding.fitted_shardings`), as :meth:`next_shot.System.encoder_params` lays them out.

  Raises:
    ValueError: the global batch is not divisible by the batch mesh axes.
  """
  gb = int(config.data.batch_size)
  div = sharding.batch_divisor(mesh, config)
  if gb % div:
    raise ValueError(
        f"config.data.batch_size={gb} must be divisible by the batch mesh axes ({div} on mesh " f"{dict(mesh.shape)})"
    )
  # Outside the mesh context: some encoders make concrete keys, which cannot run on compile-only TPU devices.
  boxed_enc = system.abstract_encoder_params()
  key = jax.random.key(int(config.seed))  # concrete, so made before the mesh of compile-only devices is set
  with sharding.use_mesh(mesh, config):
    boxed = jax.eval_shape(functools.partial(init_train_state, system, config), key)
  # Outside the mesh context too: optax runs the optimiser's init on placeholders to find the moments. AdamW's
  # moments are built from unboxed parameters: shard them like their parameters, not replicated.
  tx = make_optimizer(config, sharding.strip_boxes(boxed.params))
  state_sh = sharding.train_state_shardings(boxed, tx, mesh, config)
  enc_sh = sharding.fitted_shardings(boxed_enc, mesh, config)
  batch_sh = sharding.batch_sharding(mesh, config)
  batch = {
      k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
      for k, (shape, dtype) in pipeline.batch_spec(config).items()
  }
  step = jax.jit(
      functools.partial(train_step, system=system, tx=tx),
      in_shardings=(state_sh, batch_sh, enc_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)),
      donate_argnums=(0,),
  )
  return TrainProgram(
      system=system,
      mesh=mesh,
      tx=tx,
      state_shardings=state_sh,
      abstract_state=sharding.with_shardings(sharding.strip_boxes(boxed), state_sh),
      batch_sharding=batch_sh,
      abstract_batch=batch,
      encoder_shardings=enc_sh,
      abstract_encoders=sharding.with_shardings(sharding.strip_boxes(boxed_enc), enc_sh),
      step=step,
  )


# ---------------------------------------------------------------------------- setup
class Trainer:
  """The mesh, the frozen encoders, the train program, the state's initialisation and the data of one config."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | None = None):
    self.config = config
    self.workdir = workdir
    self.mesh = sharding.make_mesh(config)
    if config.data.batch_size % jax.process_count():
      raise ValueError(
          f"config.data.batch_size={config.data.batch_size} must be divisible by the process count "
          f"({jax.process_count()})"
      )
    self.program = build_train_program(config, next_shot.make_system(config), self.mesh)
    self.system = self.program.system
    self.enc = self.system.encoder_params(jax.random.key(0), mesh=self.mesh)  # as program.encoder_shardings

  def init_state(self) -> TrainState:
    """Parameters and optimiser state initialised directly in their sharded layout.

    With ``config.init_params`` (a ``checkpoints export`` directory, e.g. the shipped demo checkpoint) every
    parameter starts from the export instead: fine-tuning, with a fresh optimiser state and step 0.

    With ``config.pretrained`` the collections of :func:`pretrained.pretrained_components` are restored from the conversion
    instead (their random initialisation is left out of the compiled init), the Adaptive Conditioner's patchifiers
    are initialised from the restored patch embedding (:func:`pretrained.framepack_patchifiers`), and every other parameter
    gets the same values as without ``config.pretrained``. The optimiser state does not depend on parameter values
    (AdamW moments are zeros).

    Raises:
      ValueError: the export does not fit the model (every differing parameter is named); the conversion is
        missing, was made from another release than the run config describes, or with another ``--scan_layers``
        setting than ``config.model.scan_layers``; the message says how to fix it.
    """
    restored = pretrained.pretrained_components(self.config)
    rng = jax.random.key(self.config.seed)
    if self.config.init_params:
      if restored:
        raise ValueError("config.init_params and config.pretrained both set: fine-tune from one or the other")
      params = self._restore_init_params(self.config.init_params)
      state = self._init_leaving_out(rng, params)  # the optimiser state only: no random parameters are made
      logging.info("Started from the exported parameters in %s", self.config.init_params)
      return state.replace(params=params)
    if not restored:
      return self._init_leaving_out(rng, ())
    for name, component in restored.items():  # fail fast, before anything compiles
      pretrained.check_release(self.config, self.system, name, component)
    state = self._init_leaving_out(rng, restored)
    with sharding.use_mesh(self.mesh, self.config):
      params = dict(state.params)
      for name, component in restored.items():
        params[name] = weights.load_converted(
            self.config.pretrained,
            component,
            self.program.abstract_state.params[name],
            self.program.state_shardings.params[name],
        )
        logging.info("Restored params[%r] from %s", name, weights.converted_path(self.config.pretrained, component))
      if "adaptive_conditioner" in params:
        params["adaptive_conditioner"] = self._framepack_patchifiers(
            params["dit"]["patch_embedding"], list(self.program.abstract_state.params["adaptive_conditioner"])
        )
      return state.replace(params=params)

  def _restore_init_params(self, path: str) -> Any:
    """The export ``path`` restored into the run's sharded layout, for fine-tuning.

    The run may change the Adaptive Conditioner's kernels (``conditioner.kernels``): a patchifier whose kernel the
    export has is restored from it, and a new one starts from the export's DiT patch embedding, as with
    ``config.pretrained`` (:func:`pretrained.framepack_patchifiers`). Every other parameter must fit the export.
    """
    name = "adaptive_conditioner"
    abstract = self.program.abstract_state.params
    saved = checkpoints.exported_param_shapes(path)
    if name not in saved or name not in abstract:
      return checkpoints.restore_exported_params(path, abstract)  # names what differs
    kernel_of = lambda tree: {tuple(p["kernel"].shape[1:3]): n for n, p in tree[name].items()}
    old, want = kernel_of(saved), kernel_of(abstract)
    if old == want:
      return checkpoints.restore_exported_params(path, abstract)
    like = abstract[name]["patchifier_0"]  # every patchifier has the same logical axes, so the same sharding
    as_saved = {
        n: {k: jax.ShapeDtypeStruct(v.shape, like[k].dtype, sharding=like[k].sharding) for k, v in p.items()}
        for n, p in saved[name].items()
    }
    params = dict(checkpoints.restore_exported_params(path, {**abstract, name: as_saved}))
    new = [n for kernel, n in want.items() if kernel not in old]
    with sharding.use_mesh(self.mesh, self.config):
      fresh = self._framepack_patchifiers(params["dit"]["patch_embedding"], new) if new else {}
    for kernel, n in want.items():
      logging.info(
          "%s/%s, kernel %s: %s",
          name,
          n,
          kernel,
          f"restored from {old[kernel]}" if kernel in old else "new, from the DiT patch embedding",
      )
    params[name] = {n: params[name][old[kernel]] if kernel in old else fresh[n] for kernel, n in want.items()}
    return params

  def _framepack_patchifiers(self, patch_embedding: Any, names: list[str]) -> dict:
    """The conditioner's patchifiers ``names`` started from the DiT's ``patch_embedding`` (FramePack,
    :func:`pretrained.framepack_patchifiers`), in their shardings; call under the run's mesh."""
    sub = lambda tree: {n: tree["adaptive_conditioner"][n] for n in names}
    return jax.jit(
        functools.partial(
            pretrained.framepack_patchifiers,
            conditioner=sub(self.program.abstract_state.params),
            latent_channels=self.system.model.latent_channels,
        ),
        out_shardings=sub(self.program.state_shardings.params),
    )(patch_embedding)

  def _init_leaving_out(self, rng: jax.Array, names) -> TrainState:
    """The state from one compiled, sharded init, without the parameter collections in ``names`` (their random
    initialisation is left out of the compiled program; the caller restores them)."""
    shardings = self.program.state_shardings.replace(
        params={k: v for k, v in self.program.state_shardings.params.items() if k not in names}
    )

    def init(r):
      state = sharding.strip_boxes(init_train_state(self.system, self.config, r))
      return state.replace(params={k: v for k, v in state.params.items() if k not in names})

    with sharding.use_mesh(self.mesh, self.config):
      return jax.jit(init, out_shardings=shardings)(rng)

  def step(self, state: TrainState, local_batch: dict) -> tuple[TrainState, dict]:
    batch = sharding.host_local_to_global(local_batch, self.mesh, self.config)
    with sharding.use_mesh(self.mesh, self.config):
      return self.program.step(state, batch, self.enc)

  def dataset(self):
    return pipeline.make_train_dataset(
        self.config,
        warmup_steps=objective.dc_warmup_steps(self.config),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        tokenizer=self.system.tokenizer,
    )


# ---------------------------------------------------------------------------- loop
class NonFinite(RuntimeError):
  """A training step gave a non-finite loss, gradient norm or update; nothing of it was saved."""

  def __init__(self, step: int, metrics: dict, last_checkpoint: int | None, workdir: str):
    values = ", ".join(f"{k}={metrics[k]:.6g}" for k in ("loss", "grad_norm", "update_norm"))
    resume = (
        f"checkpoint {last_checkpoint} is the last good state and the same command resumes from it"
        if last_checkpoint is not None
        else "no checkpoint was saved before it"
    )
    super().__init__(
        f"Non-finite step {step} ({values}); training stopped without saving it, {resume} once the cause (learning "
        f"rate, data) is fixed; --config.skip_nonfinite_steps=N skips up to N such updates in a row instead"
    )
    self.step = step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains ``config.num_train_steps`` steps, resuming from ``workdir`` if it holds a checkpoint.

  The run holds the workdir's lock (:mod:`onestory_jax.locks`, one per process index) from start to end. Resume
  takes the latest readable checkpoint and moves unreadable later ones aside (:class:`checkpoints.TrainCheckpoints`).

  Raises:
    locks.InUse: another run holds the workdir.
    preemption.Preempted: the run was told to stop (SIGTERM, or the coordination service's preemption notice); the
      checkpoint of the step it stopped after has committed.
    checkpoints.SaveFailed: a checkpoint save failed (disk full, permissions); the last committed one is intact.
    checkpoints.CheckpointMismatch, checkpoints.NoReadableCheckpoint: nothing in the workdir to resume from.
    NonFinite: a step gave a non-finite loss, gradient norm or update (and config.skip_nonfinite_steps did not skip
      it); it was not saved.
  """
  with locks.exclusive(workdir, "--workdir", name=f".lock.process_{jax.process_index()}"):
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  trainer = Trainer(config, workdir)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  data_iter = iter(trainer.dataset())
  ckpts = checkpoints.TrainCheckpoints(workdir, config)
  ckpts.log_disk_need(trainer.program.abstract_state)
  found = ckpts.restore(trainer.program.abstract_state, data_iter)
  if found is not None:  # the workdir wins: config.pretrained only seeds a fresh start
    state = found[1]
    logging.info("Resumed from step %d in %s", found[0], workdir)
  else:
    state = trainer.init_state()
    if config.pretrained:
      logging.info("Fresh start from the converted weights in %s", config.pretrained)
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
  start = int(jax.device_get(state.step))
  last_saved = found[0] if found is not None else None
  total = config.num_train_steps
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer, every_steps=config.log_every_steps)
  hooks = [report]
  # Every process samples: the sampler's jitted programs span all devices (on process 0 alone they hang). Only
  # process 0's writer writes the images; the others' only log their shapes.
  if config.sample_every_steps:
    from onestory_jax import sampler  # pylint: disable=g-import-not-at-top

    hooks.append(
        periodic_actions.PeriodicCallback(
            every_steps=config.sample_every_steps,
            callback_fn=lambda step, t, **_: sampler.write_training_samples(trainer, state_ref[0].params, writer, step),
        )
    )
  state_ref = [state]
  metrics_acc = []
  # MFU from the analytic model FLOPs (context tokens included; onestory_jax/flops.py) and the chip's peak.
  model_flops = flops.step_flops(config).model_flops
  chip = chips.of_device_kind(jax.devices()[0].device_kind)
  last_log = (start, time.perf_counter())

  def check_finite(at: int, m: dict) -> None:
    if jax.device_get(m["nonfinite"]):
      ckpts.close()  # the good saves before it commit
      raise NonFinite(at, jax.device_get(m), last_saved, workdir)

  previous = None  # the metrics of the step before
  with preemption.Watch(ckpts.mngr, jax.process_count()) as watch:
    for step in range(start + 1, total + 1):
      batch = next(data_iter)
      if step == start + 1:  # say what the first minutes are spent on
        logging.info("Step %d of %d: compiling the train step (or loading it from the compilation cache)", step, total)
        first = time.perf_counter()
      state, metrics = trainer.step(state, batch)
      state_ref[0] = state
      if step == start + 1:
        jax.block_until_ready(metrics)
        logging.info(
            "Step %d done in %.1f s; progress every %d steps", step, time.perf_counter() - first, config.log_every_steps
        )
      if previous is not None:
        # Dispatch stays at most one step ahead of the device, so steps/s and the ETA report compute, not dispatch
        # (unbounded, the host runs dozens of steps ahead and the progress swings between 2x and 0 steps/s).
        check_finite(step - 1, previous)
      previous = metrics
      ckpts.check()  # a failed asynchronous save stops the run here
      metrics_acc.append(metrics)
      for h in hooks:
        h(step)
      if step % config.log_every_steps == 0 or step == total:
        m = jax.device_get(metrics_acc)
        skipped = np.array([x.pop("nonfinite_skipped") for x in m]) > 0
        applied = [x for x, s in zip(m, skipped) if not s] or m  # a skipped step's loss is NaN: leave it out
        scalars = {k: float(np.mean([x[k] for x in applied])) for k in m[0] if k != "nonfinite"}
        if config.skip_nonfinite_steps:
          scalars["nonfinite_skipped"] = float(np.sum(skipped))
        scalars["lr"] = float(learning_rate(config, config.optim.lr)(step))
        scalars["dc_warmup"] = float(step <= objective.dc_warmup_steps(config))
        now = time.perf_counter()
        step_time = (now - last_log[1]) / max(step - last_log[0], 1)
        last_log = (step, now)
        scalars["model_tflops_per_s"] = model_flops / step_time / 1e12
        if chip is not None:
          scalars["mfu"] = flops.mfu(model_flops, step_time, jax.device_count(), chip.name)
        writer.write_scalars(step, scalars)
        metrics_acc = []
      preempted = watch.reached(step)
      if step % config.checkpoint_every_steps == 0 or step == total or preempted:
        check_finite(step, metrics)  # never save a non-finite state
        ckpts.save(step, state, data_iter, config)
        last_saved = step
      if preempted and step < total:
        ckpts.close()  # committed before the machine goes
        writer.flush()
        raise preemption.Preempted(step, os.path.join(os.path.abspath(workdir), "checkpoints", str(step)))
  ckpts.close()
  writer.flush()
  return state


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
