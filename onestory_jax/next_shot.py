"""Next-shot generation (paper Eq. 1): the pieces shared by training and sampling.

``S_i = G(E, {S_j}_{j<i}, T, C_i)``. A :class:`System` bundles the trainable :class:`OneStory` module with the
frozen codec ``E`` and the I2V image encoder, and exposes the conditioning path as small pure functions:

1. the caption through ``T``;
2. Frame Selection over the memory bank (Eqs. 3-6), or a forced choice (the decoupled-conditioning warm-up);
3. the Adaptive Conditioner's context tokens (Eq. 7);
4. the I2V inputs: first-frame latent + mask channels, and image tokens for the image cross-attention;
5. the DiT velocity on ``[noise; context]`` (Eq. 8).

Memory banks are chronological and padded to a static number of latent frames with a mask.

Published weights: ``config.pretrained`` names the ``--dst`` directory of ``python -m onestory_jax.convert``. With
it, the frozen Wan VAE and CLIP ViT-H/14 image encoder are the converted ones
(:func:`onestory_jax.pretrained.load_pretrained_encoders`, after checking the release's config.json against the run
config), and the umT5 tokenizer is the release's ``tokenizer/``; the trainable DiT and umT5 encoder are restored by
:meth:`onestory_jax.trainer.Trainer.init_state`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from onestory_jax import memory_strategies
from onestory_jax import pretrained
from onestory_jax import rectified_flow as rf
from onestory_jax import sharding
from onestory_jax.data import tokenizer as tokenizer_lib
from onestory_jax.models import adaptive_conditioner as ac
from onestory_jax.models import codec as codec_lib
from onestory_jax.models import frame_selection as fs
from onestory_jax.models import image_encoder as image_encoder_lib
from onestory_jax.models import onestory as onestory_lib

IMAGE_CONDITIONS = ("none", "top_memory_frame", "last_frame")
FIRST_FRAME_PATHS = ("channels", "latent", "none")


@flax.struct.dataclass
class Condition:
  """Everything the DiT needs for one shot besides the noisy latent (all arrays, so it crosses jit)."""

  text: jax.Array  # [B, Lt, Dt] caption embedding
  null_text: jax.Array  # [B, Lt, Dt] empty-caption embedding (classifier-free guidance)
  scores: jax.Array  # [B, F] Frame Selection scores (Eq. 5)
  indices: jax.Array  # [B, K] selected memory frames, best first
  valid: jax.Array  # [B, K]
  context: dict  # tokens / positions / mask / levels (Eq. 7)
  image: jax.Array  # [B, Li, Di] image tokens (zeros when absent)
  channels: jax.Array  # [B, F_lat, h, w, mask + C] I2V mask + first-frame latent channels


def stack_rows(conditions: list[Condition]) -> Condition:
  """Conditions of the same batch ``B`` as one batch of ``len(conditions) * B`` rows, in order: one DiT call then
  gives the velocity under each (classifier-free and memory guidance, :func:`onestory_jax.sampler.guided_velocity`).
  Fields that are None stay None."""
  return jax.tree.map(lambda *a: jnp.concatenate(a), *conditions)


def make_tokenizer(config) -> tokenizer_lib.CaptionTokenizer:
  name = config.text_encoder.name
  if name == "t5":
    return tokenizer_lib.storyworld_tokenizer(config.data.text_len)
  if name == "umt5":
    path = config.text_encoder.tokenizer or (os.path.join(config.pretrained, "tokenizer") if config.pretrained else "")
    if not path:
      raise ValueError(
          "config.text_encoder.tokenizer: the umT5 tokenizer is needed; set it (or config.pretrained, "
          "whose tokenizer/ directory `python -m onestory_jax.convert` writes)"
      )
    return tokenizer_lib.load_umt5_tokenizer(path, int(config.data.text_len))
  raise ValueError(f"config.text_encoder.name: unknown text encoder {name!r}; available: 't5', 'umt5'")


@dataclasses.dataclass(frozen=True)
class System:
  """The OneStory model plus its frozen codec, image encoder and tokenizer, for one config."""

  config: ml_collections.FrozenConfigDict
  model: onestory_lib.OneStory
  codec: Any
  image_encoder: Any
  tokenizer: tokenizer_lib.CaptionTokenizer
  latent_shape: tuple[int, int, int, int]  # (F, h, w, C) of one shot

  @property
  def frames_per_shot(self) -> int:
    return self.config.data.frames_per_shot

  @property
  def image_condition(self) -> str:
    return self.config.conditioner.image_condition

  @property
  def first_frame(self) -> str:
    """How a start image enters shot 1: ``config.model.first_frame`` (configs written before it: from ``i2v``)."""
    m = self.config.model
    return m.get("first_frame", "channels" if m.i2v else "none")

  def check_start_image(self) -> None:
    """Raises ValueError when this backbone cannot start a story from an image."""
    if self.first_frame == "none":
      raise ValueError(
          f"start_image: the {self.config.get('variant', 'configured')} backbone generates from text only "
          "(config.model.first_frame='none'); use an image-to-video config (wan21_i2v_14b_*, or wan22_ti2v_5b) "
          "for a story that starts from an image"
      )

  # ------------------------------------------------------------------ parameters
  def dummy_inputs(self, batch: int, memory_frames: int) -> tuple:
    f, h, w, c = self.latent_shape
    d = self.config.data
    return (
        jnp.zeros((batch, d.text_len), jnp.int32),
        jnp.zeros((batch, memory_frames, h, w, c), jnp.float32),
        jnp.ones((batch, memory_frames), bool),
        jnp.zeros((batch, f, h, w, self.model.in_channels), jnp.float32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros(
            (batch, self.image_encoder.num_tokens(d.height, d.width), self.image_encoder.token_dim(d.height, d.width)),
            jnp.float32,
        ),
    )

  def init_params(self, rng: jax.Array) -> Any:
    """Boxed (logically partitioned) parameters; use under :func:`sharding.use_mesh`."""
    # Parameter shapes do not depend on the memory length; top-K needs at least K_sel frames to choose from.
    memory_frames = max(self.latent_shape[0], int(self.config.selection.k_sel))
    return self.model.init(rng, *self.dummy_inputs(1, memory_frames))["params"]

  def encoder_params(self, rng: jax.Array, mesh: jax.sharding.Mesh | None = None) -> dict:
    """Parameters of the frozen codec ``E`` and image encoder: ``{"codec": ..., "image_encoder": ...}``.

    With ``config.pretrained`` set, the real backends are restored from the conversion there
    (:func:`onestory_jax.pretrained.load_pretrained_encoders`): the ``wan_vae`` codec from ``vae`` and the ``clip_vision`` encoder from
    ``image_encoder``. Every other case (the demo's parameter-free backends, or no ``config.pretrained``) is the
    backend's random ``init`` from ``rng``, as before.

    Args:
      rng: key for the random initialisations.
      mesh: where the parameters go: unboxed and sharded over ``mesh`` by ``config.logical_axis_rules``, with the
        dimensions the mesh does not divide replicated (:func:`sharding.fitted_shardings`; the trainer's and the
        sampler's layout), or, when None, as the backends make them, on the default device.
    """
    r1, r2 = jax.random.split(rng)
    loaded = pretrained.load_pretrained_encoders(self, mesh) if self.config.pretrained else {}
    codec = loaded["codec"] if "codec" in loaded else self.codec.init(r1)
    image = loaded["image_encoder"] if "image_encoder" in loaded else self.image_encoder.init(r2)
    enc = {"codec": codec, "image_encoder": image}
    if mesh is None:
      return enc
    layout = sharding.fitted_shardings(self.abstract_encoder_params(), mesh, self.config)
    return jax.device_put(sharding.strip_boxes(enc), layout)

  def abstract_encoder_params(self) -> dict:
    """:meth:`encoder_params` as boxed (logically partitioned) ``jax.ShapeDtypeStruct`` leaves; nothing is
    allocated or loaded."""
    return {"codec": abstract_encoder_params(self.codec), "image_encoder": abstract_encoder_params(self.image_encoder)}

  # ------------------------------------------------------------------ pixels and latents
  def encode_shots(self, enc: dict, frames_uint8: jax.Array) -> jax.Array:
    """uint8 [..., T, H, W, 3] -> latents [..., F, h, w, C]."""
    lead = frames_uint8.shape[:-4]
    video = codec_lib.to_unit(frames_uint8.reshape((-1,) + frames_uint8.shape[-4:]))
    lat = self.codec.encode(enc["codec"], video)
    return lat.reshape(lead + lat.shape[1:])

  def decode_shots(self, enc: dict, latents: jax.Array) -> jax.Array:
    """latents [B, F, h, w, C] -> float video [B, T, H, W, 3] in [-1, 1]."""
    return self.codec.decode(enc["codec"], latents)

  def first_frame_channels(self, enc: dict, first_frame: jax.Array, present: jax.Array) -> jax.Array:
    """Wan2.1-I2V channel path: [mask, latent of (first frame, zeros...)]; all zeros where not ``present``.

    first_frame: float [B, H, W, 3] in [-1, 1]; present: bool [B].
    """
    b = first_frame.shape[0]
    t = self.frames_per_shot
    video = jnp.zeros((b, t) + first_frame.shape[1:], jnp.float32).at[:, 0].set(first_frame)
    return self.channels_from_latents(self.codec.encode(enc["codec"], video), present)

  def channels_from_latents(self, start_latents: jax.Array, present: jax.Array) -> jax.Array:
    """:meth:`first_frame_channels` from the precomputed latents [B, F, h, w, C] of (first frame, zeros...) (the
    records of ``data.source='multishot'``): no codec call."""
    b = start_latents.shape[0]
    f, h, w, _ = self.latent_shape
    p = present.astype(jnp.float32)
    lat = start_latents.astype(jnp.float32) * p[:, None, None, None, None]
    pixel_mask = jnp.zeros((b, self.frames_per_shot), jnp.float32).at[:, 0].set(p)
    mask = self.codec.frame_mask(pixel_mask, (h, w))
    return jnp.concatenate([mask, lat], axis=-1)

  def image_tokens(self, enc: dict, image: jax.Array, present: jax.Array) -> jax.Array:
    """Image tokens of float images [B, H, W, 3], zeroed where not ``present`` (T2MSV shot 1)."""
    tok = self.image_encoder.encode(enc["image_encoder"], image)
    return tok * present.astype(tok.dtype)[:, None, None]

  # ------------------------------------------------------------------ conditioning
  def condition(
      self,
      params: Any,
      enc: dict,
      tokens: jax.Array,
      memory: jax.Array,
      memory_mask: jax.Array,
      *,
      memory_shot: jax.Array | None = None,
      forced: tuple[jax.Array, jax.Array, jax.Array] | None = None,
      start_image: jax.Array | None = None,
      start_present: jax.Array | None = None,
      text: jax.Array | None = None,
      start_latents: jax.Array | None = None,
      memory_images: jax.Array | None = None,
  ) -> Condition:
    """Builds the condition of the next shot.

    Args:
      params: OneStory parameters.
      enc: frozen encoder parameters (:meth:`encoder_params`).
      tokens: int32 [B, Lt] the current caption C_i (all padding = the null caption).
      memory: [B, F, h, w, C] raw latent memory M (Eq. 2), chronological and padded; memory_mask: bool [B, F].
      memory_shot: int [B, F], the story shot that each memory frame comes from; default: the sampler's bank,
        ``frames_per_shot`` latent frames per shot from shot 0 on (:func:`fs.chronological_shots`).
      forced: optional (use [B] bool, indices [B, K], valid [B, K]): where ``use``, these frames replace the
        selector's top-K (the decoupled-conditioning warm-up of paper Sec. 4.4).
      start_image: optional float [B, H, W, 3] first-frame condition (I2MSV); start_present: bool [B].
      text: optional precomputed caption embedding [B, Lt, Dt] (records of a frozen text encoder); ``tokens`` then
        only mark its padding, and the null caption is zeros (the encoder's output at padding; a dropped caption
        is zeroed by the caller).
      start_latents: optional precomputed codec latents [B, F, h, w, C] of (start image, zeros...): the channel path
        without a codec call (:meth:`channels_from_latents`).
      memory_images: optional uint8 [B, F, Hi, Wi, 3], the image-encoder input of each memory frame: the image
        condition takes the selected frame's from here instead of decoding its latent (``start_image`` is then at
        that size too).
    """
    c = self.config
    apply = self.model.apply
    pv = {"params": params}
    if text is None:
      text = apply(pv, tokens, method="encode_text")
      null_text = apply(pv, jnp.zeros_like(tokens), method="encode_text")
    else:
      null_text = jnp.zeros_like(text)
    if memory_shot is None:
      memory_shot = fs.chronological_shots(memory.shape[0], memory.shape[1], self.latent_shape[0])
    scores = apply(pv, text, tokens != 0, memory, memory_mask, memory_shot, method="score_memory")
    idx, valid = fs.select_top_k(jax.lax.stop_gradient(scores), memory_mask, c.selection.k_sel)
    if forced is not None:
      use, f_idx, f_valid = forced
      idx = jnp.where(use[:, None], f_idx, idx)
      valid = jnp.where(use[:, None], f_valid, valid)
    frames = jnp.take_along_axis(memory, idx[:, :, None, None, None], axis=1)
    frame_time = ac.compact_frame_times(idx, valid)
    context = apply(pv, frames, valid, frame_time, method="build_context")

    b = tokens.shape[0]
    d = c.data
    if start_image is None:
      start_image = jnp.zeros((b, d.height, d.width, 3), jnp.float32)
      start_present = jnp.zeros((b,), bool)
    image = start_image
    image_present = start_present
    if self.image_condition != "none":
      if self.image_condition == "top_memory_frame":
        ref, ref_valid, ref_index = frames[:, :1], valid[:, 0], idx[:, 0]
      else:  # last_frame: the latest valid memory frame
        last = jnp.maximum(jnp.sum(memory_mask, axis=1) - 1, 0)
        ref = jnp.take_along_axis(memory, last[:, None, None, None, None], axis=1)
        ref_valid, ref_index = jnp.any(memory_mask, axis=1), last
      if memory_images is None:
        ref_pixels = self.decode_shots(enc, ref)[:, 0]
      else:
        ref_pixels = codec_lib.to_unit(
            jnp.take_along_axis(memory_images, ref_index[:, None, None, None, None], axis=1)[:, 0]
        )
      use_ref = ref_valid & ~start_present
      image = jnp.where(use_ref[:, None, None, None], ref_pixels, start_image)
      image_present = start_present | use_ref
    else:
      image_present = start_present
    image_tok = self.image_tokens(enc, image, image_present)
    if start_latents is not None:
      channels = self.channels_from_latents(start_latents, start_present)
    else:
      channels = self.first_frame_channels(enc, start_image, start_present)
    return Condition(
        text=text,
        null_text=null_text,
        scores=scores,
        indices=idx,
        valid=valid,
        context=context,
        image=image_tok,
        channels=channels,
    )

  def given_frames(self, cond: Condition) -> jax.Array:
    """[B, F] float: 1 for the latent frames that the start image gives (Wan2.2-TI2V's first-frame path), else 0."""
    if self.first_frame != "latent":
      return jnp.zeros(cond.channels.shape[:2], jnp.float32)
    return cond.channels[:, :, 0, 0, 0].astype(jnp.float32)  # the I2V mask's first channel, per latent frame

  def pin_given_frames(self, cond: Condition, x: jax.Array) -> jax.Array:
    """``x`` with the start image's latent in the frames it gives (the identity unless ``first_frame='latent'``)."""
    if self.first_frame != "latent":
      return x
    channels = cond.channels[: x.shape[0]]  # the rows of x (a guidance pair repeats them)
    given = channels[:, :, :1, :1, :1].astype(jnp.float32)
    latent = channels[..., self.codec.mask_channels :].astype(x.dtype)
    return (given * latent + (1.0 - given) * x).astype(x.dtype)

  def velocity(self, params: Any, cond: Condition, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """DiT velocity for noisy latents ``x_t`` [B, F, h, w, C] at flow time ``t`` [B] in [0, 1].

    The start image enters by ``first_frame``: Wan2.1-I2V's extra input channels (mask + first-frame latent), or
    Wan2.2-TI2V's clean first latent frame, whose tokens carry timestep 0 while the others carry ``t`` (the per-token
    timesteps of diffusers' ``expand_timesteps``); the velocity of a given frame is not used.
    """
    timestep = t * 1000.0
    x = x_t
    if self.first_frame == "channels" and self.config.model.i2v:
      x = jnp.concatenate([x_t, cond.channels.astype(x_t.dtype)], axis=-1)
    elif self.first_frame == "latent":
      x = x_t = self.pin_given_frames(cond, x_t)
      pt, ph, pw = self.config.model.patch_size
      f, h, w, _ = self.latent_shape
      tokens_per_frame = (h // ph) * (w // pw)
      given = self.given_frames(cond)[:, ::pt]  # [B, F / pt]: a token is given when its patch starts on a given frame
      timestep = jnp.repeat(timestep[:, None] * (1.0 - given), tokens_per_frame, axis=1)  # [B, N], raster order
    image = cond.image if self.config.model.i2v else None
    out = self.model.apply({"params": params}, x, timestep, cond.text, image, cond.context, method="velocity")
    return rf.output_to_velocity(out, x_t, t, self.config.flow.prediction)


def abstract_encoder_params(encoder: Any) -> Any:
  """A frozen codec's or image encoder's parameters as boxed ``jax.ShapeDtypeStruct`` leaves (nothing allocated).

  Uses the encoder's own ``abstract_params()`` where it has one (the Wan VAE initialises through numpy, which
  ``eval_shape`` cannot trace), else ``eval_shape`` of its ``init``.
  """
  if hasattr(encoder, "abstract_params"):
    return encoder.abstract_params()
  return jax.eval_shape(encoder.init, jax.random.key(0))


def make_system(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.CaptionTokenizer | None = None) -> System:
  """The :class:`System` of a run config; ``tokenizer`` replaces the config's (:func:`make_tokenizer`)."""
  frozen = ml_collections.FrozenConfigDict(config)
  first_frame = frozen.model.get("first_frame", "channels" if frozen.model.i2v else "none")
  if first_frame not in FIRST_FRAME_PATHS or (first_frame == "channels") != bool(frozen.model.i2v):
    raise ValueError(
        f"config.model.first_frame must be one of {FIRST_FRAME_PATHS}, and 'channels' exactly when "
        f"config.model.i2v; got first_frame={first_frame!r}, i2v={frozen.model.i2v}"
    )
  try:
    memory_strategies.canonical(frozen.selection.get("strategy", "onestory"))
  except ValueError as e:
    raise ValueError(f"config.selection.strategy: {e}") from None
  if frozen.conditioner.image_condition not in IMAGE_CONDITIONS:
    raise ValueError(
        f"config.conditioner.image_condition must be one of {IMAGE_CONDITIONS}, "
        f"got {frozen.conditioner.image_condition!r}"
    )
  d = frozen.data
  codec = codec_lib.make_codec(frozen)
  image_encoder = image_encoder_lib.make_image_encoder(frozen)
  tokenizer = tokenizer or make_tokenizer(frozen)
  latent_shape = tuple(codec.latent_shape(d.frames_per_shot, d.height, d.width))
  model = onestory_lib.OneStory(
      config=frozen,
      latent_hw=latent_shape[1:3],
      latent_channels=codec.latent_channels,
      mask_channels=codec.mask_channels,
      vocab_size=tokenizer.vocab_size,
      image_dim=image_encoder.token_dim(d.height, d.width),
  )
  return System(
      config=frozen,
      model=model,
      codec=codec,
      image_encoder=image_encoder,
      tokenizer=tokenizer,
      latent_shape=latent_shape,
  )
