r"""The Wan DiT in Flax against the diffusers reference in PyTorch: speed, FLOP/s and output parity, side by side.

  python -m onestory_jax.benchmark --compare=diffusers [--repeats=5] [--sizes=demo,d512] [--torch_compile=false]
      [--torch_compile_timeout_s=900] [--compare_dtype=float32|bfloat16]

On a GPU (JAX's default backend ``gpu``, torch with CUDA), both sides run there:

  python -m onestory_jax.benchmark --compare=diffusers --compare_dtype=bfloat16 --sizes=demo,d512,wan1.3b_block \
      --torch_compile=false --repeats=20

For each size it builds the same T2V Wan2.1 DiT twice, with identical weights (drawn in float32, then both sides
cast to ``--compare_dtype``: parameters, inputs and compute) and inputs:

* the reference, diffusers' ``WanTransformer3DModel`` (random weights from ``torch.manual_seed``; every parameter then
  gets 0.02 x Gaussian noise, so no norm scale is one and no bias zero), run eagerly and, where it works, through
  ``torch.compile`` (inductor, default mode);
* the port, :class:`onestory_jax.models.wan.dit.WanTransformer3D` with the sizes of the reference's config
  (:func:`dit.dit_from_diffusers`) and the project's default attention backend ``'auto'`` (``'blocked'`` on CPU,
  ``'cudnn'`` for bfloat16 on a GPU, where torch's SDPA picks its flash kernel), its
  parameters converted in memory from the reference's state dict through the project's key map
  (:func:`dit.torch_key_to_target`, the map behind ``python -m onestory_jax.convert``), checked against the port's
  parameter tree (every parameter filled once, shapes equal).

and times, on the same inputs:

* ``fwd``: the forward pass (torch under ``no_grad``; Flax ``jax.jit`` of ``apply``);
* ``fwd_bwd``: forward + backward of ``loss = mean(out ** 2)`` with the gradient of every parameter (torch
  ``loss.backward()`` with every parameter requiring grad; Flax ``jax.jit(jax.value_and_grad(loss))`` w.r.t. all
  params).

Every function runs once to compile and warm up (torch.compile's and XLA's compile times are reported), then
``--repeats`` rounds time each implementation once per round, interleaved, so that a change in machine load hits all
alike; the median is reported (the minimum too). ``flax_over_torch_eager`` and ``flax_over_torch_compile`` are
Flax's time over torch's (below 1: Flax is faster).

FLOPs (``flops``) are analytic: :func:`onestory_jax.flops.dit_forward_flops` (matmuls only, ``2 m n k`` each) times
the batch for ``fwd``, and 3x that for ``fwd_bwd`` (the convention of MFU). The same figure serves both sides, so
the FLOP/s ratio is the inverse time ratio. Each implementation's FLOP/s is set against this machine's measured
matmul throughput in ``--compare_dtype`` (:func:`onestory_jax.flops.matmul_flops_per_sec`, a jitted JAX matmul,
2048^3 on CPU and 8192^3 on a GPU, best of 5): ``*_fraction_of_matmul``; on a chip of :mod:`onestory_jax.chips`
also against its spec-sheet bf16 peak (``*_fraction_of_spec``). For reference ``flops.xla_cost_analysis`` also
gives XLA's own count of the compiled Flax programs; it includes elementwise work, and counts the body of a loop (the
blocked attention's loop over key blocks) once, so it is not used for the FLOP/s.

Parity (``parity``): the largest absolute difference between the Flax and the eager torch forward outputs, and that
over the largest absolute reference output (``rel_err``; about 1e-7 to 1e-6 in float32, 1e-3 to 1e-2 in
bfloat16); the same for every
parameter gradient of ``fwd_bwd`` (``grad_rel_err``: the worst parameter, each gradient against its own largest
entry); and torch.compile's output against eager's.

The machine load (``os.getloadavg()``, 1/5/15-minute) is recorded before and after the whole run and around each
size: timings taken under load (load well above zero on an otherwise idle machine) are not valid figures.

Output: the JSON record on stdout, and a short table on stderr (times in ms, FLOP/s in GFLOP/s with the fraction of
the matmul peak, the Flax / torch ratios and the parity).

Sizes (``--sizes``, comma-separated names of :data:`SIZES`; float32, patch (1, 2, 2), 16 latent channels in and out,
timestep features 256 as Wan, T2V: no image cross-attention):

* ``demo``: the demo DiT (``configs/onestory.py:demo``): 4 layers, 4 heads x 32 (dim 128), FFN 512, batch 8 x 320
  noise tokens (latents 5 x 16 x 16);
* ``d512``: 4 layers, 8 heads x 64 (dim 512), FFN 2048, batch 1 x 2048 noise tokens (latents 8 x 32 x 32);
* ``wan1.3b_block``: one block of Wan2.1-T2V-1.3B (12 heads x 128, dim 1536, FFN 8960) at its 480p, 81-frame shape:
  batch 1 x 32,760 noise tokens (latents 21 x 60 x 104); for accelerators;
* ``tiny``: 1 layer, 2 heads x 16, FFN 64, batch 1 x 16 tokens (latents 1 x 8 x 8), 16 text tokens: a smoke test.

Text: 512 caption tokens (Wan pads every prompt to 512 umT5 tokens) of width 64: the caption width only sizes the
text embedder's first matmul (512 x 64 x dim per sample, negligible against the blocks), so a small one keeps the
model about the blocks. Timesteps are drawn per sample in [0, 1000).

torch and diffusers are test-only extras, imported inside the functions here; without them the run stops with a
ValueError. torch.compile runs under a wall-clock budget (``--torch_compile_timeout_s``, an alarm signal in the
main thread): if it fails or runs out of time, that implementation is reported as ``unavailable`` with a one-line
reason, and the rest of the comparison goes on. Inductor keeps a compiled-graph cache on disk, so a second run's
compile times may be shorter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from onestory_jax import chips
from onestory_jax import flops as flops_lib
from onestory_jax import weights
from onestory_jax.models import attention as attention_lib
from onestory_jax.models.wan import dit as wan_dit

INSTALL_HINT = "pip install -e '.[test]'"


@dataclasses.dataclass(frozen=True)
class Size:
  """One DiT size and input shape of the comparison."""

  layers: int
  heads: int
  head_dim: int
  ffn_dim: int
  batch: int
  latent: tuple[int, int, int]  # (F, H, W) latent frames, height, width
  text_len: int = 512
  text_dim: int = 64
  channels: int = 16
  freq_dim: int = 256
  patch: tuple[int, int, int] = (1, 2, 2)

  @property
  def dim(self) -> int:
    return self.heads * self.head_dim

  @property
  def tokens(self) -> int:
    return math.prod(n // p for n, p in zip(self.latent, self.patch))

  def as_dict(self) -> dict:
    return dataclasses.asdict(self) | {"dim": self.dim, "tokens": self.tokens}


SIZES = {
    "demo": Size(layers=4, heads=4, head_dim=32, ffn_dim=512, batch=8, latent=(5, 16, 16)),
    "d512": Size(layers=4, heads=8, head_dim=64, ffn_dim=2048, batch=1, latent=(8, 32, 32)),
    "wan1.3b_block": Size(layers=1, heads=12, head_dim=128, ffn_dim=8960, batch=1, latent=(21, 60, 104)),
    "tiny": Size(layers=1, heads=2, head_dim=16, ffn_dim=64, batch=1, latent=(1, 8, 8), text_len=16, text_dim=32),
}
DEFAULT_SIZES = ("demo", "d512")
DTYPES = ("float32", "bfloat16")
PARAM_NOISE = 0.02


def _flag(define: Callable[..., Any], name: str, default: Any, help_: str):
  """Defines ``--name``, or reuses it where another entry point loaded in this process defined it already
  (``--repeats`` is also :mod:`onestory_jax.attention_benchmark`'s, with the same meaning)."""
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return define(name, default, help_)


_REPEATS = _flag(flags.DEFINE_integer, "repeats", 5, "Timed rounds (after one warm-up call per function).")
_SIZES = _flag(flags.DEFINE_list, "sizes", list(DEFAULT_SIZES), f"--compare sizes, of {sorted(SIZES)}.")
_TORCH_COMPILE = _flag(flags.DEFINE_boolean, "torch_compile", True, "--compare: also time torch.compile.")
_TORCH_COMPILE_TIMEOUT = _flag(
    flags.DEFINE_integer, "torch_compile_timeout_s", 900, "--compare: wall-clock budget of torch.compile per size."
)
_DTYPE = _flag(
    lambda name, default, help_: flags.DEFINE_enum(name, default, list(DTYPES), help_),
    "compare_dtype",
    "float32",
    "--compare: parameters, inputs and compute of both sides.",
)


def import_reference():
  """(torch, diffusers), or a ValueError saying how to install them."""
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"--compare=diffusers needs torch and diffusers ({e}): {INSTALL_HINT}") from None
  return torch, diffusers


def check_sizes(names) -> list[str]:
  names = [n.strip() for n in names if n.strip()]
  unknown = [n for n in names if n not in SIZES]
  if unknown or not names:
    raise ValueError(f"--sizes: unknown or empty {unknown or names}; available: {sorted(SIZES)}")
  return names


# ----------------------------------------------------------------------------------------------- the two models


def build_reference(torch, diffusers, size: Size, seed: int = 0):
  """A random diffusers ``WanTransformer3DModel`` (T2V) of ``size``, every parameter perturbed (module docstring)."""
  torch.manual_seed(seed)
  model = diffusers.WanTransformer3DModel(
      patch_size=size.patch,
      num_attention_heads=size.heads,
      attention_head_dim=size.head_dim,
      in_channels=size.channels,
      out_channels=size.channels,
      text_dim=size.text_dim,
      freq_dim=size.freq_dim,
      ffn_dim=size.ffn_dim,
      num_layers=size.layers,
      cross_attn_norm=True,
      qk_norm="rms_norm_across_heads",
      eps=1e-6,
  ).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(PARAM_NOISE * torch.randn_like(p))
  return model


def _targets(model: wan_dit.WanTransformer3D, names) -> dict[str, tuple[tuple[str, ...], Callable]]:
  """Published name -> (our parameter path, layout transform) through the project's key map, checked against the
  port's parameter tree: every parameter filled exactly once, every name known."""
  expected = weights.flatten_tree(wan_dit.abstract_params(model))
  out, seen = {}, {}
  for name in names:
    t = wan_dit.torch_key_to_target(name, num_layers=model.num_layers, scanned=model.scan_layers)
    if t is None:
      continue
    if t.path not in expected or t.layer is not None:
      raise ValueError(f"reference tensor {name!r} maps to {weights.path_str(t.path, t.layer)}, not a parameter")
    if t.path in seen:
      raise ValueError(f"{weights.path_str(t.path)} is filled by both {seen[t.path]!r} and {name!r}")
    seen[t.path] = name
    out[name] = (t.path, t.transform)
  missing = sorted(weights.path_str(p) for p in expected if p not in seen)
  if missing:
    raise ValueError(f"the reference fills no tensor for {missing}")
  return out


def convert_state_dict(ref, model: wan_dit.WanTransformer3D) -> dict:
  """The Flax parameters of ``model`` from the reference's state dict (in memory; the converter's key map)."""
  state = {k: v.detach().cpu().numpy() for k, v in ref.state_dict().items()}
  expected = weights.flatten_tree(wan_dit.abstract_params(model))
  flat = {}
  for name, (path, transform) in _targets(model, state).items():
    value = transform(state[name])
    if tuple(value.shape) != tuple(expected[path].shape):
      raise ValueError(
          f"{name}: shape {value.shape} after conversion, {weights.path_str(path)} has {expected[path].shape}"
      )
    flat[path] = jnp.asarray(value, expected[path].dtype)
  return weights.unflatten_tree(flat)


def make_inputs(size: Size, seed: int = 0) -> dict[str, np.ndarray]:
  """Latents in torch's layout ``[B, C, F, H, W]``, timesteps ``[B]``, caption embeddings ``[B, Lt, text_dim]``."""
  rng = np.random.default_rng(seed)
  return {
      "x": rng.standard_normal((size.batch, size.channels) + size.latent).astype(np.float32),
      "t": rng.uniform(0.0, 1000.0, (size.batch,)).astype(np.float32),
      "text": rng.standard_normal((size.batch, size.text_len, size.text_dim)).astype(np.float32),
  }


# ----------------------------------------------------------------------------------------------- the functions


def torch_device(torch) -> str:
  """``'cuda'`` where JAX runs on a GPU and torch sees one (both sides on the same chip), else ``'cpu'``."""
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_fns(torch, model, inputs, dtype: str, device: str):
  """(forward, forward + backward) of a torch module on ``inputs`` (moved to ``device``, floats cast to ``dtype``);
  outputs in torch's layout. On CUDA each call waits for its kernels, so that a host clock times them."""
  x, t, text = (torch.from_numpy(inputs[k]).to(device) for k in ("x", "t", "text"))
  x, text = x.to(getattr(torch, dtype)), text.to(getattr(torch, dtype))
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def fwd():
    with torch.no_grad():
      out = model(x, t, text, return_dict=False)[0]
    sync()
    return out

  def fwd_bwd():
    model.zero_grad(set_to_none=True)
    loss = model(x, t, text, return_dict=False)[0].float().square().mean()
    loss.backward()
    sync()
    return loss

  return fwd, fwd_bwd


def _flax_fns(model: wan_dit.WanTransformer3D, params, inputs):
  """Compiled (forward, forward + backward) of the port, their compile seconds and XLA cost-analysis FLOPs."""
  x = jnp.asarray(inputs["x"].transpose(0, 2, 3, 4, 1), model.dtype)  # channels last
  t, text = jnp.asarray(inputs["t"]), jnp.asarray(inputs["text"], model.dtype)

  def apply(p, x, t, text):
    return model.apply({"params": p}, x, t, text)

  def loss(p, x, t, text):
    return jnp.mean(apply(p, x, t, text).astype(jnp.float32) ** 2)

  compiled, compile_s, cost = {}, {}, {}
  for name, f in (("fwd", apply), ("fwd_bwd", jax.value_and_grad(loss))):
    start = time.perf_counter()
    compiled[name] = jax.jit(f).lower(params, x, t, text).compile()
    compile_s[name] = time.perf_counter() - start
    c = compiled[name].cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    cost[name] = float((c or {}).get("flops", 0.0))
  calls = (lambda: compiled["fwd"](params, x, t, text), lambda: compiled["fwd_bwd"](params, x, t, text))
  return calls, compile_s, cost


@contextlib.contextmanager
def _deadline(seconds: float):
  """Raises TimeoutError in the main thread after ``seconds`` (SIGALRM); no limit elsewhere or for ``seconds <= 0``."""
  if seconds <= 0 or threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    del signum, frame
    raise TimeoutError(f"torch.compile took longer than {seconds:g} s (--torch_compile_timeout_s)")

  old = signal.signal(signal.SIGALRM, handler)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _time(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _numpy(x) -> np.ndarray:
  """A JAX array or a torch tensor (any device, any float dtype) as a float64 NumPy array."""
  if hasattr(x, "detach"):
    x = x.detach().float().cpu().numpy()
  return np.asarray(x, np.float64)


def _rel(ours, ref) -> tuple[float, float]:
  """(max|ours - ref|, that / max|ref|)."""
  ours, ref = _numpy(ours), _numpy(ref)
  diff = float(np.max(np.abs(ours - ref)))
  return diff, diff / max(float(np.max(np.abs(ref))), 1e-30)


# ----------------------------------------------------------------------------------------------- one size


def compare_size(
    size: Size,
    repeats: int,
    matmul_peak: float,
    *,
    torch_compile: bool = True,
    torch_compile_timeout_s: float = 900.0,
    seed: int = 0,
    dtype: str = "float32",
) -> dict:
  """Times and checks one size (module docstring); returns its JSON-able record."""
  torch, diffusers = import_reference()
  if repeats < 1:
    raise ValueError(f"--repeats must be >= 1, got {repeats}")
  if dtype not in DTYPES:
    raise ValueError(f"--compare_dtype: {dtype!r}, expected one of {DTYPES}")
  record: dict[str, Any] = {"size": size.as_dict() | {"dtype": dtype}, "loadavg_before": os.getloadavg()}
  ref = build_reference(torch, diffusers, size, seed)
  model = wan_dit.dit_from_diffusers(
      dict(ref.config), attention_impl=attention_lib.AUTO, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype)
  )
  params = convert_state_dict(ref, model)  # from the float32 weights: both sides round the same values
  device = torch_device(torch)
  ref = ref.to(device=device, dtype=getattr(torch, dtype))
  inputs = make_inputs(size, seed)
  record["size"]["parameters"] = int(sum(p.numel() for p in ref.parameters()))

  calls: dict[str, tuple[Callable, Callable]] = {"torch_eager": _torch_fns(torch, ref, inputs, dtype, device)}
  warm = {"torch_eager": tuple(f() for f in calls["torch_eager"])}  # warm-up; keep the values
  ref_grads = {name: _numpy(p.grad) for name, p in ref.named_parameters() if p.grad is not None}
  calls["flax"], flax_compile_s, xla_cost = _flax_fns(model, params, inputs)
  warm["flax"] = tuple(f() for f in calls["flax"])

  compile_record: dict[str, Any] = {"status": "skipped", "reason": "--torch_compile=false"}
  if torch_compile:
    try:
      compiled = torch.compile(ref)
      compiled_calls = _torch_fns(torch, compiled, inputs, dtype, device)
      seconds, values = {}, []
      with _deadline(torch_compile_timeout_s):
        for name, fn in zip(("fwd", "fwd_bwd"), compiled_calls):
          start = time.perf_counter()
          values.append(fn())
          seconds[name] = time.perf_counter() - start
      calls["torch_compile"], warm["torch_compile"] = compiled_calls, tuple(values)
      compile_record = {"status": "ok", "compile_s": seconds}
    except Exception as e:  # pylint: disable=broad-except
      compile_record = {"status": "unavailable", "reason": _one_line(e)}
      with contextlib.suppress(Exception):
        torch._dynamo.reset()  # pylint: disable=protected-access

  times = {name: ([], []) for name in calls}
  for _ in range(repeats):
    for name, (f, fb) in calls.items():
      times[name][0].append(_time(f))
      times[name][1].append(_time(fb))

  fwd_flops = size.batch * sum(flops_lib.dit_forward_flops(_flops_config(size), _flops_shapes(size)).values())
  record["flops"] = {
      "source": "analytic: onestory_jax.flops.dit_forward_flops x batch (matmuls, 2mnk); fwd_bwd = 3 x fwd",
      "fwd": fwd_flops,
      "fwd_bwd": 3.0 * fwd_flops,
      "xla_cost_analysis": xla_cost | {"note": "XLA's count of the Flax programs; loop bodies once; not used"},
  }
  chip = chips.of_device_kind(jax.devices()[0].device_kind)
  for name in calls:
    fwd_s, fb_s = times[name]
    entry = {
        "fwd_s": float(np.median(fwd_s)),
        "fwd_bwd_s": float(np.median(fb_s)),
        "fwd_min_s": float(np.min(fwd_s)),
        "fwd_bwd_min_s": float(np.min(fb_s)),
    }
    for k in ("fwd", "fwd_bwd"):
      entry[f"{k}_flops_per_s"] = record["flops"][k] / entry[f"{k}_s"]
      entry[f"{k}_fraction_of_matmul"] = entry[f"{k}_flops_per_s"] / matmul_peak
      if chip is not None:
        entry[f"{k}_fraction_of_spec"] = entry[f"{k}_flops_per_s"] / chip.peak_bf16_flops
    if name == "flax":
      entry["attention_backend"] = attention_lib.resolve_backend(model.attention_impl, model.dtype)
      entry["compile_s"] = flax_compile_s
    if name == "torch_compile":
      entry |= compile_record
    record[name] = entry
  if "torch_compile" not in calls:
    record["torch_compile"] = compile_record
  for other in ("torch_eager", "torch_compile"):
    r = record[other]
    record[f"flax_over_{other}"] = (
        {k: record["flax"][f"{k}_s"] / r[f"{k}_s"] for k in ("fwd", "fwd_bwd")} if "fwd_s" in r else None
    )
  record["parity"] = _parity(model, warm, ref_grads)
  record["loadavg_after"] = os.getloadavg()
  return record


def _parity(model, warm, ref_grads) -> dict:
  """Flax against eager torch: the forward outputs, the loss, and every parameter's gradient (``ref_grads``: the
  reference's, by published name)."""
  ref_out = _numpy(warm["torch_eager"][0]).transpose(0, 2, 3, 4, 1)
  abs_err, rel_err = _rel(warm["flax"][0], ref_out)
  flax_loss, flax_grads = warm["flax"][1]
  grads = weights.flatten_tree(flax_grads)
  worst, worst_name = -1.0, None
  for name, (path, transform) in _targets(model, ref_grads).items():  # every parameter, or a ValueError
    _, r = _rel(grads[path], transform(ref_grads[name]))
    if r > worst:
      worst, worst_name = r, name
  out = {
      "max_abs_err": abs_err,
      "rel_err": rel_err,
      "ref_max_abs": float(np.max(np.abs(ref_out))),
      "loss_rel_err": _rel(flax_loss, warm["torch_eager"][1])[1],
      "grad_rel_err": worst,
      "grad_worst_parameter": worst_name,
  }
  if "torch_compile" in warm:
    out["torch_compile_vs_eager_rel_err"] = _rel(warm["torch_compile"][0], warm["torch_eager"][0])[1]
  return out


def _flops_config(size: Size) -> ml_collections.ConfigDict:
  """The ``config.model`` fields :func:`flops.dit_forward_flops` reads."""
  return ml_collections.ConfigDict(
      {
          "model": {
              "dim": size.dim,
              "ffn_dim": size.ffn_dim,
              "num_layers": size.layers,
              "patch_size": size.patch,
              "freq_dim": size.freq_dim,
          }
      }
  )


def _flops_shapes(size: Size) -> flops_lib.Shapes:
  """One T2V sample without OneStory context tokens."""
  return flops_lib.Shapes(
      batch=size.batch,
      noise_tokens=size.tokens,
      context_tokens=0,
      latent_shape=size.latent + (size.channels,),
      in_channels=size.channels,
      out_channels=size.channels,
      text_len=size.text_len,
      text_dim=size.text_dim,
      image_tokens=0,
      image_dim=0,
      memory_frames=0,
  )


# ----------------------------------------------------------------------------------------------- the run


def run(
    sizes,
    repeats: int,
    *,
    torch_compile: bool = True,
    torch_compile_timeout_s: float = 900.0,
    dtype: str = "float32",
) -> dict:
  """The whole comparison. ``sizes``: names of :data:`SIZES` or :class:`Size` objects."""
  torch, diffusers = import_reference()
  sizes = [(s, SIZES[s]) if isinstance(s, str) else (f"custom{i}", s) for i, s in enumerate(sizes)]
  out: dict[str, Any] = {
      "loadavg_before": os.getloadavg(),
      "platform": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "torch_device": torch_device(torch),
      "cpu_count": os.cpu_count(),
      "jax_version": jax.__version__,
      "torch_version": torch.__version__,
      "diffusers_version": diffusers.__version__,
      "torch_threads": torch.get_num_threads(),
      "repeats": repeats,
      "dtype": dtype,  # of both sides, and of the matmul peak below
  }
  out["matmul_flops_per_s"] = peak = flops_lib.matmul_flops_per_sec(dtype=jnp.dtype(dtype))
  out["results"] = {}
  for name, size in sizes:
    out["results"][name] = compare_size(
        size,
        repeats,
        peak,
        torch_compile=torch_compile,
        torch_compile_timeout_s=torch_compile_timeout_s,
        dtype=dtype,
    )
  out["loadavg_after"] = os.getloadavg()
  return out


def table(out: dict) -> str:
  """A short human-readable summary of :func:`run`'s record."""
  lines = [
      f"Flax vs diffusers, {out['dtype']}, {out['platform']} ({out['device_kind']}), {out['cpu_count']} CPUs, "
      f"torch {out['torch_device']} with {out['torch_threads']} threads, median of {out['repeats']}; "
      f"matmul peak {out['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; "
      f"load {_load(out['loadavg_before'])} -> {_load(out['loadavg_after'])}",
      f"  {'size':<6} {'impl':<14} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd GFLOP/s':>16} {'fwd+bwd GFLOP/s':>16}",
  ]
  for name, r in out["results"].items():
    for impl in ("torch_eager", "torch_compile", "flax"):
      e = r[impl]
      if "fwd_s" not in e:
        lines.append(f"  {name:<6} {impl:<14} {e['status']}: {e['reason']}")
        continue
      lines.append(
          f"  {name:<6} {impl:<14} {e['fwd_s'] * 1e3:>9.2f} {e['fwd_bwd_s'] * 1e3:>11.2f} "
          f"{e['fwd_flops_per_s'] / 1e9:>8.2f} ({e['fwd_fraction_of_matmul']:>4.0%}) "
          f"{e['fwd_bwd_flops_per_s'] / 1e9:>8.2f} ({e['fwd_bwd_fraction_of_matmul']:>4.0%})"
      )
    ratios = [
        f"flax/{o.removeprefix('torch_')} fwd {r[f'flax_over_{o}']['fwd']:.2f} fwd+bwd {r[f'flax_over_{o}']['fwd_bwd']:.2f}"
        for o in ("torch_eager", "torch_compile")
        if r[f"flax_over_{o}"]
    ]
    p = r["parity"]
    lines.append(
        f"  {name:<6} {'; '.join(ratios)}; parity rel {p['rel_err']:.1e} (grad {p['grad_rel_err']:.1e}); "
        f"load {_load(r['loadavg_before'])} -> {_load(r['loadavg_after'])}"
    )
  return "\n".join(lines)


def _load(avg) -> str:
  return "/".join(f"{a:.1f}" for a in avg)


def main() -> None:
  """``python -m onestory_jax.benchmark --compare=diffusers``: JSON on stdout, the table on stderr."""
  names = check_sizes(_SIZES.value)
  out = run(
      names,
      _REPEATS.value,
      torch_compile=_TORCH_COMPILE.value,
      torch_compile_timeout_s=_TORCH_COMPILE_TIMEOUT.value,
      dtype=_DTYPE.value,
  )
  print(table(out), file=sys.stderr, flush=True)
  print(json.dumps(out, indent=2))
