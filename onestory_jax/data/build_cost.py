r"""What building the records of a dataset costs: FLOPs, bytes, accelerator hours and CPU core hours per story unit.

  python -m onestory_jax.data.build_cost [--config=configs/onestory.py:wan21_i2v_14b_480p] \
      [--units=2:50000,3:10000] [--augmentations=1] [--dinov2_size=large] [--chips=h100,v5p,v6e] [--mfu=0.3] \
      [--build_workers=64] [--video_s_per_core_s=33] [--source_hours=...] [--measure [--measure_frames=5]]

The paper's dataset (Sec. 3) is about 60K story units: 50K of two shots and 10K of three (the default ``--units``).
``python -m onestory_jax.data.build`` turns each unit of ``n`` shots into one record, and for it runs
(:class:`onestory_jax.data.multishot.encoder.UnitEncoder`):

* the **Wan VAE encoder** ``2n + (n - 1) A`` times on a whole shot (``frames_per_shot`` x ``height`` x ``width``):
  every shot, every shot's first frame followed by black frames (the I2V start latents), and ``A =
  --augmentations`` augmented copies of every shot but the last;
* **umT5** once per caption (only when the config freezes the text encoder, so that records hold embeddings);
* **DINOv2** and **CLIP** once per pixel frame, for the pseudo-labels of App. A.2 (``n x frames_per_shot``
  frames; DINOv2 at a short side of 224 with the aspect kept, CLIP at its crop). CLIP is the config's image
  encoder (Wan2.1-I2V's ViT-H/14, which the build uses by default), DINOv2 a published size (``--dinov2_size``).

Curation (``python -m onestory_jax.data.curate``) runs before, on CPUs: its cost is the source footage divided by
the throughput that ``python -m onestory_jax.data.curate_benchmark`` measures (``--video_s_per_core_s``, seconds
of video per second per core). The paper does not give the size of its raw footage (paper.md, Sec. 6), so without
``--source_hours`` the projection takes the kept shots alone, a lower bound. Captioning with a VLM is left out: its
cost is the VLM's, whichever the user runs.

FLOPs are the matmul and convolution FLOPs of each model's traced program (:func:`onestory_jax.flops.
traced_matmul_flops`; the VAE's chunked causal schedule included), at the config's sizes. Accelerator hours are
FLOPs / (peak bf16 FLOP/s x ``--mfu``): the utilisation is an assumption, since no accelerator measured these
encoders (say which one you use). ``--measure`` times each model on this machine with random weights at the
config's frame size (the VAE on ``--measure_frames`` frames, umT5 with one layer, DINOv2 and CLIP on a batch of 16
frames, all float32) and adds what it measured: achieved FLOP/s, the fraction of this machine's matmul FLOP/s, and
the CPU core hours the whole build would take at that speed.

Prints JSON. docs/records.md gives the figures for the paper setting and what they mean for a Beam cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from onestory_jax import chips as chips_lib
from onestory_jax import flops as flops_lib
from onestory_jax import logs
from onestory_jax import next_shot
from onestory_jax import sharding
from onestory_jax.data import pseudo_labels as pl
from onestory_jax.data.multishot import layout as layout_lib
from onestory_jax.models import codec as codec_lib
from onestory_jax.models import dinov2 as dinov2_lib
from onestory_jax.models.wan import clip as clip_lib
from onestory_jax.models.wan import umt5

PAPER_UNITS = {2: 50_000, 3: 10_000}  # paper Sec. 3: about 60K multi-shot videos, 50K of two shots, 10K of three

# transformers' Dinov2Config sizes of the published checkpoints (facebook/dinov2-*): the paper does not say which.
DINOV2_SIZES = {
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
}
# Wan2.1's CLIP image encoder (open-clip ViT-H/14): the sizes of a config without a 'clip_vision' image encoder.
CLIP_VIT_H14 = dict(
    hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=16, patch_size=14, image_size=224
)
EMBED_BATCH = 16  # pseudo_labels.Embedder's default frames per compiled call


def parse_units(spec: str) -> dict[int, int]:
  """'2:50000,3:10000' -> {2: 50000, 3: 10000} (shots per unit -> units)."""
  out: dict[int, int] = {}
  for part in [p for p in spec.split(",") if p.strip()]:
    try:
      n, count = (int(v) for v in part.split(":"))
    except ValueError:
      raise ValueError(f"--units: expected SHOTS:UNITS pairs such as 2:50000,3:10000, got {part!r}") from None
    if n < 2 or count < 0:
      raise ValueError(f"--units: a unit has at least 2 shots and a count >= 0, got {part!r}")
    out[n] = out.get(n, 0) + count
  if not out:
    raise ValueError("--units: expected SHOTS:UNITS pairs such as 2:50000,3:10000, got nothing")
  return out


# ------------------------------------------------------------------------------------------- the models
@dataclasses.dataclass(frozen=True)
class Models:
  """The build's models at a config's sizes (abstract: nothing is allocated)."""

  config: Any
  codec: codec_lib.Codec
  text: umt5.T5Encoder | None  # None: records hold tokens only (a trainable text encoder)
  dino: dinov2_lib.Dinov2Model
  clip: clip_lib.CLIPVisionTransformer
  dino_size: tuple[int, int]

  @classmethod
  def from_config(cls, config, dinov2: str = "large") -> "Models":
    if dinov2 not in DINOV2_SIZES:
      raise ValueError(f"--dinov2_size: expected one of {sorted(DINOV2_SIZES)}, got {dinov2!r}")
    d = config.data
    text = None
    if layout_lib.text_is_frozen(config):
      text = umt5.make_text_encoder(config, 1) if config.text_encoder.name == "umt5" else None
    if text is None and layout_lib.text_is_frozen(config):
      raise ValueError("build_cost: records with text embeddings need config.text_encoder.name = 'umt5'")
    dino = dinov2_lib.dinov2_from_transformers(dict(model_type="dinov2", **DINOV2_SIZES[dinov2]))
    # The build's CLIP is the release's image encoder (config.image_encoder); text-to-video configs have none, and
    # pseudo_labels then takes a --clip folder, counted here as Wan's ViT-H/14.
    ie = config.image_encoder
    sizes = {k: int(ie[k]) for k in CLIP_VIT_H14} if ie.name == "clip_vision" else CLIP_VIT_H14
    clip = clip_lib.CLIPVisionTransformer(**sizes)
    size = pl.dino_input_size(int(d.height), int(d.width), 224, dino.patch_size)
    return cls(config, codec_lib.make_codec(config), text, dino, clip, size)

  # Each returns (fn, args) whose traced program is one model call; args are ShapeDtypeStructs or arrays.
  def vae_call(self, frames: int, params: Any = None) -> tuple[Callable, tuple]:
    d = self.config.data
    video = jax.ShapeDtypeStruct((1, frames, int(d.height), int(d.width), 3), jnp.float32)
    self.codec.latent_shape(frames, int(d.height), int(d.width))  # raises for a frame count the codec cannot take
    if params is None:
      params = sharding.strip_boxes(next_shot.abstract_encoder_params(self.codec))
    return self.codec.encode, (params, video)

  def text_call(self, params: Any = None, module: umt5.T5Encoder | None = None) -> tuple[Callable, tuple]:
    module = module or self.text
    tokens = jax.ShapeDtypeStruct((1, int(self.config.data.text_len)), jnp.int32)
    if params is None:
      params = jax.eval_shape(module.init, jax.random.key(0), tokens)["params"]
    return (lambda p, t: module.apply({"params": p}, t)), (params, tokens)

  def dino_call(self, batch: int, params: Any = None) -> tuple[Callable, tuple]:
    x = jax.ShapeDtypeStruct((batch,) + self.dino_size + (3,), jnp.float32)
    if params is None:
      params = dinov2_lib.abstract_params(self.dino)
    return (lambda p, v: self.dino.apply({"params": p}, v).pooler_output), (params, x)

  def clip_call(self, batch: int, params: Any = None) -> tuple[Callable, tuple]:
    s = self.clip.image_size
    x = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
    if params is None:
      params = jax.eval_shape(lambda k, v: self.clip.init(k, v, method="pooled"), jax.random.key(0), x)["params"]
    return (lambda p, v: self.clip.apply({"params": p}, v, method="pooled")), (params, x)


def model_flops(m: Models) -> dict[str, float]:
  """Forward matmul + convolution FLOPs of one call of each model: a whole shot, a caption, a frame."""
  t = int(m.config.data.frames_per_shot)
  out = {
      "vae_encode_per_shot": flops_lib.traced_matmul_flops(*_flat(m.vae_call(t))),
      "text_per_caption": flops_lib.traced_matmul_flops(*_flat(m.text_call())) if m.text is not None else 0.0,
      "dinov2_per_frame": flops_lib.traced_matmul_flops(*_flat(m.dino_call(1))),
      "clip_per_frame": flops_lib.traced_matmul_flops(*_flat(m.clip_call(1))),
  }
  return out


def _flat(call: tuple[Callable, tuple]) -> tuple:
  fn, args = call
  return (fn,) + tuple(args)


# ------------------------------------------------------------------------------------------- one unit, a dataset
def calls_per_unit(n: int, augmentations: int, frames_per_shot: int, start_latents: bool = True) -> dict[str, int]:
  """Model calls for a unit of ``n`` shots (module docstring); ``start_latents``: the config has a first-frame path."""
  if n < 2 or augmentations < 0:
    raise ValueError(f"calls_per_unit: n >= 2 and augmentations >= 0, got {n}, {augmentations}")
  return {
      "vae_encode": (2 if start_latents else 1) * n + (n - 1) * augmentations,
      "text": n,
      "frames": n * frames_per_shot,
  }


def record_bytes(config, n: int, augmentations: int, dtype: str = "float16") -> int:
  """Uncompressed bytes of one record of ``n`` shots (docs/records.md: the record's arrays)."""
  lay = layout_lib.RecordLayout.from_config(config)
  item = np.dtype(dtype).itemsize
  lat = int(np.prod(lay.latent_shape)) * item
  shots_with_latents = n + (n - 1) * augmentations + (n if lay.start_latents else 0)
  total = shots_with_latents * lat
  total += n * lay.text_len * 4  # tokens
  total += n * lay.text_len * lay.text_dim * item
  total += n * n * lay.latent_shape[0] * 4  # sel_labels
  if lay.image_size is not None:
    total += (n + (n - 1) * augmentations) * lay.latent_shape[0] * lay.image_size[0] * lay.image_size[1] * 3
  return int(total)


def project(
    per_call: dict[str, float],
    units: dict[int, int],
    augmentations: int,
    frames_per_shot: int,
    start_latents: bool = True,
) -> dict[str, float]:
  """FLOPs of building ``units`` ({shots: count}), per model."""
  out = {"vae_encode": 0.0, "text": 0.0, "dinov2": 0.0, "clip": 0.0}
  for n, count in units.items():
    c = calls_per_unit(n, augmentations, frames_per_shot, start_latents)
    out["vae_encode"] += count * c["vae_encode"] * per_call["vae_encode_per_shot"]
    out["text"] += count * c["text"] * per_call["text_per_caption"]
    out["dinov2"] += count * c["frames"] * per_call["dinov2_per_frame"]
    out["clip"] += count * c["frames"] * per_call["clip_per_frame"]
  return out


# ------------------------------------------------------------------------------------------- measuring
def _time(fn: Callable, args: tuple, repeats: int) -> float:
  f = jax.jit(fn)
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _random(abstract: Any, seed: int = 0) -> Any:
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([0.02 * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)])


def measure(m: Models, frames: int, repeats: int) -> dict[str, dict[str, float]]:
  """Seconds per call and achieved FLOP/s of each model on this machine, float32, random weights."""
  out: dict[str, dict[str, float]] = {}

  def one(name: str, call: tuple[Callable, tuple], per: str, count: int) -> None:
    fn, (params, *inputs) = call
    concrete = [jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x for x in inputs]
    f = flops_lib.traced_matmul_flops(fn, params, *concrete)
    s = _time(fn, (params, *concrete), repeats)
    out[name] = {"shape": per, "calls": count, "seconds": s, "flops": f, "flops_per_s": f / s}

  cfg32 = m.config.copy_and_resolve_references()
  with cfg32.unlocked():
    if "dtype" in cfg32.codec:
      cfg32.codec.dtype = "float32"
  codec = codec_lib.make_codec(cfg32)
  m32 = dataclasses.replace(m, codec=codec)
  one("vae_encode", m32.vae_call(frames, codec.init(jax.random.key(0))), f"{frames} frames", 1)
  if m.text is not None:
    layer = dataclasses.replace(m.text, num_layers=1, vocab_size=1024, dtype=jnp.float32, param_dtype=jnp.float32)
    abstract = m.text_call(module=layer)[1][0]
    one("text_one_layer", m.text_call(_random(abstract), module=layer), "1 caption, 1 layer", 1)
  one(
      "dinov2",
      m.dino_call(EMBED_BATCH, _random(dinov2_lib.abstract_params(m.dino))),
      f"{EMBED_BATCH} frames",
      EMBED_BATCH,
  )
  one("clip", m.clip_call(EMBED_BATCH, _random(m.clip_call(EMBED_BATCH)[1][0])), f"{EMBED_BATCH} frames", EMBED_BATCH)
  return out


# ------------------------------------------------------------------------------------------- the command
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    "configs/onestory.py:wan21_i2v_14b_480p",
    "Run configuration of the build.",
    lock_config=True,
    allow_override=True,
)
_UNITS = flags.DEFINE_string("units", "2:50000,3:10000", "Story units to build, SHOTS:COUNT pairs (the paper's).")
_AUGMENTATIONS = flags.DEFINE_integer("augmentations", 1, "data.build --augmentations.", allow_override=True)
_DTYPE = flags.DEFINE_string("dtype", "float16", "data.build --dtype (stored bytes).", allow_override=True)
_DINOV2 = flags.DEFINE_enum("dinov2_size", "large", sorted(DINOV2_SIZES), "Published DINOv2 size of the pseudo-labels.")
_CHIPS = flags.DEFINE_list("chips", ["h100", "v5p", "v6e"], "Accelerators to project onto (onestory_jax.chips).")
_MFU = flags.DEFINE_float("mfu", 0.3, "Assumed fraction of the chip's peak bf16 FLOP/s that the encoders reach.")
_WORKERS = flags.DEFINE_integer("build_workers", 64, "Beam workers with one accelerator each (wall-clock projection).")
_VIDEO_S = flags.DEFINE_float(
    "video_s_per_core_s", 33.0, "Curation: video seconds per second per core (curate_benchmark at 1280x720: 30-35)."
)
_SOURCE_HOURS = flags.DEFINE_float("source_hours", None, "Hours of source footage (default: the kept shots alone).")
_MEASURE = flags.DEFINE_bool("measure", False, "Also time each model on this machine (float32, random weights).")
_MEASURE_FRAMES = flags.DEFINE_integer("measure_frames", 5, "--measure: frames of the timed VAE call (1 + 4k).")
# allow_override: benchmark --compare defines --repeats too, and a test process imports both.
_REPEATS = flags.DEFINE_integer(
    "repeats", 3, "--measure: timed calls per model (median), after one warm-up.", allow_override=True
)


def run(
    config,
    units: dict[int, int],
    *,
    augmentations: int = 1,
    dtype: str = "float16",
    dinov2: str = "large",
    chips: list[str] = ("h100",),
    mfu: float = 0.3,
    workers: int = 64,
    video_s_per_core_s: float = 33.0,
    source_hours: float | None = None,
    measure_frames: int = 0,
    repeats: int = 3,
) -> dict[str, Any]:
  """The projection (module docstring) as a JSON-able dict; ``measure_frames`` > 0 also measures."""
  if not 0.0 < mfu <= 1.0:
    raise ValueError(f"--mfu: expected a fraction in (0, 1], got {mfu}")
  if workers < 1 or video_s_per_core_s <= 0 or augmentations < 0:
    raise ValueError("--build_workers and --video_s_per_core_s must be positive, and --augmentations >= 0")
  if source_hours is not None and source_hours <= 0:
    raise ValueError(f"--source_hours: expected a positive number, got {source_hours}")
  np.dtype(dtype)  # raises TypeError for a bad name
  if dtype not in ("float16", "float32"):
    raise ValueError(f"--dtype: expected float16 or float32, got {dtype!r}")
  d = config.data
  t, fps = int(d.frames_per_shot), float(config.sample.fps)
  start = layout_lib.RecordLayout.from_config(config).start_latents
  models = Models.from_config(config, dinov2)
  if measure_frames:
    models.vae_call(measure_frames)  # a bad --measure_frames fails before the long part
  per_call = model_flops(models)
  total = project(per_call, units, augmentations, t, start)
  flops = sum(total.values())
  num_shots = sum(n * c for n, c in units.items())
  storage = sum(c * record_bytes(config, n, augmentations, dtype) for n, c in units.items())
  kept_hours = num_shots * t / fps / 3600.0
  hours = source_hours if source_hours is not None else kept_hours
  out: dict[str, Any] = {
      "units": {str(n): c for n, c in sorted(units.items())},
      "shots": num_shots,
      "augmentations": augmentations,
      "shot": {
          "frames": t,
          "height": int(d.height),
          "width": int(d.width),
          "dinov2": dinov2,
          "dinov2_input": list(models.dino_size),
      },
      "flops_per_call": per_call,
      "flops_per_unit": {
          str(n): sum(project(per_call, {n: 1}, augmentations, t, start).values()) for n in sorted(units)
      },
      "flops": dict(total, total=flops),
      "storage_bytes": storage,
      "storage_tb": storage / 1e12,
      "curation": {
          "source_hours": hours,
          "source_hours_is_lower_bound": source_hours is None,
          "video_s_per_core_s": video_s_per_core_s,
          "core_hours": hours * 3600.0 / video_s_per_core_s / 3600.0,
      },
      "accelerators": {},
  }
  for name in chips:
    chip = chips_lib.get(name)
    chip_hours = flops / (chip.peak_bf16_flops * mfu) / 3600.0
    out["accelerators"][name] = {
        "mfu": mfu,
        "chip_hours": chip_hours,
        "wall_hours_on_workers": chip_hours / workers,
        "workers": workers,
        "seconds_per_unit": {k: v / (chip.peak_bf16_flops * mfu) for k, v in out["flops_per_unit"].items()},
    }
  if measure_frames:
    cores = os.cpu_count() or 1
    measured = measure(models, measure_frames, repeats)
    peak = flops_lib.matmul_flops_per_sec()
    rate = {
        "vae_encode": measured["vae_encode"]["flops_per_s"],
        "text": measured.get("text_one_layer", {}).get("flops_per_s", 1.0),
        "dinov2": measured["dinov2"]["flops_per_s"],
        "clip": measured["clip"]["flops_per_s"],
    }
    seconds = {k: total[k] / rate[k] for k in total}
    out["measured"] = {
        "cores": cores,
        "matmul_flops_per_s": peak,
        "models": {k: dict(v, fraction_of_matmul=v["flops_per_s"] / peak) for k, v in measured.items()},
        "seconds_per_unit_on_this_machine": {
            str(n): sum(v / rate[k] for k, v in project(per_call, {n: 1}, augmentations, t, start).items())
            for n in sorted(units)
        },
        "shots_per_s_per_core": num_shots / (sum(seconds.values()) * cores),
        "core_hours": {k: v * cores / 3600.0 for k, v in seconds.items()},
        "core_hours_total": sum(seconds.values()) * cores / 3600.0,
    }
  return out


def main(argv):
  del argv
  units = parse_units(_UNITS.value)
  if _MEASURE_FRAMES.value < 1:
    raise ValueError(
        f"--measure_frames: expected a positive frame count (1 + 4k for the Wan VAE), got {_MEASURE_FRAMES.value}"
    )
  for name in _CHIPS.value:
    chips_lib.get(name)
  out = run(
      _CONFIG.value,
      units,
      augmentations=_AUGMENTATIONS.value,
      dtype=_DTYPE.value,
      dinov2=_DINOV2.value,
      chips=_CHIPS.value,
      mfu=_MFU.value,
      workers=_WORKERS.value,
      video_s_per_core_s=_VIDEO_S.value,
      source_hours=_SOURCE_HOURS.value,
      measure_frames=_MEASURE_FRAMES.value if _MEASURE.value else 0,
      repeats=_REPEATS.value,
  )
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  logs.run(main)
