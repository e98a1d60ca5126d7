r"""Analytic FLOPs of one OneStory training step, peak FLOP/s per chip, and MFU.

Everything here is computed from the config alone, with nothing allocated and nothing compiled, so the trainer can
log MFU and ``python -m onestory_jax.plan`` can say what a step time would mean before any hardware is rented.

What one step computes (``onestory_jax.trainer.train_step``; paper Sec. 4.4, Eqs. 3-8 and 10-12), per sample:

* **DiT** (Wan2.1, Eq. 8) on ``L = N + C`` tokens: the shot's ``N`` noise tokens plus the ``C`` context tokens of
  the Adaptive Conditioner. The step always processes the static budget ``C = budget`` (padding included), so that
  is what is counted. Per block: self-attention projections (q, k, v, out: ``8 L D^2``), the two ``L x L`` attention
  matmuls (``4 L^2 D``), text cross-attention (q, out over ``L``; k, v over the ``Lt`` caption tokens; scores and
  values ``4 L Lt D``), for I2V the decoupled image cross-attention over the image tokens (257 CLIP tokens: k, v
  and ``4 L Li D``), and the FFN (``4 L D F``). Outside the blocks: the patch embedding, the condition embedder
  (timestep MLPs for the noise and the context timesteps, the caption MLP, the image MLP) and the output head.
* **Frame Selection** (Eqs. 3-5) over the ``2 F_lat`` memory frames, **Adaptive Conditioner** patchifiers (Eq. 7:
  every selected frame at every level, as the static-shape implementation does) and the **text encoder** (one
  caption; the null caption is computed but unused in training, so XLA removes it).
* Frozen encoders, forward only: the codec encodes the 3 shots of the triplet plus the I2V first-frame video
  (``first_frame_channels`` encodes a whole shot of zeros after the first frame), decodes one latent frame (the
  reference image of ``image_condition``), and the image encoder embeds one image. Their FLOPs are counted from the
  traced program of those encoders (the matmul and convolution FLOPs of its jaxpr, scan bodies times their length;
  :func:`traced_matmul_flops`), because the Wan VAE's chunked causal schedule has no short closed form.

Only matmuls and convolutions are counted (``2 m n k`` each, the convention of MFU): norms, RoPE, softmax,
modulation and the optimizer update are left out; they are a few percent of a large model's FLOPs, and XLA's
``cost_analysis`` counts them too (see tests/test_plan.py for the measured gap).

Training multiplies the forward FLOPs of trainable modules by 3 (forward + backward, the backward being two
matmuls per forward matmul: activations and weights). Frozen modules (``config.optim.frozen``) count once in the
model FLOPs (the trainer does not differentiate them). Rematerialisation (``config.model.remat``) re-runs
part of the DiT forward in the backward pass: ``full`` the whole blocks, ``dots`` the matmuls that have batch
dimensions (the attention score / value matmuls, which ``dots_with_no_batch_dims_saveable`` does not keep). It is
reported as ``remat_recompute`` and, as is conventional (PaLM's MFU), not counted in MFU.

MFU = model FLOPs per step / (step time x chips x peak dense bf16 FLOP/s per chip), :func:`mfu`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

from onestory_jax import chips


# --------------------------------------------------------------------------------------------- MFU
def mfu(step_flops: float, step_time_s: float, num_chips: int, chip: str) -> float:
  """Model FLOPs utilisation: ``step_flops / (step_time_s * num_chips * peak(chip))``.

  Args:
    step_flops: model FLOPs of one global step (:attr:`StepFlops.model_flops`).
    step_time_s: wall time of one step, seconds.
    num_chips: chips that run the step.
    chip: a chip name of :mod:`onestory_jax.chips` ('v5p', 'h100', ...).
  """
  if not step_time_s > 0:
    raise ValueError(f"mfu: step_time_s must be > 0, got {step_time_s!r}")
  if int(num_chips) < 1:
    raise ValueError(f"mfu: num_chips must be >= 1, got {num_chips!r}")
  return float(step_flops) / (float(step_time_s) * int(num_chips) * chips.get(chip).peak_bf16_flops)


def matmul_flops_per_sec(n: int | None = None, repeats: int = 5, dtype=jnp.float32) -> float:
  """Measured dense matmul throughput of the default device: a jitted ``n^3`` matmul of random ``dtype`` operands,
  the best of ``repeats`` (the peak that the benchmarks report their achieved FLOP/s against). ``n`` defaults to
  2048 on CPU and 8192 on accelerators (2048^3 leaves an H100 mostly idle)."""
  if n is None:
    n = 2048 if jax.default_backend() == "cpu" else 8192
  a, b = (jax.random.normal(k, (n, n), dtype) for k in jax.random.split(jax.random.key(0)))
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = np.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n**3 / best


# --------------------------------------------------------------------------------------------- traced counts
def _dot_general_flops(eqn) -> float:
  lhs, rhs = (v.aval for v in eqn.invars)
  (_, rc), (_, rb) = eqn.params["dimension_numbers"]
  rhs_free = [d for i, d in enumerate(rhs.shape) if i not in set(rc) | set(rb)]
  return 2.0 * float(np.prod(lhs.shape)) * float(np.prod(rhs_free))


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
  per_output = float(np.prod(rhs.shape)) / rhs.shape[out_feature_dim]  # kernel volume x input features per group
  return 2.0 * float(np.prod(out.shape)) * per_output / eqn.params.get("batch_group_count", 1)


def _sub_jaxprs(value: Any):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_matmul_flops(jaxpr: jex_core.Jaxpr) -> float:
  """Matmul + convolution FLOPs of a jaxpr: ``dot_general`` and ``conv_general_dilated``, ``2 m n k`` each.

  Nested jaxprs are followed: ``scan`` bodies count ``length`` times, ``cond`` its most expensive branch, every
  other nested jaxpr (jit, remat, custom_jvp / custom_vjp) once. ``while`` loops have no static trip count and
  raise.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "while":
      raise ValueError("jaxpr_matmul_flops: a while loop has no static trip count; trace a program without one")
    elif name == "cond":
      total += max(jaxpr_matmul_flops(b) for b in _sub_jaxprs(eqn.params["branches"]))
    else:
      mult = float(eqn.params["length"]) if name == "scan" else 1.0
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += mult * jaxpr_matmul_flops(sub)
  return total


def traced_matmul_flops(fn: Callable[..., Any], *args: Any) -> float:
  """Matmul + convolution FLOPs of ``fn(*args)`` from its traced program (``args`` may be ShapeDtypeStructs)."""
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# --------------------------------------------------------------------------------------------- the model
@dataclasses.dataclass(frozen=True)
class Shapes:
  """The sizes of one training step that the FLOPs depend on, read from a config (:func:`shapes_of`)."""

  batch: int  # global batch
  noise_tokens: int  # N, per shot
  context_tokens: int  # C, the Adaptive Conditioner's static budget
  latent_shape: tuple[int, int, int, int]  # (F_lat, h, w, c) of one shot
  in_channels: int  # DiT input channels (noise + I2V mask + first-frame latent)
  out_channels: int
  text_len: int
  text_dim: int
  image_tokens: int  # 0 without I2V
  image_dim: int
  memory_frames: int  # Frame Selection's memory: the two memory shots of the triplet


def shapes_of(config) -> Shapes:
  """Reads :class:`Shapes` from a run config (cheap: builds the codec and image encoder descriptions only)."""
  from onestory_jax.models import adaptive_conditioner as ac  # pylint: disable=g-import-not-at-top
  from onestory_jax.models import codec as codec_lib  # pylint: disable=g-import-not-at-top
  from onestory_jax.models import image_encoder as image_encoder_lib  # pylint: disable=g-import-not-at-top
  from onestory_jax.models import onestory as onestory_lib  # pylint: disable=g-import-not-at-top
  from onestory_jax.models.wan import umt5 as te  # pylint: disable=g-import-not-at-top

  d, m = config.data, config.model
  codec = codec_lib.make_codec(config)
  f, h, w, c = codec.latent_shape(d.frames_per_shot, d.height, d.width)
  pt, ph, pw = (int(v) for v in m.patch_size)
  if f % pt or h % ph or w % pw:
    raise ValueError(f"config.model.patch_size={tuple(m.patch_size)} does not divide the latent grid {(f, h, w)}")
  image = image_encoder_lib.make_image_encoder(config)
  i2v = bool(m.i2v)
  return Shapes(
      batch=int(d.batch_size),
      noise_tokens=(f // pt) * (h // ph) * (w // pw),
      context_tokens=ac.budget_tokens((h, w), m.patch_size, config.conditioner.budget_frames),
      latent_shape=(f, h, w, c),
      in_channels=onestory_lib.dit_in_channels(c, codec.mask_channels, i2v),
      out_channels=c,
      text_len=int(d.text_len),
      text_dim=te.text_dim(config),
      image_tokens=image.num_tokens(d.height, d.width) if i2v else 0,
      image_dim=image.token_dim(d.height, d.width),
      memory_frames=2 * f,
  )


def dit_forward_flops(config, s: Shapes | None = None) -> dict[str, float]:
  """Forward FLOPs of the DiT for one sample, by part (the keys sum to the total)."""
  s = s or shapes_of(config)
  m = config.model
  dim, ffn, layers = int(m.dim), int(m.ffn_dim), int(m.num_layers)
  pt, ph, pw = (int(v) for v in m.patch_size)
  n, lt, li = s.noise_tokens, s.text_len, s.image_tokens
  seq = n + s.context_tokens
  times = 2 if s.context_tokens else 1  # noise and context timesteps through the time MLPs
  out = {
      "patch_embedding": 2.0 * n * pt * ph * pw * s.in_channels * dim,
      "condition_embedder": (
          2.0 * times * (int(m.freq_dim) * dim + dim * dim + dim * 6 * dim)
          + 2.0 * lt * (s.text_dim * dim + dim * dim)
          + (2.0 * li * (s.image_dim * s.image_dim + s.image_dim * dim) if li else 0.0)
      ),
      "self_attention_proj": layers * 8.0 * seq * dim * dim,
      "self_attention_scores": layers * 4.0 * seq * seq * dim,
      "text_cross_attention": layers * (4.0 * seq * dim * dim + 4.0 * lt * dim * dim + 4.0 * seq * lt * dim),
      "image_cross_attention": layers * (4.0 * li * dim * dim + 4.0 * seq * li * dim),
      "ffn": layers * 4.0 * seq * dim * ffn,
      "head": 2.0 * n * dim * s.out_channels * pt * ph * pw,
  }
  return out


def dit_remat_flops(config, s: Shapes | None = None) -> float:
  """Forward FLOPs that ``config.model.remat`` recomputes in the backward pass, per sample."""
  parts = dit_forward_flops(config, s)
  s = s or shapes_of(config)
  policy = config.model.remat
  if policy == "none":
    return 0.0
  blocks = ("self_attention_proj", "self_attention_scores", "text_cross_attention", "image_cross_attention", "ffn")
  if policy == "full":
    return sum(parts[k] for k in blocks)
  if policy == "dots":  # matmuls with batch dimensions: attention scores and values (self, text, image)
    seq, dim, layers = s.noise_tokens + s.context_tokens, int(config.model.dim), int(config.model.num_layers)
    return layers * 4.0 * seq * dim * (seq + s.text_len + s.image_tokens)
  raise ValueError(f"config.model.remat: unknown policy {policy!r}; expected 'none', 'full' or 'dots'")


def frame_selection_flops(config, s: Shapes | None = None) -> float:
  """Forward FLOPs of Frame Selection (Eqs. 3-5) for one sample."""
  s = s or shapes_of(config)
  dim, q = int(config.model.dim), int(config.selection.num_queries)
  fm, (_, h, w, c), lt = s.memory_frames, s.latent_shape, s.text_len
  h1, w1 = math.ceil(h / 2), math.ceil(w / 2)
  h2, w2 = math.ceil(h1 / 2), math.ceil(w1 / 2)
  tokens = fm * h2 * w2  # memory tokens after phi_V

  def block(kv_len: int) -> float:  # CrossAttentionBlock: q / out projections, k / v, attention, 4x MLP
    return 4.0 * q * dim * dim + 4.0 * kv_len * dim * dim + 4.0 * q * kv_len * dim + 16.0 * q * dim * dim

  phi_t = 2.0 * lt * s.text_dim * dim
  phi_v = fm * (2.0 * h1 * w1 * 9 * c * dim + 2.0 * h2 * w2 * 9 * dim * dim + 2.0 * h2 * w2 * dim * dim)
  phi_p = 2.0 * fm * dim * dim + 2.0 * fm * q * dim
  return phi_t + block(lt) + phi_v + block(tokens) + phi_p


def conditioner_flops(config, s: Shapes | None = None) -> float:
  """Forward FLOPs of the Adaptive Conditioner (Eq. 7): every selected frame through every patchifier."""
  s = s or shapes_of(config)
  _, h, w, c = s.latent_shape
  k, dim = int(config.selection.k_sel), int(config.model.dim)
  total = 0.0
  for kern in config.conditioner.kernels:
    kh, kw = int(kern[1]), int(kern[2])
    total += 2.0 * k * math.ceil(h / kh) * math.ceil(w / kw) * kh * kw * c * dim
  return total


def text_encoder_flops(config, s: Shapes | None = None) -> float:
  """Forward FLOPs of the T5 / umT5 text encoder for one caption of ``text_len`` tokens."""
  s = s or shapes_of(config)
  t = config.text_encoder
  if t.name not in ("t5", "umt5"):
    raise ValueError(f"config.text_encoder.name: unknown text encoder {t.name!r}; available: 't5', 'umt5'")
  dm, heads, layers, dff = int(t.d_model), int(t.num_heads), int(t.num_layers), int(t.d_ff)
  inner = heads * (int(t.d_kv) if t.name == "umt5" else dm // heads)
  lt = s.text_len
  return layers * (8.0 * lt * dm * inner + 4.0 * lt * lt * inner + 6.0 * lt * dm * dff)


def frozen_encoder_flops(config, s: Shapes | None = None) -> dict[str, float]:
  """Forward FLOPs of the frozen codec and image encoder for one sample, counted from their traced programs.

  ``codec_encode``: the 3 shots of the triplet, plus (I2V) the first-frame video; ``codec_decode``: one latent frame
  (the reference image, I2V with an ``image_condition``); ``image_encoder``: one image (I2V).
  """
  from onestory_jax import next_shot  # pylint: disable=g-import-not-at-top
  from onestory_jax import sharding  # pylint: disable=g-import-not-at-top
  from onestory_jax.models import codec as codec_lib  # pylint: disable=g-import-not-at-top
  from onestory_jax.models import image_encoder as image_encoder_lib  # pylint: disable=g-import-not-at-top

  s = s or shapes_of(config)
  d = config.data
  sds = jax.ShapeDtypeStruct
  codec = codec_lib.make_codec(config)
  codec_params = sharding.strip_boxes(next_shot.abstract_encoder_params(codec))
  video = sds((1, d.frames_per_shot, d.height, d.width, 3), jnp.float32)
  encode = traced_matmul_flops(codec.encode, codec_params, video)
  i2v = bool(config.model.i2v)
  out = {"codec_encode": (4.0 if i2v else 3.0) * encode, "codec_decode": 0.0, "image_encoder": 0.0}
  if i2v:
    if config.conditioner.image_condition != "none":
      f, h, w, c = s.latent_shape
      out["codec_decode"] = traced_matmul_flops(codec.decode, codec_params, sds((1, 1, h, w, c), jnp.float32))
    image = image_encoder_lib.make_image_encoder(config)
    image_params = sharding.strip_boxes(next_shot.abstract_encoder_params(image))
    out["image_encoder"] = traced_matmul_flops(image.encode, image_params, sds((1, d.height, d.width, 3), jnp.float32))
  return out


@dataclasses.dataclass(frozen=True)
class Entry:
  """One line of the step's FLOPs: ``forward`` FLOPs of the global batch, run ``passes`` times."""

  name: str
  forward: float
  passes: int  # 3 = forward + backward, 1 = forward only
  in_mfu: bool
  note: str

  @property
  def total(self) -> float:
    return self.forward * self.passes


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one global training step, by entry (:func:`step_flops`)."""

  entries: tuple[Entry, ...]
  shapes: Shapes
  dit_forward_parts: dict[str, float]  # per sample

  @property
  def model_flops(self) -> float:
    """The FLOPs that MFU counts: trainable modules x3, frozen ones x1; no rematerialisation."""
    return sum(e.total for e in self.entries if e.in_mfu)

  @property
  def executed_flops(self) -> float:
    """Every matmul FLOP the step runs: model FLOPs plus the remat recompute."""
    return sum(e.total for e in self.entries)

  @property
  def dit_flops(self) -> float:
    """The DiT alone, forward + backward (the figure most video-DiT papers quote MFU against)."""
    return self.entry("dit").total

  def entry(self, name: str) -> Entry:
    for e in self.entries:
      if e.name == name:
        return e
    raise KeyError(f"no FLOPs entry {name!r}; have {[e.name for e in self.entries]}")

  def as_dict(self) -> dict:
    return {
        "global_batch": self.shapes.batch,
        "noise_tokens_per_shot": self.shapes.noise_tokens,
        "context_tokens_per_shot": self.shapes.context_tokens,
        "model_flops": self.model_flops,
        "executed_flops": self.executed_flops,
        "dit_flops": self.dit_flops,
        "entries": {
            e.name: {"forward": e.forward, "passes": e.passes, "total": e.total, "in_mfu": e.in_mfu, "note": e.note}
            for e in self.entries
        },
        "dit_forward_per_sample": dict(self.dit_forward_parts),
    }

  def table(self) -> str:
    """A readable table of the entries (FLOPs per global step)."""
    rows = [f"  {'entry':<18} {'forward':>11} {'passes':>6} {'total':>11}  {'MFU':<3}  note"]
    for e in self.entries:
      rows.append(
          f"  {e.name:<18} {e.forward:>11.4g} {e.passes:>6d} {e.total:>11.4g}  {'yes' if e.in_mfu else 'no':<3}"
          f"  {e.note}"
      )
    rows.append(f"  {'model FLOPs (MFU)':<18} {'':>11} {'':>6} {self.model_flops:>11.4g}")
    rows.append(f"  {'executed FLOPs':<18} {'':>11} {'':>6} {self.executed_flops:>11.4g}")
    return "\n".join(rows)


def step_flops(config) -> StepFlops:
  """Analytic FLOPs of one global training step of ``config`` (see the module docstring for what is counted).

  Cached per config; the frozen encoders are traced once (a few seconds for the Wan VAE at 480p).
  """
  key = json.dumps(config.to_dict(), sort_keys=True, default=str)
  if key not in _CACHE:
    _CACHE[key] = _step_flops(config)
  return _CACHE[key]


_CACHE: dict[str, StepFlops] = {}


def _step_flops(config) -> StepFlops:
  s = shapes_of(config)
  b = s.batch
  frozen = set(config.optim.frozen)
  dit = dit_forward_flops(config, s)

  def trainable(name: str) -> bool:
    return name not in frozen

  def passes(name: str) -> int:
    return 3 if trainable(name) else 1

  entries = [
      Entry(
          "dit",
          b * sum(dit.values()),
          passes("dit"),
          True,
          f"Wan DiT on {s.noise_tokens} noise + {s.context_tokens} context tokens per sample",
      ),
      Entry(
          "frame_selection",
          b * frame_selection_flops(config, s),
          passes("frame_selection"),
          True,
          f"Eqs. 3-5 over {s.memory_frames} memory frames",
      ),
      Entry(
          "conditioner",
          b * conditioner_flops(config, s),
          passes("adaptive_conditioner"),
          True,
          f"Eq. 7 patchifiers, {int(config.selection.k_sel)} frames x {len(config.conditioner.kernels)} levels",
      ),
      Entry(
          "text_encoder",
          b * text_encoder_flops(config, s),
          passes("text_encoder"),
          True,
          f"{config.text_encoder.name}, {s.text_len} tokens" + ("" if trainable("text_encoder") else ", frozen"),
      ),
  ]
  for name, fwd in frozen_encoder_flops(config, s).items():
    if fwd:
      entries.append(Entry(name, b * fwd, 1, True, "frozen, forward only (traced matmul/conv FLOPs)"))
  entries.append(
      Entry(
          "remat_recompute",
          b * dit_remat_flops(config, s),
          1,
          False,
          f"DiT forward recomputed under remat={config.model.remat!r}",
      )
  )
  return StepFlops(entries=tuple(entries), shapes=s, dit_forward_parts=dit)
