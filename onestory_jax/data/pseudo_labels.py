"""Frame Selection pseudo-labels on real videos: DINOv2 + CLIP relevance of memory frames to the target shot.

OneStory (arXiv 2512.07802, App. A.2) supervises the Frame Selection scores S (Eq. 5) with the regression loss
L_sel = (1/F) sum_r (S[r] - y_r)^2 (Eq. 11). For a real historical frame r, y_r is the cosine similarity between the
frame and the target shot, "computed with DINOv2 and CLIP embeddings, producing a scalar relevance score"; frames of
synthetic shots get fixed labels (-1 for a shot inserted from another video, 0 for an augmented copy of the first
shot; those come from the data pipeline, not from here). The paper leaves the details open; this module fixes them as
the design notes say, and documents the remaining choices:

* **Fusion.** ``y = (cos_DINOv2 + cos_CLIP) / 2`` (design notes: the mean of the two cosine similarities). Each
  cosine lies in [-1, 1], so y does too, on the same scale as the synthetic labels.
* **Latent frame -> pixel frames.** The selector scores latent frames. A latent frame's embedding is the mean over its
  group of pixel frames (design notes). With Wan's causal VAE (temporal stride 4) a shot of T = 1 + 4k pixel frames
  has 1 + k latent frames: latent frame 0 is pixel frame 0 alone, latent frame j >= 1 is pixel frames 4j - 3 .. 4j
  (:func:`latent_frame_groups`, ``causal=True``). The demo's space-to-depth codec is not causal: latent frame j is
  pixel frames s*j .. s*j + s - 1 (``causal=False``). Memory shots are concatenated in time, as the memory is.
* **Target embedding.** The mean over *all* pixel frames of the target shot (design notes: the target shot's mean
  embedding). Choice: every per-frame embedding is L2-normalised before any mean (here and for the latent-frame
  groups), so each frame counts equally whatever the norm of its feature (the norms of DINOv2 and CLIP features vary
  from frame to frame, and only directions enter a cosine). The cosine is then taken against the mean direction.
* **DINOv2 feature.** ``pooler_output`` of :class:`onestory_jax.models.dinov2.Dinov2Model`: the CLS token after the
  final LayerNorm, DINOv2's global image descriptor. Choice: DINOv2 sees the *whole* frame, resized (bicubic,
  antialiased) so its short side is ``dino_short_side`` (224) with both sides rounded to multiples of the patch size,
  aspect ratio kept (480 x 832 -> 224 x 392), ImageNet mean / std (the resize runs in float, without the uint8
  rounding of transformers' image processor). Reason: relevance is about everything in the frame
  (a character at the edge of a 16:9 frame matters), and DINOv2 serves any grid by interpolating its position
  embeddings, so no centre crop is needed.
* **CLIP feature.** The CLIP port (:mod:`onestory_jax.models.wan.clip`, Wan2.1's ViT-H/14 image encoder) has no
  visual projection: its key map drops ``visual_projection.weight`` because Wan uses hidden states. The CLIP feature
  is therefore its pooled output (``CLIPVisionTransformer.pooled``: the CLS token after the post-LayerNorm), the
  input of that projection. (A projection is a linear map, so projected cosines would differ somewhat; reusing
  Wan's encoder avoids a second CLIP.) Preprocessing is CLIPImageProcessor's (shortest edge, centre crop, CLIP
  mean / std; :func:`onestory_jax.models.wan.clip.preprocess`), because the port has fixed position embeddings.

:func:`relevance` and :func:`pool_latent_frames` are pure numpy functions over precomputed embeddings;
:class:`Embedder` holds the two towers and computes embeddings and labels from uint8 frames.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from onestory_jax.models import dinov2 as dinov2_lib
from onestory_jax.models.wan import clip as clip_lib

WAN_TEMPORAL_STRIDE = 4
_EPS = 1e-12


# ---------------------------------------------------------------------------- latent frames and pure functions
def latent_frame_groups(
    shot_lengths: int | Sequence[int], temporal_stride: int = WAN_TEMPORAL_STRIDE, causal: bool = True
) -> np.ndarray:
  """Pixel-frame ranges of the latent frames of consecutive shots.

  Args:
    shot_lengths: pixel frames per shot (one int for a single shot).
    temporal_stride: the VAE's temporal stride (4 for Wan).
    causal: True for Wan's causal VAE (T = 1 + stride * k frames -> 1 + k latent frames, the first covering frame 0
      alone); False for a codec that groups every ``stride`` frames (T = stride * k -> k latent frames).

  Returns:
    int64 ``[F, 2]``: ``(start, stop)`` of each latent frame's pixel frames, indices into the shots concatenated in
    time (the memory's order). E.g. ``latent_frame_groups(9)``: ``[[0, 1], [1, 5], [5, 9]]``.

  Raises:
    ValueError: a length the codec cannot encode, or a stride below 1.
  """
  lengths = [shot_lengths] if isinstance(shot_lengths, (int, np.integer)) else list(shot_lengths)
  if isinstance(temporal_stride, bool) or not isinstance(temporal_stride, (int, np.integer)) or temporal_stride < 1:
    raise ValueError(f"latent_frame_groups: temporal_stride must be a positive int, got {temporal_stride!r}")
  s = int(temporal_stride)
  if not lengths:
    raise ValueError("latent_frame_groups: no shots")
  groups = []
  offset = 0
  for i, t in enumerate(lengths):
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
      raise ValueError(f"latent_frame_groups: shot {i} has {t!r} frames; expected a positive int")
    t = int(t)
    if causal:
      if (t - 1) % s:
        raise ValueError(
            f"latent_frame_groups: shot {i} has {t} frames; the causal VAE (temporal stride {s}) needs 1 + {s} k"
        )
      groups.append((offset, offset + 1))
      groups.extend((offset + 1 + s * j, offset + 1 + s * (j + 1)) for j in range((t - 1) // s))
    else:
      if t % s:
        raise ValueError(f"latent_frame_groups: shot {i} has {t} frames; a non-causal codec needs a multiple of {s}")
      groups.extend((offset + s * j, offset + s * (j + 1)) for j in range(t // s))
    offset += t
  return np.asarray(groups, np.int64)


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _embeddings(x: Any, what: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(f"{what}: expected a non-empty [N, D] array of embeddings, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError(f"{what}: embeddings are not all finite")
  return x


def pool_latent_frames(embeddings: Any, groups: Any) -> np.ndarray:
  """Per-latent-frame embeddings: the mean of the L2-normalised pixel-frame embeddings of each group.

  Args:
    embeddings: ``[T, D]`` per pixel frame (the shots concatenated in time).
    groups: ``[F, 2]`` (start, stop) ranges (:func:`latent_frame_groups`) covering ``[0, T)``.

  Returns:
    float32 ``[F, D]`` (not normalised again: :func:`relevance` normalises).
  """
  e = _unit(_embeddings(embeddings, "pool_latent_frames"))
  groups = np.asarray(groups)
  if groups.ndim != 2 or groups.shape[1] != 2 or not len(groups):
    raise ValueError(f"pool_latent_frames: groups must be [F, 2] (start, stop), got shape {groups.shape}")
  if (groups[:, 0] < 0).any() or (groups[:, 1] <= groups[:, 0]).any() or groups[:, 1].max() > len(e):
    raise ValueError(f"pool_latent_frames: groups must be non-empty ranges inside [0, {len(e)})")
  csum = np.concatenate([np.zeros((1, e.shape[1])), np.cumsum(e, axis=0)])
  return ((csum[groups[:, 1]] - csum[groups[:, 0]]) / (groups[:, 1] - groups[:, 0])[:, None]).astype(np.float32)


def cosine_to_mean(memory: Any, target: Any, what: str = "cosine_to_mean") -> np.ndarray:
  """``cos(memory[f], mean_t unit(target[t]))`` for every row f of ``memory`` [F, D]; ``target`` is [T, D]."""
  m = _embeddings(memory, f"{what} (memory)")
  t = _embeddings(target, f"{what} (target)")
  if m.shape[1] != t.shape[1]:
    raise ValueError(f"{what}: memory width {m.shape[1]} differs from target width {t.shape[1]}")
  return (_unit(m) @ _unit(_unit(t).mean(axis=0))).astype(np.float32)


def relevance(memory_dino: Any, memory_clip: Any, target_dino: Any, target_clip: Any) -> np.ndarray:
  """Pseudo-labels y [F] of memory latent frames for a target shot (paper App. A.2; module docstring).

  ``y[f] = (cos(memory_dino[f], mean_t unit(target_dino[t])) + cos(memory_clip[f], mean_t unit(target_clip[t]))) /
  2``, in [-1, 1].

  Args:
    memory_dino: ``[F, D]`` DINOv2 embedding per memory latent frame (:func:`pool_latent_frames`).
    memory_clip: ``[F, D']`` CLIP embedding per memory latent frame.
    target_dino: ``[T, D]`` DINOv2 embedding per target-shot pixel frame.
    target_clip: ``[T, D']`` CLIP embedding per target-shot pixel frame.

  Returns:
    float32 ``[F]``.
  """
  d = cosine_to_mean(memory_dino, target_dino, "relevance (DINOv2)")
  c = cosine_to_mean(memory_clip, target_clip, "relevance (CLIP)")
  if d.shape != c.shape:
    raise ValueError(f"relevance: {d.shape[0]} DINOv2 memory frames but {c.shape[0]} CLIP memory frames")
  return np.clip((d + c) / 2, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------- the embedder
def dino_input_size(height: int, width: int, short_side: int, patch: int) -> tuple[int, int]:
  """(h, w) that DINOv2 sees: the short side scaled to ``short_side``, aspect kept, both rounded to patch multiples."""
  if min(height, width, short_side, patch) < 1:
    raise ValueError(f"dino_input_size: sizes must be positive, got {(height, width, short_side, patch)}")
  scale = short_side / min(height, width)
  return tuple(max(patch, round(side * scale / patch) * patch) for side in (height, width))  # type: ignore[return-value]


def processor_stats(directory: str, default_mean, default_std) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """image_mean / image_std of ``directory/preprocessor_config.json`` when it exists, else the defaults."""
  path = os.path.join(directory, "preprocessor_config.json")
  if not os.path.isfile(path):
    return tuple(default_mean), tuple(default_std)
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  mean = tuple(float(v) for v in cfg.get("image_mean", default_mean))
  std = tuple(float(v) for v in cfg.get("image_std", default_std))
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f"{path}: image_mean / image_std need 3 entries, got {mean!r}, {std!r}")
  return mean, std


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _embed_batch(
    dino: dinov2_lib.Dinov2Model,
    clip: clip_lib.CLIPVisionTransformer,
    dino_short_side: int,
    clip_shortest_edge: int | None,
    dino_params: Any,
    clip_params: Any,
    stats: jax.Array,
    frames: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """uint8 ``[B, H, W, 3]`` -> (DINOv2 ``[B, D]``, CLIP ``[B, D']``); ``stats`` = [dino mean, dino std, clip mean,
  clip std] ``[4, 3]``. Module-level and keyed on the (hashable) modules, so equal embedders share compilations."""
  n, h, w, _ = frames.shape
  x = frames.astype(jnp.float32) / 255.0
  oh, ow = dino_input_size(h, w, dino_short_side, dino.patch_size)
  if (oh, ow) != (h, w):
    x = jnp.clip(jax.image.resize(x, (n, oh, ow, 3), "bicubic", antialias=True), 0.0, 1.0)
  x = (x - stats[0]) / stats[1]
  dino_out = dino.apply({"params": dino_params}, x).pooler_output
  pixels = clip_lib.preprocess(
      frames.astype(jnp.float32) / 127.5 - 1.0,
      crop_size=clip.image_size,
      shortest_edge=clip_shortest_edge,
      mean=stats[2],
      std=stats[3],
  )
  clip_out = clip.apply({"params": clip_params}, pixels, method="pooled")
  return dino_out.astype(jnp.float32), clip_out.astype(jnp.float32)


class Embedder:
  """DINOv2 and CLIP image embeddings of uint8 frames, and the pseudo-labels built from them.

  Args:
    dino: the DINOv2 tower (:func:`onestory_jax.models.dinov2.load_dinov2`).
    dino_params: its parameters.
    clip: the CLIP vision tower (:class:`onestory_jax.models.wan.clip.CLIPVisionTransformer`).
    clip_params: its parameters.
    dino_short_side: the short side DINOv2 sees (224), see :func:`dino_input_size`.
    dino_mean / dino_std: DINOv2's normalisation (ImageNet's).
    clip_mean / clip_std: CLIP's normalisation.
    clip_shortest_edge: CLIPImageProcessor's resize target (default: the tower's image size, which is the crop).
    batch_size: frames per compiled call (the last batch is padded, so one compile serves each frame size).
  """

  def __init__(
      self,
      dino: dinov2_lib.Dinov2Model,
      dino_params: Any,
      clip: clip_lib.CLIPVisionTransformer,
      clip_params: Any,
      *,
      dino_short_side: int = 224,
      dino_mean: Sequence[float] = dinov2_lib.IMAGENET_MEAN,
      dino_std: Sequence[float] = dinov2_lib.IMAGENET_STD,
      clip_mean: Sequence[float] = clip_lib.CLIP_MEAN,
      clip_std: Sequence[float] = clip_lib.CLIP_STD,
      clip_shortest_edge: int | None = None,
      batch_size: int = 16,
  ):
    if batch_size < 1 or dino_short_side < 1:
      raise ValueError(
          f"Embedder: batch_size and dino_short_side must be positive, got {batch_size}, {dino_short_side}"
      )
    for what, stat in (
        ("dino_mean", dino_mean),
        ("dino_std", dino_std),
        ("clip_mean", clip_mean),
        ("clip_std", clip_std),
    ):
      if len(stat) != 3:
        raise ValueError(f"Embedder: {what} needs 3 entries (RGB), got {stat!r}")
    self.dino, self.dino_params = dino, dino_params
    self.clip, self.clip_params = clip, clip_params
    self.dino_short_side = int(dino_short_side)
    self.dino_mean, self.dino_std = tuple(dino_mean), tuple(dino_std)
    self.clip_mean, self.clip_std = tuple(clip_mean), tuple(clip_std)
    self.clip_shortest_edge = clip_shortest_edge
    self.batch_size = int(batch_size)

  @classmethod
  def from_pretrained(cls, dinov2_dir: str, clip_dir: str, **kwargs) -> "Embedder":
    """Loads both towers from transformers ``save_pretrained`` folders (config.json + model.safetensors).

    ``clip_dir`` may be a Wan release's ``image_encoder/`` (a ``CLIPVisionModel``). Normalisation statistics come
    from a ``preprocessor_config.json`` next to the weights when there is one; ``kwargs`` override them and set the
    other :class:`Embedder` arguments.
    """
    dino, dino_params = dinov2_lib.load_dinov2(dinov2_dir)
    cfg = dinov2_lib.read_config(clip_dir)
    try:
      sizes = {k: v for k, v in clip_lib.config_from_transformers(cfg).items() if k != "name"}
    except ValueError as e:
      raise ValueError(f"{os.path.join(clip_dir, 'config.json')}: {e}") from e
    clip = clip_lib.CLIPVisionTransformer(**sizes)
    clip_params = dinov2_lib.load_safetensors_params(
        clip_dir, clip_lib.torch_key_to_target, clip_lib.abstract_params_from_transformers(cfg), what="CLIP checkpoint"
    )
    dm, ds = processor_stats(dinov2_dir, dinov2_lib.IMAGENET_MEAN, dinov2_lib.IMAGENET_STD)
    cm, cs = processor_stats(clip_dir, clip_lib.CLIP_MEAN, clip_lib.CLIP_STD)
    stats = dict(dino_mean=dm, dino_std=ds, clip_mean=cm, clip_std=cs)
    return cls(dino, dino_params, clip, clip_params, **{**stats, **kwargs})

  def embed(self, frames: Any) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames ``[N, H, W, 3]`` -> (DINOv2 ``[N, D]``, CLIP ``[N, D']``) float32 embeddings (not normalised)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
      raise ValueError(
          f"Embedder.embed: frames must be uint8 [N, H, W, 3] with N >= 1, got {frames.dtype} {frames.shape}"
      )
    b = self.batch_size
    dino, clip = [], []
    for start in range(0, len(frames), b):
      chunk = frames[start : start + b]
      pad = b - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.uint8)])
      d, c = _embed_batch(
          self.dino,
          self.clip,
          self.dino_short_side,
          self.clip_shortest_edge,
          self.dino_params,
          self.clip_params,
          jnp.asarray([self.dino_mean, self.dino_std, self.clip_mean, self.clip_std], jnp.float32),
          jnp.asarray(chunk),
      )
      dino.append(np.asarray(d)[: b - pad])
      clip.append(np.asarray(c)[: b - pad])
    return np.concatenate(dino), np.concatenate(clip)

  def labels(
      self,
      memory_shots: Sequence[Any],
      target_shot: Any,
      *,
      temporal_stride: int = WAN_TEMPORAL_STRIDE,
      causal: bool = True,
  ) -> np.ndarray:
    """Pseudo-labels of every memory latent frame for the target shot (module docstring).

    Args:
      memory_shots: the memory shots in time order, each uint8 ``[T_i, H_i, W_i, 3]`` (T_i = 1 + 4 k for Wan).
      target_shot: uint8 ``[T, H, W, 3]``; every frame enters the target's mean embedding.
      temporal_stride / causal: the codec's latent grouping (:func:`latent_frame_groups`).

    Returns:
      float32 ``[F]``, F = the memory's latent frames, in [-1, 1].
    """
    if not len(memory_shots):
      raise ValueError("Embedder.labels: no memory shots")
    groups = latent_frame_groups([len(s) for s in memory_shots], temporal_stride, causal)
    per_shot = [self.embed(s) for s in memory_shots]
    mem_dino = pool_latent_frames(np.concatenate([d for d, _ in per_shot]), groups)
    mem_clip = pool_latent_frames(np.concatenate([c for _, c in per_shot]), groups)
    tgt_dino, tgt_clip = self.embed(target_shot)
    return relevance(mem_dino, mem_clip, tgt_dino, tgt_clip)
