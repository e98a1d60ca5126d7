"""Encodes one curated story unit into the arrays of a multi-shot record (the work of each Beam worker).

For a unit of ``n`` shots (one line of ``CURATED/manifest.jsonl``, docs/curation.md) the :class:`UnitEncoder`

1. decodes each shot's ``clip`` window at the curated size (:func:`onestory_jax.data.curation.decode.iter_frames`);
2. encodes every shot with the run config's codec (the Flax Wan VAE with the converted weights, in the config's
   compute dtype, chunked as the port does) into ``latents``;
3. encodes ``augmentations`` augmented copies of every shot but the last (the shots that shot inflation can use as
   its first shot; :func:`onestory_jax.data.pipeline.augment_shot`, seeded by the unit id, the shot and the copy)
   into ``augmented_latents``: latents cannot be augmented later;
4. with a first-frame path, encodes each shot's (first frame, then black frames) video into ``start_latents``: the
   I2V first-frame channels of an I2MSV sample (what :meth:`next_shot.System.first_frame_channels` encodes);
5. with image cross-attention, keeps the image-encoder input of each latent frame (``images``, and
   ``augmented_images`` of the augmented copies; :mod:`onestory_jax.data.multishot.layout`);
6. tokenises every caption with the run's tokenizer (``tokens``) and, when the config freezes the text encoder
   (every Wan config), encodes them with it (``text``: the converted umT5, zero at padding as the DiT takes it);
7. computes the App. A.2 pseudo-labels for every ordered pair of shots: ``sel_labels[i, j]`` [F] is the relevance of
   shot i's latent frames to target shot j (:class:`onestory_jax.data.pseudo_labels.Embedder`: DINOv2 + CLIP, the
   mean of the two cosines against the target's mean embedding). Latent-frame groups never cross a shot boundary,
   so ``concat(sel_labels[a, c], sel_labels[b, c])`` is exactly ``Embedder.labels([shot a, shot b], shot c)``; all
   pairs cost one embedding pass per shot, and the reader needs no model.

Finished units are cached (:class:`UnitCache`, one ``.npz`` per unit keyed by the build fingerprint and the manifest
line), so a rerun after a kill encodes only the units that were not finished. A unit that cannot be encoded is a
:class:`Failure` naming the unit, the shot and the reason; it is never fatal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import threading
import traceback
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from onestory_jax import next_shot
from onestory_jax import pretrained
from onestory_jax import sharding
from onestory_jax import weights
from onestory_jax.data import pipeline as data_pipeline
from onestory_jax.data import pseudo_labels as pl
from onestory_jax.data.curation import decode
from onestory_jax.data.multishot import layout as layout_lib
from onestory_jax.models import codec as codec_lib
from onestory_jax.models import dinov2 as dinov2_lib
from onestory_jax.models.wan import clip as clip_lib
from onestory_jax.models.wan import vae as wan_vae

FORMAT = 1  # bump when the arrays of a record change meaning
REASONS = ("undecodable", "clip_length", "failed")
"""Why a unit was skipped: ``undecodable`` (a shot's source cannot be opened or decoded: missing, truncated, not a
video), ``clip_length`` (a shot's clip gives another number of frames than ``config.data.frames_per_shot``),
``failed`` (any other error while encoding it; the message has it, the log the traceback)."""


@dataclasses.dataclass(frozen=True)
class BuildSettings:
  """Everything a worker needs to encode units (picklable: Beam ships it to the workers).

  Attributes:
    manifest: the curated ``manifest.jsonl``.
    config: the run config, with ``pretrained`` set to the converted Wan release.
    dinov2: a transformers DINOv2 folder, or None for the converted ``dinov2`` component of ``config.pretrained``.
    clip: a transformers CLIP vision folder, or None for the converted ``image_encoder`` (Wan's CLIP).
    augmentations: augmented copies per shot (shot inflation's augmented first shot).
    dtype: stored float dtype of latents and text ('float16' or 'float32').
    seed: seed of the augmentations.
    cache_dir: the unit cache (shared storage for a distributed runner).
    fingerprint: hash of everything above that decides a unit's arrays (:func:`fingerprint`).
  """

  manifest: str
  config: ml_collections.ConfigDict
  dinov2: str | None
  clip: str | None
  augmentations: int
  dtype: str
  seed: int
  cache_dir: str
  fingerprint: str = ""

  @property
  def layout(self) -> layout_lib.RecordLayout:
    return layout_lib.RecordLayout.from_config(self.config)

  def __repr__(self) -> str:  # TFDS logs its builder config: keep the run config out of it
    return f"BuildSettings(manifest={self.manifest!r}, fingerprint={self.fingerprint!r})"


@dataclasses.dataclass(frozen=True)
class Failure:
  """A unit that was skipped: which, where, why."""

  index: int
  unit: str
  source: str
  shot: int | None
  reason: str
  message: str

  def line(self) -> str:
    where = f"shot {self.shot} " if self.shot is not None else ""
    return f"unit {self.unit} (manifest line {self.index + 1}, {self.source}): {where}{self.reason}: {self.message}"


class ShotError(Exception):

  def __init__(self, shot: int, reason: str, message: str):
    super().__init__(message)
    self.shot, self.reason = shot, reason


# ---------------------------------------------------------------------------- fingerprints and the manifest
def _dir_signature(path: str) -> dict[str, Any]:
  """Names and sizes of the files under ``path`` (a converted component or a weights folder), and its config."""
  p = epath.Path(path)
  if not p.exists():
    return {"missing": str(p)}

  def walk(d):
    for child in d.iterdir():
      if child.is_dir():
        yield from walk(child)
      else:
        yield child

  files = sorted((str(f.relative_to(p)), f.stat().length) for f in (walk(p) if p.is_dir() else [p]))
  return {"files": files}


# config.data fields that only training reads (where its data comes from, batching, workers, sampling odds): a build
# does not read them, so they are left out of its fingerprint and changing them reuses a finished build.
TRAINING_ONLY_DATA = frozenset(
    {
        "source",
        "records",
        "tfds_data_dir",
        "tfds_config",
        "num_train_stories",
        "batch_size",
        "worker_count",
        "read_threads",
        "prefetch_buffer_size",
        "shuffle_seed",
        "p_inflate",
        "p_insert",
        "p_syn_second",
    }
)


def fingerprint(settings: BuildSettings) -> str:
  """Hash of what decides a unit's arrays: the config sections that shape them (config.data without
  :data:`TRAINING_ONLY_DATA`), the weights (their configs, file names and sizes), the pseudo-label towers, the
  augmentations, the stored dtype, the seed and the record format."""
  c = settings.config
  dst = c.pretrained
  config = {k: c[k].to_dict() for k in ("data", "codec", "text_encoder", "image_encoder")}
  config["data"] = {k: v for k, v in config["data"].items() if k not in TRAINING_ONLY_DATA}
  parts = {
      "format": FORMAT,
      "layout": settings.layout.to_dict(),
      "config": config,
      "frozen": list(c.optim.frozen),
      "weights": {
          name: [
              _read_text(os.path.join(dst, f"{name}.config.json")),
              _dir_signature(weights.converted_path(dst, name)),
          ]
          for name in ("vae", "text_encoder", "image_encoder", "dinov2")
      },
      "tokenizer": _dir_signature(os.path.join(dst, "tokenizer")),
      "dinov2": _dir_signature(settings.dinov2) if settings.dinov2 else None,
      "clip": _dir_signature(settings.clip) if settings.clip else None,
      "augmentations": settings.augmentations,
      "dtype": settings.dtype,
      "seed": settings.seed,
  }
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read_text(path: str) -> str | None:
  p = epath.Path(path)
  return p.read_text() if p.exists() else None


def read_manifest(path: str) -> list[str]:
  """The lines of a curated manifest (blank lines dropped), each one story unit as JSON."""
  p = epath.Path(path)
  if not p.exists():
    raise ValueError(f"--curated: no manifest at {path} (python -m onestory_jax.data.curate writes manifest.jsonl)")
  return [line for line in p.read_text().splitlines() if line.strip()]


def parse_unit(line: str, where: str) -> dict[str, Any]:
  """One manifest line as a dict, checked for the fields the build reads; ValueError naming ``where`` otherwise."""
  try:
    unit = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not valid JSON ({e})") from None
  if not isinstance(unit, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(unit).__name__}")
  for field in ("id", "source", "fps", "height", "width", "shots"):
    if field not in unit:
      raise ValueError(f"{where}: missing field {field!r} (docs/curation.md has the manifest format)")
  shots = unit["shots"]
  if not isinstance(shots, list) or len(shots) < 2:
    raise ValueError(f"{where}: 'shots' must list >= 2 shots, got {shots!r:.80}")
  for k, shot in enumerate(shots):
    clip = shot.get("clip") if isinstance(shot, dict) else None
    if not (isinstance(clip, list) and len(clip) == 2 and all(isinstance(v, int) for v in clip) and clip[1] > clip[0]):
      raise ValueError(f"{where}: shots[{k}].clip must be [start, end) frame indices, got {clip!r}")
    if not isinstance(shot.get("caption"), str) or not shot["caption"].strip():
      raise ValueError(f"{where}: shots[{k}].caption must be a non-empty string")
  return unit


def unit_digest(settings: BuildSettings, line: str) -> str:
  return hashlib.sha256(f"{settings.fingerprint}\n{line.strip()}".encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------- the cache
class UnitCache:
  """Finished units (``units/<index>-<digest>.npz``, written atomically) and this run's failures
  (``failed/<index>.json``) under ``root``."""

  def __init__(self, root: str):
    self.root = epath.Path(root)
    self.units = self.root / "units"
    self.failed = self.root / "failed"

  def path(self, index: int, digest: str) -> epath.Path:
    return self.units / f"{index:09d}-{digest}.npz"

  def done(self) -> set[str]:
    """Names of the finished unit files."""
    return {p.name for p in self.units.iterdir()} if self.units.exists() else set()

  def failures(self) -> list[Failure]:
    if not self.failed.exists():
      return []
    out = []
    for p in sorted(self.failed.iterdir()):
      if p.suffix == ".json":
        try:
          out.append(Failure(**json.loads(p.read_text())))
        except (ValueError, TypeError):
          continue  # a marker cut short by a kill
    return out

  def clear_failures(self) -> None:
    if self.failed.exists():
      self.failed.rmtree()

  def load(self, index: int, digest: str) -> dict[str, np.ndarray] | None:
    p = self.path(index, digest)
    if not p.exists():
      return None
    try:
      with np.load(io.BytesIO(p.read_bytes())) as z:
        return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):
      return None  # unreadable: encode again

  def save(self, index: int, digest: str, example: dict[str, np.ndarray]) -> None:
    self.units.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **example)
    final = self.path(index, digest)
    tmp = final.parent / f".tmp-{os.getpid()}-{threading.get_ident()}-{final.name}"
    tmp.write_bytes(buf.getvalue())
    tmp.replace(final)

  def fail(self, failure: Failure) -> None:
    self.failed.mkdir(parents=True, exist_ok=True)
    final = self.failed / f"{failure.index:09d}.json"
    tmp = self.failed / f".tmp-{os.getpid()}-{final.name}"
    tmp.write_text(json.dumps(dataclasses.asdict(failure)))
    tmp.replace(final)

  def remove(self) -> None:
    if self.root.exists():
      self.root.rmtree()


# ---------------------------------------------------------------------------- models
def load_embedder(pretrained_dir: str, dinov2_dir: str | None, clip_dir: str | None) -> pl.Embedder:
  """The DINOv2 + CLIP pseudo-label towers: from transformers folders when given, else from the conversion in
  ``pretrained_dir`` (its ``dinov2`` component, and Wan's CLIP ``image_encoder``: pseudo_labels' documented choice).

  Raises:
    ValueError: a tower is in neither place.
  """
  if dinov2_dir:
    dino, dino_params = dinov2_lib.load_dinov2(dinov2_dir)
    dm, ds = pl.processor_stats(dinov2_dir, dinov2_lib.IMAGENET_MEAN, dinov2_lib.IMAGENET_STD)
  else:
    if not epath.Path(weights.converted_path(pretrained_dir, "dinov2")).exists():
      raise ValueError(
          f"the pseudo-labels need DINOv2: pass --dinov2=DIR (a transformers save_pretrained folder) or convert one "
          f"into --pretrained (put it at <release>/dinov2/ and run python -m onestory_jax.convert "
          f"--src=<release> --dst={pretrained_dir} --components=dinov2); none at "
          f"{weights.converted_path(pretrained_dir, 'dinov2')}"
      )
    cfg = pretrained.converted_config(pretrained_dir, "dinov2")
    dino = dinov2_lib.dinov2_from_transformers(cfg)
    dino_params = weights.load_converted(pretrained_dir, "dinov2", dinov2_lib.abstract_params(dino))
    dm, ds = dinov2_lib.IMAGENET_MEAN, dinov2_lib.IMAGENET_STD
  shortest = None
  if clip_dir:
    cfg = dinov2_lib.read_config(clip_dir)
    abstract = clip_lib.abstract_params_from_transformers(cfg)
    clip_params = dinov2_lib.load_safetensors_params(clip_dir, clip_lib.torch_key_to_target, abstract, what="CLIP")
    cm, cs = pl.processor_stats(clip_dir, clip_lib.CLIP_MEAN, clip_lib.CLIP_STD)
  else:
    if not epath.Path(weights.converted_path(pretrained_dir, "image_encoder")).exists():
      raise ValueError(
          f"the pseudo-labels need CLIP: pass --clip=DIR (a transformers CLIPVisionModel folder) or a --pretrained "
          f"conversion with the Wan release's image_encoder; none at "
          f"{weights.converted_path(pretrained_dir, 'image_encoder')}"
      )
    cfg = pretrained.converted_config(pretrained_dir, "image_encoder")
    clip_params = weights.load_converted(
        pretrained_dir, "image_encoder", clip_lib.abstract_params_from_transformers(cfg)
    )
    cm, cs = clip_lib.CLIP_MEAN, clip_lib.CLIP_STD
    proc = os.path.join(pretrained_dir, "image_processor", "preprocessor_config.json")
    if os.path.isfile(proc):
      with open(proc) as f:
        p = clip_lib.processor_config_from_transformers(json.load(f))
      cm, cs, shortest = tuple(p["mean"]), tuple(p["std"]), int(p["shortest_edge"])
  try:
    sizes = {k: v for k, v in clip_lib.config_from_transformers(cfg).items() if k != "name"}
  except ValueError as e:
    raise ValueError(f"CLIP config for the pseudo-labels: {e}") from e
  clip = clip_lib.CLIPVisionTransformer(**sizes)
  if shortest == clip.image_size:
    shortest = None
  return pl.Embedder(
      dino,
      dino_params,
      clip,
      clip_params,
      dino_mean=dm,
      dino_std=ds,
      clip_mean=cm,
      clip_std=cs,
      clip_shortest_edge=shortest,
  )


def check_release(settings: BuildSettings) -> None:
  """What the workers would find out only when loading, checked from the config files alone (ValueError saying what
  differs): the run config against the converted VAE and umT5, and where the pseudo-label towers come from."""
  config = settings.config
  dst = config.pretrained
  system = next_shot.make_system(config)  # also loads the tokenizer of --pretrained
  if isinstance(system.codec, codec_lib.WanVAECodec):
    release = wan_vae.config_from_diffusers(pretrained.converted_config(dst, "vae"))
    pretrained.raise_on_mismatch(
        f"config.codec.vae does not match the converted VAE ({os.path.join(dst, 'vae.config.json')})",
        [
            (f"codec.vae.{f.name}", getattr(system.codec.config, f.name), getattr(release, f.name))
            for f in dataclasses.fields(release)
        ],
        "Set config.codec.vae to that release's preset or pick the config of that release.",
    )
  if settings.layout.text_dim:
    if "text_encoder" not in pretrained.pretrained_components(config):
      raise ValueError(
          "the config freezes the text encoder (config.optim.frozen), but there is no converted umT5 in "
          "--pretrained to encode the captions with (config.text_encoder.name must be 'umt5')"
      )
    pretrained.check_umt5_release(config, pretrained.converted_config(dst, "text_encoder"))
  for what, given, component, flag in (
      ("DINOv2", settings.dinov2, "dinov2", "--dinov2"),
      ("CLIP", settings.clip, "image_encoder", "--clip"),
  ):
    if given:
      if not epath.Path(given, "config.json").exists():
        raise ValueError(f"{flag}={given}: no config.json (expected a transformers save_pretrained folder)")
    elif not epath.Path(weights.converted_path(dst, component)).exists():
      raise ValueError(
          f"the pseudo-labels need {what}: pass {flag}=DIR (a transformers save_pretrained folder) or convert it "
          f"into --pretrained (python -m onestory_jax.convert --src=<release> --dst={dst} "
          f"--components={component}; a DINOv2 release goes at <release>/dinov2/)"
      )


class UnitEncoder:
  """The models of one build, loaded once per worker process, and the encoding of one unit (module docstring)."""

  def __init__(self, settings: BuildSettings):
    self.settings = settings
    config = settings.config
    self.layout = settings.layout
    self.system = next_shot.make_system(config)
    # Only the codec: the build stores pixels for the image path, so the I2V CLIP encoder is not loaded here.
    loaded = pretrained.load_pretrained_encoders(dataclasses.replace(self.system, image_encoder=None))
    self.codec_params = loaded["codec"] if "codec" in loaded else self.system.codec.init(jax.random.key(0))
    self.text_params = None
    if self.layout.text_dim:
      if "text_encoder" not in pretrained.pretrained_components(config):
        raise ValueError(
            "the config freezes the text encoder (config.optim.frozen), but there is no converted umT5 in "
            "--pretrained to encode the captions with (config.text_encoder.name must be 'umt5')"
        )
      pretrained.check_umt5_release(config, pretrained.converted_config(config.pretrained, "text_encoder"))
      abstract = jax.eval_shape(self.system.init_params, jax.random.key(0))["text_encoder"]
      self.text_params = weights.load_converted(config.pretrained, "text_encoder", sharding.strip_boxes(abstract))
    self.embedder = load_embedder(config.pretrained, settings.dinov2, settings.clip)
    self._text_fn = None

  # -------------------------------------------------------------- pieces
  def read_shot(self, unit: dict[str, Any], k: int) -> np.ndarray:
    """Shot k's clip frames at the curated size, uint8 [T, H, W, 3]."""
    a, b = unit["shots"][k]["clip"]
    t = self.layout.frames_per_shot
    if b - a != t:
      raise ShotError(k, "clip_length", f"its clip [{a}, {b}) has {b - a} frames; config.data.frames_per_shot is {t}")
    try:
      frames = [
          f
          for _, f in decode.iter_frames(
              unit["source"], float(unit["fps"]), int(unit["height"]), int(unit["width"]), start_frame=a, end_frame=b
          )
      ]
    except decode.Undecodable as e:
      raise ShotError(k, "undecodable", str(e)) from None
    if len(frames) != t:
      raise ShotError(k, "clip_length", f"decoding its clip [{a}, {b}) gave {len(frames)} frames, expected {t}")
    return np.stack(frames)

  def encode_video(self, frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 latents [F, h, w, C] (the train step's ``System.encode_shots``)."""
    return np.asarray(self.system.encode_shots({"codec": self.codec_params}, jnp.asarray(frames)[None]))[0]

  def encode_start(self, first_frame: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> latents of (this frame, black frames...), as ``System.first_frame_channels`` encodes."""
    t = self.layout.frames_per_shot
    video = jnp.zeros((1, t) + first_frame.shape, jnp.float32).at[:, 0].set(codec_lib.to_unit(jnp.asarray(first_frame)))
    return np.asarray(self.system.codec.encode(self.codec_params, video))[0]

  def images(self, frames: np.ndarray) -> np.ndarray:
    return layout_lib.image_input(self.settings.config, frames[self.layout.representative_frames()])

  def encode_text(self, tokens: np.ndarray) -> np.ndarray:
    """int32 [n, text_len] -> float32 [n, text_len, D_t]: what the train step's ``encode_text`` gives."""
    if self._text_fn is None:
      model = self.system.model
      self._text_fn = jax.jit(lambda p, t: model.apply({"params": {"text_encoder": p}}, t, method="encode_text"))
    return np.asarray(self._text_fn(self.text_params, jnp.asarray(tokens)), np.float32)

  def labels(self, shots: list[np.ndarray]) -> np.ndarray:
    """float32 [n, n, F]: ``[i, j]`` = relevance of shot i's latent frames to target shot j (module docstring)."""
    lay = self.layout
    groups = pl.latent_frame_groups(lay.frames_per_shot, lay.temporal_stride, lay.causal)
    t = self.layout.frames_per_shot
    dino, clip = self.embedder.embed(np.concatenate(shots))  # one pass over every frame of the unit
    emb = [(dino[i * t : (i + 1) * t], clip[i * t : (i + 1) * t]) for i in range(len(shots))]
    pooled = [(pl.pool_latent_frames(d, groups), pl.pool_latent_frames(c, groups)) for d, c in emb]
    n = len(shots)
    out = np.zeros((n, n, len(groups)), np.float32)
    for i in range(n):
      for j in range(n):
        out[i, j] = pl.relevance(pooled[i][0], pooled[i][1], emb[j][0], emb[j][1])
    return out

  def augmentation_rng(self, unit_id: str, shot: int, copy: int) -> np.random.Generator:
    unit_seed = int(hashlib.sha256(unit_id.encode()).hexdigest()[:8], 16)
    return np.random.default_rng([self.settings.seed, unit_seed, shot, copy])

  # -------------------------------------------------------------- one unit
  def encode(self, index: int, line: str) -> dict[str, np.ndarray]:
    """The record of manifest line ``index`` (raises :class:`ShotError` for a shot that cannot be read)."""
    unit = json.loads(line)
    lay = self.layout
    dtype = np.dtype(self.settings.dtype)
    shots = [self.read_shot(unit, k) for k in range(len(unit["shots"]))]
    n = len(shots)
    captions = [s["caption"] for s in unit["shots"]]
    tokens = np.asarray(self.system.tokenizer.encode(captions), np.int32)
    aug_lat, aug_img = [], []
    for k in range(n - 1):
      copies = [
          data_pipeline.augment_shot(shots[k], self.augmentation_rng(unit["id"], k, c))
          for c in range(self.settings.augmentations)
      ]
      aug_lat.append(np.stack([self.encode_video(x) for x in copies]))
      if lay.image_size is not None:
        aug_img.append(np.stack([self.images(x) for x in copies]))
    example = {
        "unit": unit["id"],
        "source": unit["source"],
        "meta_json": json.dumps(unit),
        "index": np.int32(index),
        "num_shots": np.int32(n),
        "latents": np.stack([self.encode_video(s) for s in shots]).astype(dtype),
        "augmented_latents": np.stack(aug_lat).astype(dtype),
        "tokens": tokens,
        "sel_labels": self.labels(shots),
    }
    if lay.text_dim:
      example["text"] = self.encode_text(tokens).astype(dtype)
    if lay.start_latents:
      example["start_latents"] = np.stack([self.encode_start(s[0]) for s in shots]).astype(dtype)
    if lay.image_size is not None:
      example["images"] = np.stack([self.images(s) for s in shots])
      example["augmented_images"] = np.stack(aug_img)
    return example

  def encode_or_fail(self, index: int, line: str) -> dict[str, np.ndarray] | Failure:
    """:meth:`encode`, or the :class:`Failure` that says why unit ``index`` is skipped (never raises for a unit)."""
    try:
      unit = json.loads(line)
      uid, source = str(unit.get("id", f"line{index + 1}")), str(unit.get("source", "?"))
    except ValueError as e:
      return Failure(index, f"line{index + 1}", "?", None, "failed", f"not valid JSON ({e})")
    try:
      return self.encode(index, line)
    except ShotError as e:
      return Failure(index, uid, source, e.shot, e.reason, str(e))
    except Exception as e:  # pylint: disable=broad-except
      logging.error("unit %s (manifest line %d) failed:\n%s", uid, index + 1, traceback.format_exc())
      return Failure(index, uid, source, None, "failed", f"{type(e).__name__}: {e}")


_ENCODERS: dict[str, UnitEncoder] = {}
_LOCK = threading.Lock()


def encoder_for(settings: BuildSettings) -> UnitEncoder:
  """The process's :class:`UnitEncoder` of a build (models load once per process, whatever the runner's threads)."""
  with _LOCK:
    if settings.fingerprint not in _ENCODERS:
      _ENCODERS.clear()
      _ENCODERS[settings.fingerprint] = UnitEncoder(settings)
    return _ENCODERS[settings.fingerprint]


def process_unit(settings: BuildSettings, index: int, line: str) -> dict[str, np.ndarray] | None:
  """A worker's whole job for one unit: the cached record, or a fresh one (then cached), or None after recording
  the failure in the cache (:class:`UnitCache`)."""
  cache = UnitCache(settings.cache_dir)
  digest = unit_digest(settings, line)
  cached = cache.load(index, digest)
  if cached is not None:
    return _from_npz(cached)
  result = encoder_for(settings).encode_or_fail(index, line)
  if isinstance(result, Failure):
    logging.info("skipped %s", result.line())  # the command lists every skipped unit at the end
    cache.fail(result)
    return None
  cache.save(index, digest, result)
  return result


def _from_npz(z: dict[str, np.ndarray]) -> dict[str, Any]:
  out = dict(z)
  for k in ("unit", "source", "meta_json"):
    out[k] = str(out[k])
  return out
