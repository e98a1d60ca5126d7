r"""OneStory configurations.

Variants (the part after the colon):

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
variant; only sizes and the codec / text-encoder backends change.
"""
import ml_collections


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- data
  c.data = d = ml_collections.ConfigDict()
  d.name = "storyworld"
  d.source = "on_the_fly"  # 'on_the_fly' | 'tfds'
  d.tfds_data_dir = ""  # used when source == 'tfds'
  d.height = 32
  d.width = 32
  d.frames_per_shot = 8
  d.min_shots = 2
  d.max_shots = 6
  d.num_train_stories = 100_000  # size of the procedural index space
  d.batch_size = 8  # global batch
  d.worker_count = 0  # grain worker processes (0 = in-process)
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
  m.patch_size = (1, 2, 2)
  m.freq_dim = 256
  m.eps = 1e-6
  m.qk_norm = True
  m.cross_attn_norm = True
  m.rope_theta = 10000.0
  m.i2v = True  # first-frame latent + mask channels, image cross-attention
  m.dtype = "float32"  # compute dtype ('bfloat16' on accelerators)
  m.param_dtype = "float32"
  m.scan_layers = False
  m.remat = "none"  # 'none' | 'full' | 'dots'

  # ---------------------------------------------------------------- Frame Selection (Eq. 3-6, 11)
  c.selection = s = ml_collections.ConfigDict()
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
  # 'x': the DiT predicts x_0 (the demo: its 384-value tokens exceed the width 128); 'v': velocity (Wan weights).
  f.prediction = "x"
  f.timestep_shift = 1.0  # SD3-style shift of training timesteps
  f.logit_normal_mean = 0.0
  f.logit_normal_std = 1.0
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

  c.num_train_steps = 4000
  c.warmup_fraction_dc = 0.2  # decoupled-conditioning warm-up (paper Sec. 4.4)

  # ---------------------------------------------------------------- sampling
  c.sample = sm = ml_collections.ConfigDict()
  sm.steps = 20
  sm.shift = 1.0
  sm.guidance = 3.0

  # ---------------------------------------------------------------- execution
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1, 1)  # (data, fsdp, context, tensor); one entry may be -1
  c.mesh.axes = ("data", "fsdp", "context", "tensor")
  # Logical-axis rules: logical name -> mesh axes.
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
  return c


def _tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.data.batch_size = 8
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
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = _base()
  variant = arg or "demo"
  if variant == "demo":
    pass
  elif variant == "tiny":
    c = _tiny(c)
  else:
    raise ValueError(f"configs/onestory.py: unknown variant {variant!r}; expected one of 'demo', 'tiny'")
  c.variant = variant
  return c
