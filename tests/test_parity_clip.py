"""Parity of the CLIP vision tower (Wan2.1-I2V's image encoder) and its preprocessing with transformers.

A tiny random transformers ``CLIPVisionModel`` is saved as safetensors in the published layout
(``vision_model.*`` names, as the Wan2.1 release has them) and in transformers 5's layout (no
prefix), read back with ``safetensors.numpy`` and mapped tensor by tensor through
``clip_vision.torch_key_to_target``.

Relative error is ``max|ours - ref| / max|ref|`` over the whole output tensor. Float32 bound:
1e-5. Bfloat16 bound (our tower computing in bfloat16 with float32 parameters, against the float32
reference): 3e-2, about four bfloat16 ulps (2^-8 each) at the largest output.

Preprocessing: CLIPImageProcessor resizes with PIL, which works on uint8 and rounds after each
separable pass with fixed-point weights; ``clip_vision.preprocess`` applies the same bicubic
filter in float32 and rounds at the same places. The two agree to one uint8 step (1/255 before
normalisation, so 1/255/std after it) on rare pixels where float32 and PIL's fixed-point
arithmetic round a half-way value differently; the test asserts that bound and that such pixels
are fewer than 1%. Through the tiny tower, one-step differences at three pixels move the tokens by a
relative 2e-3; the end-to-end test (processor + tower against ours from [-1, 1] images) asserts 1e-2,
versus 1e-5 when both sides see the same pixels.
"""

import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from onestory_jax.models.wan import clip as cv
from onestory_jax.models import image_encoder as ie_lib

F32_TOL = 1e-5
BF16_TOL = 3e-2
PIPELINE_TOL = 1e-2  # tokens from uint8-PIL vs float preprocessing (see the module docstring)
HIDDEN, INTER, LAYERS, HEADS, PATCH, SIZE = 32, 64, 3, 4, 14, 28


def rel_err(ours, ref) -> float:
  """max|ours - ref| / max|ref| (the parity metric of these tests)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _images(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
  """uint8 [n, H, W, 3]: smooth random content plus noise (bicubic over- and undershoots)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    base = (rng.random((shape[0] // 4 + 2, shape[1] // 4 + 2, 3)) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize(shape[::-1], Image.BILINEAR)).astype(np.int32)
    out.append(np.clip(img + rng.integers(-30, 31, img.shape), 0, 255).astype(np.uint8))
  return np.stack(out)


def _to_unit(images_u8: np.ndarray) -> jax.Array:
  return jnp.asarray(images_u8, jnp.float32) / 127.5 - 1.0


def _load_params(directory: str, abstract) -> dict:
  """Streams the safetensors of ``directory`` through the key map; checks paths and shapes."""
  want = {k: v.shape for k, v in flax.traverse_util.flatten_dict(abstract).items()}
  got = {}
  for file in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
    with safe_open(os.path.join(directory, file), framework="numpy") as f:
      for name in f.keys():
        target = cv.torch_key_to_target(name)
        if target is None:
          continue
        value = target.transform(f.get_tensor(name))
        assert target.path in want, f"{name} -> unexpected path {target.path}"
        assert value.shape == want[target.path], (name, value.shape, want[target.path])
        assert target.path not in got, f"{name}: {target.path} written twice"
        got[target.path] = jnp.asarray(value, jnp.float32)
  missing = sorted(set(want) - set(got))
  assert not missing, f"parameters not written: {missing}"
  return flax.traverse_util.unflatten_dict(got)


def _reference_model(act: str, layers: int, seed: int) -> CLIPVisionModel:
  torch.manual_seed(seed)
  cfg = CLIPVisionConfig(
      hidden_size=HIDDEN,
      intermediate_size=INTER,
      num_hidden_layers=layers,
      num_attention_heads=HEADS,
      image_size=SIZE,
      patch_size=PATCH,
      hidden_act=act,
  )
  model = CLIPVisionModel(cfg).eval()
  with torch.no_grad():  # LayerNorms start at (1, 0); make them matter
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """image_encoder/ in the published (vision_model.*) layout and in transformers 5's layout."""
  root = tmp_path_factory.mktemp("clip_release")
  model = _reference_model("gelu", LAYERS, 0)
  model.save_pretrained(str(root / "image_encoder_v5"), safe_serialization=True)
  os.makedirs(root / "image_encoder")
  state = {f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
  save_file(state, str(root / "image_encoder" / "model.safetensors"), metadata={"format": "pt"})
  with open(root / "image_encoder_v5" / "config.json") as f:
    cfg = json.load(f)
  with open(root / "image_encoder" / "config.json", "w") as f:
    json.dump(cfg, f)
  return root, model


@pytest.fixture(scope="module")
def ours(release):
  root, _ = release
  with open(root / "image_encoder" / "config.json") as f:
    sizes = cv.config_from_transformers(json.load(f))
  config = ml_collections.ConfigDict({"image_encoder": dict(sizes, layer=-2)})
  enc = ie_lib.make_image_encoder(config)
  abstract = nn.unbox(jax.eval_shape(enc.init, jax.random.key(0)))
  with open(root / "image_encoder" / "config.json") as f:
    cfg = json.load(f)
  # What the converter builds from the release's config.json is the encoder's own tree.
  assert jax.tree.map(lambda x: (x.shape, x.dtype), cv.abstract_params_from_transformers(cfg)) == jax.tree.map(
      lambda x: (x.shape, x.dtype), abstract
  )
  params = _load_params(str(root / "image_encoder"), abstract)
  return enc, params


def _torch_hidden_states(model, pixels_nhwc: np.ndarray):
  with torch.no_grad():
    out = model(pixel_values=torch.as_tensor(np.transpose(pixels_nhwc, (0, 3, 1, 2))), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states], out.pooler_output.numpy()


# ------------------------------------------------------------------ key map and configs
def test_both_layouts_map_to_the_same_parameters(release, ours):
  root, model = release
  enc, params = ours
  abstract = nn.unbox(jax.eval_shape(enc.init, jax.random.key(0)))
  v5 = _load_params(str(root / "image_encoder_v5"), abstract)
  jax.tree.map(np.testing.assert_array_equal, v5, params)
  target = cv.torch_key_to_target("vision_model.encoder.layers.2.self_attn.out_proj.weight")
  assert target.path == ("layers_2", "attn", "o", "kernel")
  w = model.state_dict()["encoder.layers.2.self_attn.out_proj.weight"].numpy()
  np.testing.assert_array_equal(target.transform(w), w.T)
  conv = cv.torch_key_to_target("embeddings.patch_embedding.weight")
  w = model.state_dict()["embeddings.patch_embedding.weight"].numpy()  # [D, C, p, p]
  np.testing.assert_array_equal(conv.transform(w)[3, 5, 1], w[:, 1, 3, 5])


def test_key_map_skips_and_errors():
  assert cv.torch_key_to_target("vision_model.embeddings.position_ids") is None
  assert cv.torch_key_to_target("visual_projection.weight") is None
  assert cv.torch_key_to_target("post_layernorm.bias").path == ("post_norm", "bias")
  assert cv.torch_key_to_target("vision_model.pre_layrnorm.weight").path == ("pre_norm", "scale")
  assert cv.torch_key_to_target("encoder.layers.0.layer_norm2.weight").path == ("layers_0", "norm2", "scale")
  for bad in (
      "text_model.embeddings.token_embedding.weight",
      "logit_scale",
      "vision_model.encoder.layers.0.self_attn.q_proj.scale",
      "vision_model.encoder.layers.x.mlp.fc1.weight",
      "vision_model.encoder.layers.0.mlp.fc3.weight",
      "vision_model.post_layernorm.gamma",
  ):
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
      cv.torch_key_to_target(bad)


def test_config_from_transformers(release):
  root, _ = release
  with open(root / "image_encoder" / "config.json") as f:
    cfg = json.load(f)
  sizes = cv.config_from_transformers(cfg)
  assert sizes == dict(
      name="clip_vision",
      hidden_size=HIDDEN,
      intermediate_size=INTER,
      num_layers=LAYERS,
      num_heads=HEADS,
      patch_size=PATCH,
      image_size=SIZE,
      num_channels=3,
      eps=1e-5,
      act="gelu",
  )
  nested = {"model_type": "clip", "vision_config": {k: v for k, v in cfg.items() if k != "model_type"}}
  assert cv.config_from_transformers(nested) == sizes
  with pytest.raises(ValueError, match="model_type"):
    cv.config_from_transformers(dict(cfg, model_type="siglip_vision_model"))
  with pytest.raises(ValueError, match="'patch_size'"):
    cv.config_from_transformers({k: v for k, v in cfg.items() if k != "patch_size"})
  with pytest.raises(ValueError, match="hidden_act"):
    cv.config_from_transformers(dict(cfg, hidden_act="relu"))
  proc = CLIPImageProcessor().to_dict()  # transformers' defaults are Wan's image_processor/
  assert cv.processor_config_from_transformers(proc) == dict(
      crop_size=224, shortest_edge=224, mean=cv.CLIP_MEAN, std=cv.CLIP_STD
  )
  with pytest.raises(ValueError, match="resample"):
    cv.processor_config_from_transformers(dict(proc, resample=2))
  with pytest.raises(ValueError, match="square"):
    cv.processor_config_from_transformers(dict(proc, crop_size={"height": 224, "width": 200}))


# ------------------------------------------------------------------ numerical parity
def test_parity_float32_every_hidden_state(release, ours):
  _, model = release
  enc, params = ours
  pixels = np.random.default_rng(1).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
  ref_states, ref_pooled = _torch_hidden_states(model, pixels)
  assert len(ref_states) == LAYERS + 1
  module = enc.module
  apply = jax.jit(module.apply, static_argnames="layer")
  for layer in list(range(LAYERS + 1)) + [-2]:
    out = apply({"params": params}, jnp.asarray(pixels), layer=layer)
    assert out.shape == (2, 1 + (SIZE // PATCH) ** 2, HIDDEN)
    err = rel_err(out, ref_states[layer])
    assert err <= F32_TOL, (layer, err)
  pooled = module.apply({"params": params}, jnp.asarray(pixels), method="pooled")
  assert rel_err(pooled, ref_pooled) <= F32_TOL
  with pytest.raises(ValueError, match="layer"):
    module.apply({"params": params}, jnp.asarray(pixels), layer=LAYERS + 1)
  with pytest.raises(ValueError, match="pixels"):
    module.apply({"params": params}, jnp.zeros((1, SIZE + 14, SIZE, 3)))


def test_parity_quick_gelu_tower(tmp_path):
  model = _reference_model("quick_gelu", 1, 3)
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  with open(tmp_path / "config.json") as f:
    sizes = cv.config_from_transformers(json.load(f))
  assert sizes["act"] == "quick_gelu"
  module = cv.CLIPVisionTransformer(**{k: v for k, v in sizes.items() if k != "name"})
  pixels = np.random.default_rng(2).standard_normal((1, SIZE, SIZE, 3)).astype(np.float32)
  params = _load_params(str(tmp_path), nn.unbox(jax.eval_shape(module.init, jax.random.key(0), pixels))["params"])
  ref_states, _ = _torch_hidden_states(model, pixels)
  assert rel_err(module.apply({"params": params}, jnp.asarray(pixels), layer=-1), ref_states[-1]) <= F32_TOL


def test_parity_bfloat16_bound(release, ours):
  _, model = release
  enc, params = ours
  pixels = np.random.default_rng(1).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
  ref_states, _ = _torch_hidden_states(model, pixels)
  module = enc.module.clone(dtype=jnp.bfloat16)
  out = jax.jit(module.apply)({"params": params}, jnp.asarray(pixels))
  assert out.dtype == jnp.bfloat16
  err = rel_err(np.asarray(out.astype(jnp.float32)), ref_states[-2])
  assert F32_TOL < err <= BF16_TOL, err


# ------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize(
    "shape,crop", [((40, 64), SIZE), ((64, 40), SIZE), ((SIZE, SIZE), SIZE), ((60, 104), 224), ((480, 832), 224)]
)
def test_preprocess_matches_clip_image_processor(shape, crop):
  images = _images(shape, 2, seed=shape[0])
  proc = CLIPImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
  ref = np.transpose(proc(images=list(images), return_tensors="np")["pixel_values"], (0, 2, 3, 1))
  out = np.asarray(jax.jit(lambda x: cv.preprocess(x, crop_size=crop))(_to_unit(images)))
  assert out.shape == ref.shape == (2, crop, crop, 3)
  step = 1.0 / 255.0 / np.asarray(cv.CLIP_STD)  # one uint8 step after normalisation
  diff = np.abs(out - ref)
  assert (diff <= step * (1 + 1e-4) + 1e-6).all(), diff.max()
  assert (diff > 1e-4).mean() < 0.01


def test_preprocess_sizes_and_errors():
  assert cv.resize_output_size(480, 832, 224) == (224, 388)
  assert cv.resize_output_size(832, 480, 224) == (388, 224)
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    cv.preprocess(jnp.zeros((2, 32, 32)))
  with pytest.raises(ValueError, match="smaller than crop_size"):
    cv.preprocess(jnp.zeros((1, 32, 32, 3)), crop_size=40, shortest_edge=32)


# ------------------------------------------------------------------ the ImageEncoder backend
def test_clip_image_encoder_end_to_end(release, ours):
  _, model = release
  enc, params = ours
  images = _images((40, 64), 2, seed=7)
  proc = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
  pixels = np.transpose(proc(images=list(images), return_tensors="np")["pixel_values"], (0, 2, 3, 1))
  ref_states, _ = _torch_hidden_states(model, pixels.astype(np.float32))
  tokens = jax.jit(enc.encode)(params, _to_unit(images))
  assert tokens.shape == (2, enc.num_tokens(40, 64), enc.token_dim(40, 64)) == (2, 5, HIDDEN)
  assert rel_err(tokens, ref_states[-2]) <= PIPELINE_TOL
  same = enc.module.apply({"params": params}, enc.preprocess(_to_unit(images)), layer=-2)
  np.testing.assert_allclose(np.asarray(tokens), np.asarray(same), rtol=0, atol=1e-6)


def test_make_image_encoder_clip_vision():
  config = ml_collections.ConfigDict(
      {
          "image_encoder": {
              "name": "clip_vision",
              "hidden_size": 1280,
              "intermediate_size": 5120,
              "num_layers": 32,
              "num_heads": 16,
              "patch_size": 14,
              "image_size": 224,
              "layer": -2,
          }
      }
  )
  enc = ie_lib.make_image_encoder(config)
  assert isinstance(enc, ie_lib.CLIPImageEncoder)
  assert ie_lib.num_image_tokens(config, 480, 832) == 257 and ie_lib.image_dim(config, 480, 832) == 1280
  abstract = jax.eval_shape(enc.init, jax.random.key(0))  # ViT-H/14, abstractly
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract)))
  with torch.device("meta"):  # the reference tower's size, without allocating it
    ref = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
        )
    )
  assert count == sum(p.numel() for p in ref.parameters()) == 630_766_080
  spec = nn.get_partition_spec(abstract)
  assert spec["layers_0"]["attn"]["q"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads")
  assert spec["patch_embedding"] == jax.sharding.PartitionSpec(None, None, "conv_in", "embed")
  with pytest.raises(ValueError, match="layer"):
    ie_lib.CLIPImageEncoder(num_layers=2, layer=-4)
  del config.image_encoder["num_heads"]
  with pytest.raises(ValueError, match=r"config\.image_encoder\.num_heads"):
    ie_lib.make_image_encoder(config)
  config.image_encoder.name = "clip"
  with pytest.raises(ValueError, match="clip_vision"):
    ie_lib.make_image_encoder(config)
