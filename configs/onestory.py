r"""OneStory configurations.

Variants (the part after the colon; no variant = the paper's setting, ``wan21_i2v_14b_480p``):

* ``wan21_i2v_14b_480p`` (default) — the paper's setting: Wan2.1-I2V-14B at 480x832, 81 frames (21 latent frames),
  a context budget of one latent frame. Convert the diffusers release once, then train and sample on it::

    python -m onestory_jax.convert --src=/data/Wan2.1-I2V-14B-480P-Diffusers --dst=/data/wan21_i2v_14b_480p
    python -m onestory_jax.train --config=configs/onestory.py:wan21_i2v_14b_480p --workdir=gs://BUCKET/run \
        --config.pretrained=/data/wan21_i2v_14b_480p
    python -m onestory_jax.sample --workdir=gs://BUCKET/run --story=story.json --out=out/story

* ``wan21_i2v_14b_720p`` — the same model at 720x1280 (Wan2.1-I2V-14B-720P); commands as above with its release.
* ``wan21_t2v_1_3b`` — Wan2.1-T2V-1.3B (no image branch), 480x832; commands as above with its release.
* ``wan22_ti2v_5b`` — Wan2.2-TI2V-5B with its 4x16x16 VAE (48 latent channels), 704x1280, 121 frames.

* ``demo`` — the built-in StoryWorld demo, sized for a laptop CPU::

    python -m onestory_jax.train --config=configs/onestory.py:demo --workdir=workdirs/demo
    python -m onestory_jax.sample --workdir=workdirs/demo \
        --story=onestory_jax/assets/stories/recall.json --out=out/recall

* ``tiny`` — the demo model shrunk further, for tests and smoke runs (seconds per step)::

    python -m onestory_jax.train --config=configs/onestory.py:tiny --workdir=/tmp/tiny \
        --config.num_train_steps=20

Any field can be overridden on the command line, e.g. ``--config.num_train_steps=100``
or ``--config.mesh.shape='(1,-1,1,1)'``.

The same model code (Wan DiT + Frame Selection + Adaptive Conditioner) serves every
variant; only sizes and the codec / text-encoder / image-encoder backends change.
"""

import ml_collections


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pretrained = ""  # directory written by `python -m onestory_jax.convert` (Wan variants); "" = random init
  # Fine-tuning: an exported checkpoint (`python -m onestory_jax.checkpoints export --out=DIR`, e.g. the shipped
  # onestory_jax/assets/demo_checkpoint) whose parameters start a fresh run; AdamW and the step start anew.
  c.init_params = ""

  # ---------------------------------------------------------------- data
  c.data = d = ml_collections.ConfigDict()
  d.name = "storyworld"
  d.source = "on_the_fly"  # a name of onestory_jax/data/sources.py SOURCES: 'on_the_fly' | 'tfds' | 'multishot'
  d.tfds_data_dir = ""  # used when source == 'tfds'
  d.records = ""  # used when source == 'multishot': the --out of python -m onestory_jax.data.build (docs/records.md)
  d.tfds_config = ""  # the built StoryWorld config to read ('demo' | 'tiny'); "" = the only one built
  d.height = 32
  d.width = 32
  d.frames_per_shot = 8
  d.min_shots = 2
  d.max_shots = 6
  d.num_train_stories = 100_000  # size of the procedural index space
  d.batch_size = 8  # global batch
  d.worker_count = 0  # grain worker processes (0 = in-process)
  d.read_threads = 2  # background read-ahead of the in-process iterator
  d.prefetch_buffer_size = 8
  d.shuffle_seed = 0
  d.text_len = 40  # caption tokens (padded)
  # Shot inflation (paper Sec. 4.4): probability that a sample is an inflated 2-shot
  # triplet (forced to 1 during the decoupled-conditioning warm-up); among inflated
  # samples the probability of cross-video insertion (else an augmented first shot) and of
  # the order (first, syn, last) (else (syn, first, last)).
  d.p_inflate = 0.5
  d.p_insert = 0.5
  d.p_syn_second = 0.5

  # ---------------------------------------------------------------- codec
  c.codec = ml_collections.ConfigDict()
  c.codec.name = "space_to_depth"  # lossless demo codec; 'wan_vae' in real configs
  c.codec.stride = (2, 4, 4)  # (t, h, w) compression

  # ---------------------------------------------------------------- text encoder
  c.text_encoder = te = ml_collections.ConfigDict()
  te.name = "t5"  # small T5-style encoder over a word-level StoryWorld tokenizer
  te.d_model = 128
  te.num_layers = 2
  te.num_heads = 4
  te.d_ff = 256
  te.rel_buckets = 32
  te.rel_max_distance = 64
  te.dtype = "float32"  # compute dtype (a section without it, as in configs saved before it existed: config.model's)
  te.param_dtype = "float32"

  # ---------------------------------------------------------------- image encoder (I2V)
  c.image_encoder = ie = ml_collections.ConfigDict()
  ie.name = "patches"  # lossless pixel patches; 'clip_vit_h14' in real configs
  ie.patch = 8

  # ---------------------------------------------------------------- Wan DiT
  c.model = m = ml_collections.ConfigDict()
  m.dim = 128
  m.ffn_dim = 512
  m.num_heads = 4
  m.num_layers = 4
  # (1, 1, 1) on the demo's (2, 4, 4) space-to-depth latent: 96 values per token, below the width 128 (with
  # (1, 2, 2) a token holds 384 values and samples stay 8x8-pixel blocks; docs/design.md). Wan configs use (1, 2, 2).
  m.patch_size = (1, 1, 1)
  m.freq_dim = 256
  m.eps = 1e-6
  m.qk_norm = True
  m.cross_attn_norm = True
  m.rope_theta = 10000.0
  m.i2v = True  # first-frame latent + mask channels, image cross-attention
  # How a start image (I2MSV) enters shot 1: 'channels' (Wan2.1-I2V: mask + first-frame latent as extra input
  # channels), 'latent' (Wan2.2-TI2V: its latent replaces the first latent frame, whose tokens get timestep 0), or
  # 'none' (a text-to-video backbone: a start image is refused).
  m.first_frame = "channels"
  m.dtype = "float32"  # compute dtype ('bfloat16' on accelerators)
  m.param_dtype = "float32"
  m.scan_layers = False
  m.remat = "none"  # 'none' | 'full' | 'dots'
  # Attention backend (onestory_jax/models/attention.py, docs/sharding.md): 'xla' | 'blocked' (flash-style, plain
  # JAX) | 'cudnn' (GPU, bf16/fp16) | 'splash' (Pallas, TPU; interpreted elsewhere) | 'auto' = cudnn on GPU for
  # bf16/fp16, splash on TPU, else blocked.
  m.attention = "auto"

  # ---------------------------------------------------------------- Frame Selection (Eq. 3-6, 11)
  c.selection = s = ml_collections.ConfigDict()
  # Which memory frames condition a shot, in training and (by default) in sampling: 'onestory' = Frame Selection,
  # or a simpler strategy of onestory_jax/memory_strategies.py ('last_frame', 'recent', 'uniform', 'none') for the
  # paper's ablations (Table 2a, Fig. 6).
  s.strategy = "onestory"
  s.num_queries = 16  # m
  s.k_sel = 4  # K_sel
  s.num_heads = 4
  s.lambda_sel = 0.1  # λ in L = L_shot + λ L_sel (Eq. 12)

  # ---------------------------------------------------------------- Adaptive Conditioner (Eq. 7-8)
  c.conditioner = a = ml_collections.ConfigDict()
  a.kernels = ((1, 2, 2), (1, 4, 4), (1, 8, 8))  # in latent cells, finest first
  a.budget_frames = 1.0  # context budget, in latent-frame equivalents
  a.image_condition = "top_memory_frame"  # 'none' | 'top_memory_frame' | 'last_frame'

  # ---------------------------------------------------------------- rectified flow
  c.flow = f = ml_collections.ConfigDict()
  # 'x': the DiT predicts x_0 (the demo; docs/design.md); 'v': velocity (what Wan was trained with).
  f.prediction = "x"
  # Training times: logit-normal, then the SD3-style shift. The demo's flat-coloured latents are so redundant that
  # the caption only matters above t ~ 0.98, so it needs both the shift and a wide logit-normal (docs/design.md).
  f.timestep_shift = 3.0
  f.logit_normal_mean = 0.0
  f.logit_normal_std = 2.0
  # Velocity-MSE weight min(1, (t / loss_weight_t)^2) (rectified_flow.loss_weight); 0 = the plain velocity MSE.
  # With x-prediction the plain velocity MSE weighs the x_0 error by 1 / t^2, up to 400x at t = 0.05, and a short
  # run then learns to pass its input noise through; 0.5 caps that at 4x (docs/design.md).
  f.loss_weight_t = 0.5
  f.p_drop_text = 0.1
  f.p_drop_memory = 0.1
  f.p_i2v = 0.1  # train the I2MSV first-shot path (start image through the I2V channels)

  # ---------------------------------------------------------------- optimisation
  c.optim = o = ml_collections.ConfigDict()
  o.lr = 5e-4  # paper Sec. 5.1
  o.pretrained_lr = 5e-4  # lr for pretrained backbone weights (1e-5 in real configs)
  o.weight_decay = 0.01
  o.b1 = 0.9
  o.b2 = 0.99
  o.grad_clip = 1.0
  o.warmup_steps = 100
  o.frozen = ()  # top-level parameter collections that are not trained

  c.num_train_steps = 1800  # the README's demo run, about 15 minutes on 2 CPU cores
  c.warmup_fraction_dc = 0.2  # decoupled-conditioning warm-up (paper Sec. 4.4)

  # ---------------------------------------------------------------- sampling
  c.sample = sm = ml_collections.ConfigDict()
  sm.steps = 20
  sm.shift = 3.0
  sm.guidance = 3.0
  # Memory guidance g_m (sampler.guided_velocity): v += g_m (v_cond - v_without_memory); 0 = off. It costs one more
  # DiT row per step (1.5 times the sampling time with caption guidance). 3 was chosen on held-out StoryWorld
  # stories (README, "Memory guidance").
  sm.memory_guidance = 3.0
  sm.fps = 8  # of the written videos

  # ---------------------------------------------------------------- execution
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1, 1)  # (data, fsdp, context, tensor) within a slice / node; one entry may be -1
  c.mesh.axes = ("data", "fsdp", "context", "tensor")
  # Multi-slice (TPU, over DCN) or multi-node (GPU): how many slices / nodes each axis spans; the mesh is
  # shape * dcn_shape per axis. Usually data-parallel across slices, e.g. (2, 1, 1, 1) for two slices.
  c.mesh.dcn_shape = (1, 1, 1, 1)
  # Logical-axis rules: logical name -> mesh axes. 'length' -> 'context' shards the token sequence; with a
  # context axis > 1 the DiT's self-attention swaps sequence and head shards with all-to-alls (Ulysses), so
  # model.num_heads must be divisible by the context x tensor axis sizes.
  c.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("length", "context"),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv", None),
      ("mlp", "tensor"),
      ("frames", None),
      ("ctx", "context"),
      ("conv_in", None),
      ("conv_out", "tensor"),
      ("vocab", None),
      ("queries", None),
  )

  # ---------------------------------------------------------------- reporting / checkpoints
  c.log_every_steps = 50
  c.sample_every_steps = 1000
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  # A step whose loss, gradient norm or update is not finite stops the run (naming the step, nothing of it saved;
  # docs/faults.md). N > 0 instead skips up to N such updates in a row (optax.apply_if_finite), counted in the
  # metrics as nonfinite_skipped; a NaN update itself (a NaN learning rate) always stops the run.
  c.skip_nonfinite_steps = 0
  return c


def _tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.data.batch_size = 8
  c.model.patch_size = (1, 2, 2)  # 64 noise + 16 context tokens per shot: fast tests
  c.text_encoder.d_model = 32
  c.text_encoder.num_layers = 1
  c.text_encoder.num_heads = 2
  c.text_encoder.d_ff = 64
  c.model.dim = 32
  c.model.ffn_dim = 64
  c.model.num_heads = 2
  c.model.num_layers = 2
  c.selection.num_queries = 4
  c.selection.num_heads = 2
  c.optim.warmup_steps = 2
  c.num_train_steps = 10
  c.log_every_steps = 5
  c.sample_every_steps = 0
  c.checkpoint_every_steps = 5
  c.sample.steps = 4
  c.sample.memory_guidance = 0.0  # one DiT row less per step; the tests that need memory guidance ask for it
  return c


# ------------------------------------------------------------------------------------------- Wan backbones
# Sizes of the published models (diffusers config.json of each release); `convert` checks a release against them.
_UMT5_XXL = dict(
    name="umt5",
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    rel_buckets=32,
    rel_max_distance=128,
    eps=1e-6,
    tokenizer="",
)
_CLIP_VIT_H14 = dict(
    name="clip_vision",
    hidden_size=1280,
    intermediate_size=5120,
    num_layers=32,
    num_heads=16,
    patch_size=14,
    image_size=224,
    layer=-2,
    eps=1e-5,
    act="gelu",
    mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711),
)
_DITS = {
    "wan21_i2v_14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, i2v=True, first_frame="channels"),
    "wan21_t2v_1_3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, i2v=False, first_frame="none"),
    "wan22_ti2v_5b": dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, i2v=False, first_frame="latent"),
}


def _wan(
    c: ml_collections.ConfigDict, dit: str, vae: str, height: int, width: int, frames: int, image_encoder: bool
) -> ml_collections.ConfigDict:
  """A Wan backbone at the paper's settings; the OneStory parts keep the design-notes defaults."""
  d = c.data
  d.height, d.width, d.frames_per_shot = height, width, frames
  d.text_len = 512  # Wan pads every prompt to 512 umT5 tokens
  d.batch_size = 128  # the paper trains on 128 A100s; its batch size is not stated (paper.md)
  c.codec = ml_collections.ConfigDict(dict(name="wan_vae", vae=vae, dtype="bfloat16"))
  c.text_encoder = ml_collections.ConfigDict(dict(_UMT5_XXL, dtype="bfloat16", param_dtype="bfloat16"))
  if image_encoder:
    c.image_encoder = ml_collections.ConfigDict(dict(_CLIP_VIT_H14, dtype="bfloat16", param_dtype="bfloat16"))
  else:  # T2V / TI2V backbones have no image cross-attention
    c.conditioner.image_condition = "none"
  m = c.model
  m.update(_DITS[dit])
  m.patch_size = (1, 2, 2)
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.scan_layers = True
  m.remat = "full"
  c.flow.prediction = "v"  # what Wan was trained with
  c.flow.loss_weight_t = 0.0  # and with the plain velocity MSE
  c.flow.timestep_shift = 3.0 if height * width <= 480 * 832 else 5.0
  c.flow.logit_normal_std = 1.0
  c.flow.p_drop_memory = 0.05
  c.optim.pretrained_lr = 1e-5  # design notes: the paper's 5e-4 is one flag away
  c.optim.frozen = ("text_encoder",)
  c.num_train_steps = 20_000
  c.log_every_steps = 10
  c.sample_every_steps = 0
  c.checkpoint_every_steps = 500
  c.sample.steps = 40
  c.sample.shift = c.flow.timestep_shift
  c.sample.guidance = 5.0
  c.sample.memory_guidance = 0.0  # not measured at this scale yet; --memory_guidance turns it on
  c.sample.fps = 16  # Wan's frame rate
  if m.first_frame == "none":
    c.flow.p_i2v = 0.0  # a text-to-video backbone has no first-frame path
  return c


_VARIANTS = {
    "wan21_i2v_14b_480p": lambda c: _wan(c, "wan21_i2v_14b", "wan2.1", 480, 832, 81, image_encoder=True),
    "wan21_i2v_14b_720p": lambda c: _wan(c, "wan21_i2v_14b", "wan2.1", 720, 1280, 81, image_encoder=True),
    "wan21_t2v_1_3b": lambda c: _wan(c, "wan21_t2v_1_3b", "wan2.1", 480, 832, 81, image_encoder=False),
    "wan22_ti2v_5b": lambda c: _wan(c, "wan22_ti2v_5b", "wan2.2", 704, 1280, 121, image_encoder=False),
    "demo": lambda c: c,
    "tiny": _tiny,
}
DEFAULT_VARIANT = "wan21_i2v_14b_480p"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or DEFAULT_VARIANT
  if variant not in _VARIANTS:
    raise ValueError(f"configs/onestory.py: unknown variant {variant!r}; expected one of {sorted(_VARIANTS)}")
  c = _VARIANTS[variant](_base())
  c.variant = variant
  return c
