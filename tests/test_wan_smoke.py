"""Smoke test of published weights: convert, train and sample on weights in the published Wan format.

A tiny random Wan2.1-I2V release is built in-process in the diffusers layout: ``transformer/`` (a
``WanTransformer3DModel`` with the I2V image branch, saved in several shards), ``vae/`` (an ``AutoencoderKLWan`` with
Wan2.1's 16 latent channels and stride 4x8x8), ``text_encoder/`` (``UMT5EncoderModel``) with
``tokenizer/tokenizer.json``, and ``image_encoder/`` (``CLIPVisionModel``) with
``image_processor/preprocessor_config.json``; every model is saved with ``save_pretrained(safe_serialization=True)``.
The convert CLI runs in-process with ``--scan_layers``; the paper's default config (``wan21_i2v_14b_480p``) is shrunk
to that release and trained for 3 steps on 8 simulated devices (mesh data 2 x fsdp 4, so the restored parameters are
really sharded; the global batch is 8 because the batch is split over both axes); then a 2-shot I2MSV story is
sampled from the workdir: real umT5 text encoding, the start image through the I2V first-frame path and CLIP, Frame
Selection and the Adaptive Conditioner on real VAE latents, and VAE decoding to frames and mp4. A Wan2.1-T2V layout
(no image branch), converted without ``--scan_layers``, is restored too.

Restored weights are compared exactly (``assert_array_equal``) with the reference models' tensors, through each
port's published-name key map, so no tolerance is involved here; numerical parity of the ports themselves (relative
error max|ours - reference| / max|reference| <= 1e-5 in float32) is in tests/test_parity_*.py.
"""

import json
import os

import diffusers
import jax
import ml_collections
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from onestory_jax import checkpoints
from onestory_jax import convert
from onestory_jax import next_shot
from onestory_jax import pipeline
from onestory_jax import story as story_lib
from onestory_jax import trainer as trainer_lib
from onestory_jax import video_io
from onestory_jax import weights
from onestory_jax.data import sources
from onestory_jax.data import storyworld
from onestory_jax.models import adaptive_conditioner as ac
from onestory_jax.models.wan import clip as clip_vision
from onestory_jax.models.wan import dit as wan_dit
from onestory_jax.models.wan import umt5 as te
from onestory_jax.models.wan import vae as wan_vae
from tests.helpers import TINY_WAN_DIT
from tests.helpers import load_config

# Tiny sizes; the structure (channels 16 + 4 + 16, stride 4x8x8, image tokens through added k/v) is Wan2.1-I2V's.
HEADS, HEAD_DIM, FFN, LAYERS, FREQ = (
    TINY_WAN_DIT[k] for k in ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "freq_dim")
)
DIM = HEADS * HEAD_DIM
UMT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, rel_buckets=32, rel_max_distance=128)
CLIP = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, patch_size=14, image_size=28)
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
Z, MASK = 16, 4
HW, FRAMES, TEXT_LEN, BATCH, STEPS = 32, 5, 16, 8, 3
MESH = (2, 4, 1, 1)  # data x fsdp: batch over 8 devices, parameters sharded 4 ways on 'embed'


# ----------------------------------------------------------------------------- the release


def _tokenizer_json(path: str) -> int:
  """A umT5-like Unigram tokenizer over the StoryWorld words (pad 0, eos 1, unk 2); returns its vocabulary size."""
  special = ["<pad>", "</s>", "<unk>"]
  words = [f"\u2581{w}" for w in storyworld.vocabulary()] + ["\u2581"]
  chars = [c for c in "abcdefghijklmnopqrstuvwxyz0123456789,." if f"\u2581{c}" not in words]
  vocab = [(p, 0.0) for p in special] + [(w, -2.0) for w in words] + [(c, -8.0) for c in chars]
  tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
  tok.normalizer = normalizers.NFKC()
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
  tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  tok.add_special_tokens(special)
  tok.save(path)
  return tok.get_vocab_size()


def _perturbed(model: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
  """Noise on every parameter, so that no norm is identity and no bias or projection starts at zero."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model.eval()


def build_release(root: str, *, i2v: bool = True) -> dict:
  """Writes a tiny diffusers-format Wan2.1 release under ``root``; returns every component's state dict."""
  torch.manual_seed(0)
  os.makedirs(os.path.join(root, "tokenizer"))
  vocab = _tokenizer_json(os.path.join(root, "tokenizer", "tokenizer.json"))
  umt5 = _perturbed(
      transformers.UMT5EncoderModel(
          transformers.UMT5Config(
              vocab_size=vocab,
              d_model=UMT5["d_model"],
              d_kv=UMT5["d_kv"],
              d_ff=UMT5["d_ff"],
              num_layers=UMT5["num_layers"],
              num_heads=UMT5["num_heads"],
              feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=UMT5["rel_buckets"],
              relative_attention_max_distance=UMT5["rel_max_distance"],
              dropout_rate=0.0,
          )
      ),
      0.1,
  )
  umt5.save_pretrained(os.path.join(root, "text_encoder"), safe_serialization=True)
  vae = diffusers.AutoencoderKLWan(**VAE).eval()
  vae.save_pretrained(os.path.join(root, "vae"), safe_serialization=True)
  image = {}
  if i2v:
    clip = _perturbed(
        transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(
                hidden_size=CLIP["hidden_size"],
                intermediate_size=CLIP["intermediate_size"],
                num_hidden_layers=CLIP["num_layers"],
                num_attention_heads=CLIP["num_heads"],
                patch_size=CLIP["patch_size"],
                image_size=CLIP["image_size"],
                hidden_act="gelu",
            )
        ),
        0.1,
    )
    clip.save_pretrained(os.path.join(root, "image_encoder"), safe_serialization=True)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": CLIP["image_size"]},
        crop_size={"height": CLIP["image_size"], "width": CLIP["image_size"]},
    ).save_pretrained(os.path.join(root, "image_processor"))
    image = dict(image_dim=CLIP["hidden_size"], added_kv_proj_dim=DIM)
  dit = _perturbed(
      diffusers.WanTransformer3DModel(
          **TINY_WAN_DIT, in_channels=Z + MASK + Z if i2v else Z, out_channels=Z, text_dim=UMT5["d_model"], **image
      )
  )
  dit.save_pretrained(os.path.join(root, "transformer"), safe_serialization=True, max_shard_size="40KB")
  refs = {"transformer": dit, "vae": vae, "text_encoder": umt5}
  if i2v:
    refs["image_encoder"] = clip
  return {k: {n: t.detach().float().numpy() for n, t in m.state_dict().items()} for k, m in refs.items()}


def tiny_config(variant: str, dst: str, **overrides):
  """``variant`` of configs/onestory.py shrunk to the release of :func:`build_release`."""
  kw = {
      "pretrained": dst,
      "model.dim": DIM,
      "model.ffn_dim": FFN,
      "model.num_heads": HEADS,
      "model.num_layers": LAYERS,
      "model.freq_dim": FREQ,
      "model.dtype": "float32",
      "codec": _codec(VAE),
      **{f"text_encoder.{k}": v for k, v in UMT5.items()},
      "text_encoder.vocab_size": _vocab_size(dst),
      "text_encoder.dtype": "float32",
      "text_encoder.param_dtype": "float32",
      "data.height": HW,
      "data.width": HW,
      "data.frames_per_shot": FRAMES,
      "data.text_len": TEXT_LEN,
      "data.batch_size": BATCH,
      "mesh.shape": MESH,
      # K_sel = 2: a 2-shot story's memory is one shot of 2 latent frames (top-K needs K <= memory frames).
      "selection.num_queries": 4,
      "selection.num_heads": 2,
      "selection.k_sel": 2,
      "optim.warmup_steps": 1,
      "num_train_steps": STEPS,
      "checkpoint_every_steps": STEPS,
      "log_every_steps": STEPS,
      "sample.steps": 2,
  }
  if variant.startswith("wan21_i2v"):
    kw.update({f"image_encoder.{k}": v for k, v in CLIP.items()})
    kw.update({"image_encoder.dtype": "float32", "image_encoder.param_dtype": "float32"})
  kw.update(overrides)
  return load_config(variant, **kw)


def _codec(vae: dict) -> ml_collections.ConfigDict:
  """config.codec with the VAE given as the keys of its diffusers config.json (a preset name is a str field)."""
  return ml_collections.ConfigDict(dict(name="wan_vae", vae=dict(vae), dtype="float32"))


def _vocab_size(dst: str) -> int:
  return tokenizers.Tokenizer.from_file(os.path.join(dst, "tokenizer", "tokenizer.json")).get_vocab_size()


def _at(tree, path, layer=None):
  for k in path:
    tree = tree[k]
  return np.asarray(tree if layer is None else tree[layer])


def assert_restored(tree, state_dict: dict, key_map) -> None:
  """Every published tensor sits, transformed, exactly where the port's key map sends it, and together they fill
  every parameter of ``tree`` (the mapped tensors hold as many values as the tree)."""
  n = 0
  for name, value in state_dict.items():
    target = key_map(name)
    if target is None:  # a name the port drops on purpose (a tied duplicate, a tensor the reference ignores)
      continue
    np.testing.assert_array_equal(_at(tree, target.path, target.layer), target.transform(value), err_msg=name)
    n += value.size
  assert n == sum(np.size(x) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  src = str(tmp_path_factory.mktemp("wan21_i2v_tiny"))
  return src, build_release(src)


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
  src, _ = release
  dst = str(tmp_path_factory.mktemp("converted"))
  rc = convert.main([f"--src={src}", f"--dst={dst}", "--scan_layers", "--batch_mb=0.05"])
  with open(os.path.join(dst, "report.json")) as f:
    return dst, rc, json.load(f)


@pytest.fixture(scope="module")
def trained(converted, tmp_path_factory):
  """3 steps of train_and_evaluate; records the state right after init, the encoders, the batches and metrics."""
  assert jax.device_count() == 8
  dst = converted[0]
  workdir = str(tmp_path_factory.mktemp("run"))
  rec = {"metrics": [], "batches": []}
  real_init, real_step = trainer_lib.Trainer.init_state, trainer_lib.Trainer.step

  def init_state(self):
    state = real_init(self)
    q = state.params["dit"]["blocks"]["attn1"]["to_q"]["kernel"]
    rec.update(
        params=jax.device_get(state.params),
        opt_state=jax.device_get(state.opt_state),
        enc=jax.device_get(self.enc),
        q_spec=q.sharding.spec,
        q_shards={s.data.shape for s in q.addressable_shards},
        tokenizer=self.system.tokenizer,
    )
    return state

  def step(self, state, batch):
    rec["batches"].append(batch)
    state, metrics = real_step(self, state, batch)
    rec["metrics"].append(jax.device_get(metrics))
    return state, metrics

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer_lib.Trainer, "init_state", init_state)
    mp.setattr(trainer_lib.Trainer, "step", step)
    state = trainer_lib.train_and_evaluate(tiny_config("wan21_i2v_14b_480p", dst), workdir)
  rec["final"] = jax.device_get(state.params)
  rec["workdir"] = workdir
  return rec


# ----------------------------------------------------------------------------- convert


def test_release_converts_every_component(release, converted):
  src, _ = release
  dst, rc, report = converted
  assert rc == 0 and report["ok"] and report["scan_layers"]
  comps = report["components"]
  assert sorted(comps) == ["image_encoder", "text_encoder", "transformer", "vae"]
  for name, entry in comps.items():
    assert entry["status"] == "ok" and entry["missing"] == entry["unexpected"] == [], name
  assert len(comps["transformer"]["files"]) >= 3  # a multi-shard transformer, as the published 14B one
  assert "tokenizer/tokenizer.json" in comps["text_encoder"]["assets"]
  assert "image_processor/preprocessor_config.json" in comps["image_encoder"]["assets"]
  for name in comps:  # the release's config.json of each component, which the loaders check the run config against
    with open(os.path.join(src, name, "config.json")) as f, open(os.path.join(dst, f"{name}.config.json")) as g:
      assert json.load(f) == json.load(g)


# ----------------------------------------------------------------------------- train


def test_fresh_start_restores_the_converted_weights(release, trained):
  """Right after init: DiT, umT5, VAE and CLIP are the release's tensors; the new modules are initialised."""
  _, sd = release
  params, enc = trained["params"], trained["enc"]
  assert_restored(
      params["dit"], sd["transformer"], lambda k: wan_dit.torch_key_to_target(k, num_layers=LAYERS, scanned=True)
  )
  assert_restored(
      params["text_encoder"], sd["text_encoder"], lambda k: te.umt5_torch_key_to_target(k, num_heads=UMT5["num_heads"])
  )
  assert_restored(enc["codec"], sd["vae"], wan_vae.torch_key_to_target)
  assert_restored(enc["image_encoder"], sd["image_encoder"], clip_vision.torch_key_to_target)
  # Sharded straight into the layout of the rules: the stacked q kernel (layers, embed, heads) is split 4 ways
  # over fsdp on its embed axis.
  assert trained["q_spec"][1] == "fsdp" and trained["q_shards"] == {(LAYERS, DIM // 4, DIM)}
  # Adaptive Conditioner: FramePack initialisation from the restored patch embedding.
  pe = params["dit"]["patch_embedding"]
  kernels = [tuple(k) for k in load_config("wan21_i2v_14b_480p").conditioner.kernels]
  want = ac.init_patchifiers_from_patch_embedding(pe["kernel"], kernels, Z)
  for i, w in enumerate(want):
    np.testing.assert_allclose(params["adaptive_conditioner"][f"patchifier_{i}"]["kernel"], w, rtol=1e-6)
    np.testing.assert_array_equal(params["adaptive_conditioner"][f"patchifier_{i}"]["bias"], pe["bias"])
  # Frame Selection is fresh; every AdamW moment starts at zero.
  assert all(np.abs(x).sum() > 0 for x in jax.tree.leaves(params["frame_selection"]) if x.ndim == 2)
  assert all(not np.any(x) for x in jax.tree.leaves(trained["opt_state"]) if np.ndim(x) > 0)


def test_training_runs_with_finite_loss(trained):
  assert len(trained["metrics"]) == STEPS
  for m in trained["metrics"]:
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
  init, final = trained["params"], trained["final"]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(final))
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init["dit"]), jax.tree.leaves(final["dit"]))]
  assert any(changed)
  for a, b in zip(jax.tree.leaves(init["text_encoder"]), jax.tree.leaves(final["text_encoder"])):
    np.testing.assert_array_equal(a, b)  # optim.frozen = ('text_encoder',) in the Wan configs
  steps = sorted(int(d) for d in os.listdir(os.path.join(trained["workdir"], "checkpoints")) if d.isdigit())
  assert steps == [STEPS]


def test_training_batches_use_the_release_tokenizer(converted, trained):
  """Real text encoding in training: caption tokens come from the release's umT5 tokenizer (EOS-terminated)."""
  config = tiny_config("wan21_i2v_14b_480p", converted[0])
  stories = sources.make_story_source(config)
  tok = trained["tokenizer"]
  for batch in trained["batches"][:1]:
    for tokens, index in zip(batch["tokens"], batch["story"]):
      captions = [s["caption"] for s in stories.record(int(index))[0]["shots"]]
      assert any(np.array_equal(tokens, row) for row in tok.encode(captions)), (tokens, captions)


def test_resume_takes_precedence_over_pretrained(converted, trained):
  """Re-running the finished command restores the workdir; the converted weights are not read again."""

  def refuse(self):
    raise AssertionError("init_state must not run when the workdir holds a checkpoint")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer_lib.Trainer, "init_state", refuse)
    state = trainer_lib.train_and_evaluate(tiny_config("wan21_i2v_14b_480p", converted[0]), trained["workdir"])
  assert int(state.step) == STEPS
  for a, b in zip(jax.tree.leaves(trained["final"]), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)


def test_mismatched_conversions_are_explained(converted):
  dst = converted[0]
  with pytest.raises(
      ValueError,
      match=r"converted with --scan_layers, but config.model.scan_layers=False.*" r"--config.model.scan_layers=True",
  ):
    trainer_lib.Trainer(tiny_config("wan21_i2v_14b_480p", dst, **{"model.scan_layers": False})).init_state()
  with pytest.raises(ValueError, match=r"model.ffn_dim: run config has 128, the release has 64"):
    trainer_lib.Trainer(tiny_config("wan21_i2v_14b_480p", dst, **{"model.ffn_dim": 128})).init_state()
  with pytest.raises(ValueError, match=r"text_encoder.d_ff: run config has 32, the release has 64"):
    trainer_lib.Trainer(tiny_config("wan21_i2v_14b_480p", dst, **{"text_encoder.d_ff": 32})).init_state()
  with pytest.raises(ValueError, match=r"codec.vae.num_res_blocks: run config has 2, the release has 1"):
    next_shot.make_system(
        tiny_config("wan21_i2v_14b_480p", dst, codec=_codec(dict(VAE, num_res_blocks=2)))
    ).encoder_params(jax.random.key(0))
  with pytest.raises(ValueError, match=r"image_encoder.act: run config has 'quick_gelu', the release has 'gelu'"):
    next_shot.make_system(tiny_config("wan21_i2v_14b_480p", dst, **{"image_encoder.act": "quick_gelu"})).encoder_params(
        jax.random.key(0)
    )
  with pytest.raises(ValueError, match="no 'vae' checkpoint|no vae.config.json"):
    next_shot.make_system(
        tiny_config(
            "wan21_i2v_14b_480p",
            dst,
            pretrained=str(dst) + "_nothing",
            **{"text_encoder.tokenizer": os.path.join(dst, "tokenizer")},
        )
    ).encoder_params(jax.random.key(0))


# ----------------------------------------------------------------------------- sample


def test_sample_a_two_shot_story(trained, tmp_path, monkeypatch):
  """I2MSV from the workdir: start image -> shot 1; shot 2 selects from shot 1's real VAE latents."""
  cfg = storyworld.StoryWorldConfig(height=HW, width=HW, frames_per_shot=FRAMES)
  story_raw = storyworld.generate_story(11, "consistency", cfg, num_shots=2)
  video_io.save_png(str(tmp_path / "start.png"), storyworld.render_shot(story_raw, 0)[0])
  (tmp_path / "story.json").write_text(
      json.dumps({"shots": [{"caption": s["caption"]} for s in story_raw["shots"]], "start_image": "start.png"})
  )
  story = story_lib.load_story(str(tmp_path / "story.json"))

  loads = []
  load_converted = weights.load_converted
  monkeypatch.setattr(
      weights,
      "load_converted",
      lambda dst, component, *a, **k: loads.append(component) or load_converted(dst, component, *a, **k),
  )
  system, params, enc = checkpoints.load_for_sampling(trained["workdir"])
  assert sorted(loads) == ["image_encoder", "vae"]  # each frozen encoder read once; the DiT from the workdir
  assert system.latent_shape == (2, HW // 8, HW // 8, Z)  # Wan2.1 VAE: stride (4, 8, 8), 16 channels
  assert all(system.tokenizer.eos_id in row for row in system.tokenizer.encode(story.captions))  # umT5's
  for a, b in zip(jax.tree.leaves(trained["enc"]), jax.tree.leaves(jax.device_get(enc))):
    np.testing.assert_array_equal(a, b)  # the sampler's encoders are the converted ones too
  out = tmp_path / "out"
  run = pipeline.OneStoryPipeline(system, params, enc).generate(
      story.captions, seed=0, start_image=story.start_image, out=str(out)
  )
  run.save()
  manifest = run.manifest

  frames = video_io.load_frames_npz(str(out / "frames.npz"))
  assert [f.shape for f in frames] == [(FRAMES, HW, HW, 3)] * 2 and all(f.dtype == np.uint8 for f in frames)
  assert all(f.std() > 0 for f in frames)
  with np.load(out / "latents.npz") as z:
    assert [z[f"shot_{i}"].shape for i in range(2)] == [system.latent_shape] * 2
  for name in ("shot_00.mp4", "shot_01.mp4", "story.mp4", "contact_sheet.png"):
    assert os.path.getsize(out / name) > 0, name
  assert manifest["complete"] and manifest["start_image"].endswith("start.png")
  first, second = manifest["shots"]
  assert first["selected"] == [] and first["context_tokens"] == 0
  assert 1 <= second["context_tokens"] <= 4  # budget: one latent frame of tokens
  kernels = [list(k) for k in system.config.conditioner.kernels]
  assert second["selected"] and all(
      0 <= s["memory_frame"] < 2 and s["shot"] == 0 and s["patchifier"] in kernels for s in second["selected"]
  )


# ----------------------------------------------------------------------------- T2V


def test_t2v_release_without_scanned_layers(tmp_path):
  """Wan2.1-T2V layout (no image branch, no image encoder in the release), converted without --scan_layers."""
  src, dst = str(tmp_path / "release"), str(tmp_path / "converted")
  sd = build_release(src, i2v=False)
  assert convert.main([f"--src={src}", f"--dst={dst}", "--batch_mb=0.05"]) == 0
  with open(os.path.join(dst, "report.json")) as f:
    assert sorted(json.load(f)["components"]) == ["text_encoder", "transformer", "vae"]
  with pytest.raises(
      ValueError,
      match=r"converted without --scan_layers, but config.model.scan_layers=True.*" r"--overwrite --scan_layers",
  ):
    trainer_lib.Trainer(tiny_config("wan21_t2v_1_3b", dst)).init_state()
  tr = trainer_lib.Trainer(tiny_config("wan21_t2v_1_3b", dst, **{"model.scan_layers": False}))
  assert tr.system.config.conditioner.image_condition == "none" and tr.enc["image_encoder"] == {}
  assert_restored(jax.device_get(tr.enc["codec"]), sd["vae"], wan_vae.torch_key_to_target)
  params = jax.device_get(tr.init_state().params)
  assert "image_embedder" not in params["dit"]["condition_embedder"]
  assert params["dit"]["patch_embedding"]["kernel"].shape[3] == Z  # noise latent only, no I2V channels
  assert_restored(
      params["dit"], sd["transformer"], lambda k: wan_dit.torch_key_to_target(k, num_layers=LAYERS, scanned=False)
  )
  assert_restored(
      params["text_encoder"], sd["text_encoder"], lambda k: te.umt5_torch_key_to_target(k, num_heads=UMT5["num_heads"])
  )
