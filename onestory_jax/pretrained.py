"""Published (converted) Wan weights in a run: the checks and the restores behind ``config.pretrained``.

``config.pretrained`` names the ``--dst`` directory of ``python -m onestory_jax.convert``. Before anything is
restored, the run config is checked against the release's ``config.json`` files (every size, the layer stacking,
the VAE's latent normalisation, CLIP's activation and preprocessing), which parameter shapes alone would not
catch, and every mismatch is reported with how to fix it. Then

* :func:`load_pretrained_encoders` restores the frozen Wan VAE and CLIP image encoder (``next_shot.System``);
* :func:`pretrained_components` names what :meth:`onestory_jax.trainer.Trainer.init_state` restores into the
  sharded train state (the DiT, and umT5), and :func:`framepack_patchifiers` starts the Adaptive Conditioner's
  patchifiers from the restored patch embedding (FramePack, design notes).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from onestory_jax import sharding
from onestory_jax import video_io
from onestory_jax import weights
from onestory_jax.models import adaptive_conditioner as ac
from onestory_jax.models.wan import clip as clip_vision
from onestory_jax.models import codec as codec_lib
from onestory_jax.models import image_encoder as image_encoder_lib
from onestory_jax.models.wan import umt5 as te
from onestory_jax.models.wan import dit as wan_dit
from onestory_jax.models.wan import vae as wan_vae


# ------------------------------------------------------------------ converted (published-format) weights
def converted_config(pretrained: str, component: str) -> dict:
  """The release's ``config.json`` of ``component``, as ``python -m onestory_jax.convert`` saved it in ``pretrained``.

  Raises:
    ValueError: the file is missing or is not a JSON object.
  """
  path = os.path.join(os.path.abspath(pretrained), f"{component}.config.json")
  if not os.path.isfile(path):
    raise ValueError(
        f"config.pretrained={pretrained}: no {component}.config.json (convert writes it next to the "
        f"{component!r} checkpoint); run python -m onestory_jax.convert --src=<release> "
        f"--dst={pretrained} --components={component}"
    )
  return video_io.read_json_object(path)


def _same(ours: Any, theirs: Any) -> bool:
  if isinstance(ours, (tuple, list)) and isinstance(theirs, (tuple, list)):
    return len(ours) == len(theirs) and all(_same(a, b) for a, b in zip(ours, theirs))
  if isinstance(ours, float) or isinstance(theirs, float):
    return bool(np.isclose(float(ours), float(theirs), rtol=1e-6, atol=0.0))
  return ours == theirs


def raise_on_mismatch(what: str, pairs: Sequence[tuple[str, Any, Any]], fix: str) -> None:
  """Raises one ValueError listing every (field, run config value, release value) that differs."""
  diffs = [
      f"{name}: run config has {ours!r}, the release has {theirs!r}"
      for name, ours, theirs in pairs
      if not _same(ours, theirs)
  ]
  if diffs:
    raise ValueError(f"{what}:\n  " + "\n  ".join(diffs) + f"\n{fix}")


def load_pretrained_encoders(system: Any, mesh: jax.sharding.Mesh | None = None) -> dict:
  """The frozen encoders' parameters restored from the conversion in ``config.pretrained``.

  Only real backends have converted weights: ``'codec'`` is returned for the ``wan_vae`` codec (component ``vae``)
  and ``'image_encoder'`` for the ``clip_vision`` encoder (component ``image_encoder``); other backends are absent
  from the result. Before restoring, the run config is checked against the release's config.json (every size, the
  latent normalisation, the activation and the image preprocessing), which shapes alone would not catch.
  Parameters go straight into their layout (:func:`weights.load_converted`): sharded by the config's logical rules
  over ``mesh``, or on the default device when ``mesh`` is None.

  Raises:
    ValueError: no conversion of a needed component, or a release that does not match the run config.
  """
  c = system.config
  dst = c.pretrained
  out = {}

  def restore(component: str, abstract: Any) -> Any:
    shardings = None if mesh is None else sharding.fitted_shardings(abstract, mesh, c)
    return weights.load_converted(dst, component, abstract, shardings)

  if isinstance(system.codec, codec_lib.WanVAECodec):
    release = wan_vae.config_from_diffusers(converted_config(dst, "vae"))
    raise_on_mismatch(
        f"config.codec.vae does not match the converted VAE ({os.path.join(dst, 'vae.config.json')})",
        [
            (f"codec.vae.{f.name}", getattr(system.codec.config, f.name), getattr(release, f.name))
            for f in dataclasses.fields(release)
        ],
        "Set config.codec.vae to the preset of that release ('wan2.1' / 'wan2.2') or to the keys of its "
        "vae/config.json.",
    )
    out["codec"] = restore("vae", system.codec.abstract_params())
  if isinstance(system.image_encoder, image_encoder_lib.CLIPImageEncoder):
    enc = system.image_encoder
    release = clip_vision.config_from_transformers(converted_config(dst, "image_encoder"))
    fields = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size", "image_size", "eps", "act")
    pairs = [(f"image_encoder.{f}", getattr(enc, f), release[f]) for f in fields]
    pairs.append(("image_encoder.num_channels", 3, release["num_channels"]))
    proc_path = os.path.join(os.path.abspath(dst), "image_processor", "preprocessor_config.json")
    if os.path.isfile(proc_path):  # convert copies the release's image_processor/ next to the checkpoint
      with open(proc_path) as f:
        proc = clip_vision.processor_config_from_transformers(json.load(f))
      pairs += [
          ("image_encoder.image_size (the processor's crop_size)", enc.image_size, proc["crop_size"]),
          ("image_encoder.shortest_edge", enc.shortest_edge or enc.image_size, proc["shortest_edge"]),
          ("image_encoder.mean", tuple(enc.mean), proc["mean"]),
          ("image_encoder.std", tuple(enc.std), proc["std"]),
      ]
    raise_on_mismatch(
        f"config.image_encoder does not match the converted CLIP image encoder "
        f"({os.path.join(dst, 'image_encoder.config.json')})",
        pairs,
        "Set those config.image_encoder fields to the release's image_encoder/config.json (and "
        "image_processor/preprocessor_config.json) values.",
    )
    out["image_encoder"] = restore("image_encoder", jax.eval_shape(enc.init, jax.random.key(0)))
  return out


# ---------------------------------------------------------------------------- published weights
def pretrained_components(config) -> dict[str, str]:
  """Parameter collection -> converted component restored from ``config.pretrained`` (empty without it).

  The DiT always (``transformer``); the text encoder (``text_encoder``) when it is umT5, the only one published.
  """
  if not config.pretrained:
    return {}
  out = {"dit": "transformer"}
  if config.text_encoder.name == "umt5":
    out["text_encoder"] = "text_encoder"
  return out


_FIX_MODEL = "Set those config fields to the release's values (or use the config variant of that release)."


def check_dit_release(config, system: Any, release: dict) -> None:
  """Raises ValueError listing every size in which the run's DiT differs from the release's transformer config."""
  m = system.model
  diffs = wan_dit.config_mismatches(
      config.model,
      release,
      in_channels=m.in_channels,
      out_channels=m.latent_channels,
      text_dim=te.text_dim(config),
      image_dim=m.image_dim if config.model.i2v else None,
  )
  ref = wan_dit.config_from_diffusers(release)
  if (ref["image_dim"] is not None) != bool(config.model.i2v):
    diffs.append(
        f"model.i2v: run config has {bool(config.model.i2v)}, the release "
        f"{'has' if ref['image_dim'] is not None else 'has no'} image cross-attention"
    )
  if diffs:
    path = os.path.join(config.pretrained, "transformer.config.json")
    raise ValueError(
        f"config.model does not match the converted transformer ({path}):\n  "
        + "\n  ".join(diffs)
        + f"\n{_FIX_MODEL} Channel and width differences come from config.codec "
        "(latent channels), config.text_encoder.d_model and config.image_encoder.hidden_size."
    )


def check_umt5_release(config, release: dict) -> None:
  """Raises ValueError listing every size in which ``config.text_encoder`` differs from the release's umT5."""
  ref = te.config_from_transformers(release)
  t = config.text_encoder
  raise_on_mismatch(
      f"config.text_encoder does not match the converted umT5 encoder "
      f"({os.path.join(config.pretrained, 'text_encoder.config.json')})",
      [(f"text_encoder.{k}", t.get(k), v) for k, v in ref.items() if k != "name"],
      _FIX_MODEL,
  )


def converted_scan_layers(pretrained: str) -> bool | None:
  """Whether the converted transformer has stacked (scanned) blocks; None when that cannot be told (no blocks or no
  checkpoint, which :func:`weights.load_converted` then reports)."""
  import orbax.checkpoint.experimental.v1 as ocp  # pylint: disable=g-import-not-at-top

  path = weights.converted_path(pretrained, "transformer")
  if not os.path.isdir(path) or not ocp.is_orbax_checkpoint(path):
    return None
  tree = ocp.metadata(path).metadata
  if "blocks" in tree:
    return True
  if any(k.startswith("blocks_") for k in tree):
    return False
  return None


def check_scan_layers(config) -> None:
  """Raises ValueError when the transformer was converted with another --scan_layers than config.model.scan_layers."""
  stored = converted_scan_layers(config.pretrained)
  want = bool(config.model.scan_layers)
  if stored is None or stored == want:
    return
  flag = " --scan_layers" if want else ""
  raise ValueError(
      f"config.pretrained={config.pretrained}: the transformer was converted {'with' if stored else 'without'} "
      f"--scan_layers, but config.model.scan_layers={want}. Convert it again to match: python -m "
      f"onestory_jax.convert --src=<release> --dst={config.pretrained} --components=transformer --overwrite{flag} "
      f"(or run with --config.model.scan_layers={stored})."
  )


def framepack_patchifiers(patch_embedding: dict, *, conditioner: Any, latent_channels: int) -> dict:
  """The Adaptive Conditioner's patchifier parameters started from the DiT's patch embedding (design notes,
  FramePack; :func:`adaptive_conditioner.init_patchifiers_from_patch_embedding`), with its bias, so a context frame at
  the finest level becomes exactly the token the DiT would embed it as.

  Args:
    patch_embedding: the DiT's ``{"kernel": (pt, ph, pw, C_in, D), "bias": (D,)}``.
    conditioner: the conditioner's parameter tree (arrays or ``jax.ShapeDtypeStruct``; only shapes and dtypes are
      read), ``{"patchifier_i": {"kernel": (1, kh, kw, latent_channels, D), "bias": (D,)}}``.
    latent_channels: channels of the clean latent.
  """
  names = sorted(conditioner, key=lambda n: int(n.rsplit("_", 1)[-1]))
  kernels = [tuple(conditioner[n]["kernel"].shape[:3]) for n in names]
  tiled = ac.init_patchifiers_from_patch_embedding(patch_embedding["kernel"], kernels, latent_channels)
  out = {}
  for name, kernel in zip(names, tiled):
    want = tuple(conditioner[name]["kernel"].shape)
    if kernel.shape != want:
      raise ValueError(
          f"adaptive_conditioner/{name}: kernel {list(want)} cannot start from the DiT patch embedding "
          f"{list(patch_embedding['kernel'].shape)} (tiled: {list(kernel.shape)})"
      )
    out[name] = {
        "kernel": kernel.astype(conditioner[name]["kernel"].dtype),
        "bias": patch_embedding["bias"].astype(conditioner[name]["bias"].dtype),
    }
  return out


def check_release(config, system: Any, name: str, component: str) -> None:
  """Checks the converted ``component`` restored into ``params[name]`` against the run config (sizes, and the layer
  stacking of the DiT); raises ValueError saying how to fix a mismatch."""
  release = converted_config(config.pretrained, component)
  if name == "dit":
    check_dit_release(config, system, release)
    check_scan_layers(config)
  elif name == "text_encoder":
    check_umt5_release(config, release)
