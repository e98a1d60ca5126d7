"""Frame Selection pseudo-labels on real videos (onestory_jax.data.pseudo_labels; paper App. A.2, Eq. 11)."""

import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onestory_jax.data import pseudo_labels as pl
from onestory_jax.models import dinov2 as dv
from onestory_jax.models.wan import clip as cv

H, W = 24, 40  # frame size of the Embedder tests (DINOv2 sees 16 x 28: its position grid is interpolated)


# ------------------------------------------------------------------ latent-frame grouping
def test_latent_frame_groups_wan_causal():
  g = pl.latent_frame_groups(81)
  assert g.shape == (21, 2) and g.dtype == np.int64
  assert g[0].tolist() == [0, 1] and g[1].tolist() == [1, 5] and g[-1].tolist() == [77, 81]
  assert (g[1:, 1] - g[1:, 0] == 4).all() and (g[1:, 0] == g[:-1, 1]).all()
  two = pl.latent_frame_groups([9, 5])  # shots concatenated in time, as the memory is
  assert two.tolist() == [[0, 1], [1, 5], [5, 9], [9, 10], [10, 14]]
  assert pl.latent_frame_groups([1]).tolist() == [[0, 1]]
  assert len(pl.latent_frame_groups([81, 81])) == 42  # the paper's training memory: F = 42 latent frames


def test_latent_frame_groups_non_causal_and_errors():
  assert pl.latent_frame_groups([4, 2], temporal_stride=2, causal=False).tolist() == [[0, 2], [2, 4], [4, 6]]
  with pytest.raises(ValueError, match="shot 1 has 80 frames.*1 \\+ 4 k"):
    pl.latent_frame_groups([81, 80])
  with pytest.raises(ValueError, match="multiple of 2"):
    pl.latent_frame_groups(5, temporal_stride=2, causal=False)
  with pytest.raises(ValueError, match="temporal_stride"):
    pl.latent_frame_groups(5, temporal_stride=0)
  with pytest.raises(ValueError, match="no shots"):
    pl.latent_frame_groups([])


def test_pool_latent_frames_is_the_mean_of_unit_embeddings():
  rng = np.random.default_rng(0)
  e = rng.standard_normal((9, 6)) * rng.uniform(0.1, 10, (9, 1))  # norms vary from frame to frame
  groups = pl.latent_frame_groups(9)
  pooled = pl.pool_latent_frames(e, groups)
  unit = e / np.linalg.norm(e, axis=1, keepdims=True)
  expect = np.stack([unit[0], unit[1:5].mean(0), unit[5:9].mean(0)])
  np.testing.assert_allclose(pooled, expect, rtol=1e-6, atol=1e-6)
  assert pooled.dtype == np.float32
  with pytest.raises(ValueError, match="inside"):
    pl.pool_latent_frames(e, [[0, 1], [1, 10]])


# ------------------------------------------------------------------ relevance
def test_relevance_formula_range_and_invariances():
  rng = np.random.default_rng(1)
  md, mc = rng.standard_normal((5, 8)), rng.standard_normal((5, 12))
  td, tc = rng.standard_normal((7, 8)), rng.standard_normal((7, 12))
  y = pl.relevance(md, mc, td, tc)
  assert y.shape == (5,) and y.dtype == np.float32 and (np.abs(y) <= 1).all()

  def cos_to_mean(m, t):
    mean = (t / np.linalg.norm(t, axis=1, keepdims=True)).mean(0)
    return m @ mean / np.linalg.norm(m, axis=1) / np.linalg.norm(mean)

  np.testing.assert_allclose(y, (cos_to_mean(md, td) + cos_to_mean(mc, tc)) / 2, rtol=1e-5, atol=1e-6)
  # Cosines: invariant to positive scaling of any frame's embedding.
  scaled = pl.relevance(md * rng.uniform(0.1, 9, (5, 1)), mc, td * rng.uniform(0.1, 9, (7, 1)), tc)
  np.testing.assert_allclose(scaled, y, rtol=1e-5, atol=1e-6)
  # A memory frame identical to every target frame scores 1; its negation -1.
  same = pl.relevance(np.stack([td[0], -td[0]]), np.stack([tc[0], -tc[0]]), td[:1].repeat(3, 0), tc[:1].repeat(3, 0))
  np.testing.assert_allclose(same, [1.0, -1.0], atol=1e-6)
  with pytest.raises(ValueError, match="width"):
    pl.relevance(md, mc, td[:, :4], tc)
  with pytest.raises(ValueError, match="5 DINOv2 memory frames but 4 CLIP"):
    pl.relevance(md, mc[:4], td, tc)
  with pytest.raises(ValueError, match="finite"):
    pl.relevance(md, mc, td * np.nan, tc)


# ------------------------------------------------------------------ the embedder
def _random_params(module, seed):
  """Random parameters that make a tiny tower discriminative: kernels ~ N(0, 1 / fan_in), norms and LayerScales ~ 1 +
  N(0, 0.09), other vectors ~ N(0, 0.09) (the towers' own init, std 0.02, maps every image to nearly one embedding)."""
  abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])
  rng = np.random.default_rng(seed)
  out = {}
  for path, x in flax.traverse_util.flatten_dict(abstract).items():
    n = rng.standard_normal(x.shape).astype(np.float32)
    if path[-1] in ("scale", "lambda1"):
      out[path] = 1 + 0.3 * n
    elif x.ndim >= 2:
      out[path] = n / np.sqrt(np.prod(x.shape[:-1]))
    else:
      out[path] = 0.3 * n
  return flax.traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def embedder():
  dino = dv.Dinov2Model(hidden_size=32, num_layers=2, num_heads=2, patch_size=4, image_size=16)
  clip = cv.CLIPVisionTransformer(
      hidden_size=24, intermediate_size=48, num_layers=2, num_heads=2, patch_size=4, image_size=16
  )
  return pl.Embedder(dino, _random_params(dino, 0), clip, _random_params(clip, 2), dino_short_side=16, batch_size=4)


def _frames(n: int, seed: int) -> np.ndarray:
  """uint8 [n, H, W, 3] of uniform noise."""
  return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def _pattern(seed: int) -> np.ndarray:
  """uint8 [1, H, W, 3]: a smooth coloured stripe pattern (content unlike noise)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:H, 0:W]
  wave = 0.5 + 0.5 * np.sin(0.4 * (rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy) + rng.uniform(0, 6))
  return (wave[..., None] * rng.integers(64, 256, 3))[None].astype(np.uint8)


def test_dino_input_size():
  assert pl.dino_input_size(480, 832, 224, 14) == (224, 392)
  assert pl.dino_input_size(832, 480, 224, 14) == (392, 224)
  assert pl.dino_input_size(H, W, 16, 4) == (16, 28)


def test_embed_shapes_determinism_and_batching(embedder):
  frames = _frames(6, 0)
  d, c = embedder.embed(frames)
  assert d.shape == (6, 32) and c.shape == (6, 24) and d.dtype == c.dtype == np.float32
  d2, c2 = embedder.embed(frames)
  np.testing.assert_array_equal(d, d2)
  np.testing.assert_array_equal(c, c2)
  # The padded last batch (6 = 4 + 2) changes nothing: frame by frame gives the same embeddings.
  d1, c1 = embedder.embed(frames[5:])
  np.testing.assert_allclose(d1[0], d[5], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(c1[0], c[5], rtol=1e-5, atol=1e-6)

  # What the towers compute on the documented preprocessing.
  @jax.jit
  def reference(dino_params, clip_params, frames):
    x = jax.image.resize(frames.astype(jnp.float32) / 255, (6, 16, 28, 3), "bicubic", antialias=True)
    x = (jnp.clip(x, 0, 1) - jnp.asarray(dv.IMAGENET_MEAN)) / jnp.asarray(dv.IMAGENET_STD)
    pixels = cv.preprocess(frames.astype(jnp.float32) / 127.5 - 1, crop_size=16)
    return (
        embedder.dino.apply({"params": dino_params}, x).pooler_output,
        embedder.clip.apply({"params": clip_params}, pixels, method="pooled"),
    )

  ref_d, ref_c = reference(embedder.dino_params, embedder.clip_params, jnp.asarray(frames))
  np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(c, ref_c, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="uint8"):
    embedder.embed(frames.astype(np.float32))


def test_labels_identical_frames_score_highest(embedder):
  target = np.repeat(_pattern(10), 5, axis=0)  # a static target shot
  same = target.copy()  # a memory shot showing exactly the target
  other = np.concatenate([_frames(3, 11), _pattern(11), _pattern(12)])  # other content
  mixed = np.concatenate([_pattern(13), target[:4]])  # latent frame 0: other; latent frame 1: the target
  y = embedder.labels([other, same, mixed], target)
  assert y.shape == (6,) and y.dtype == np.float32 and (np.abs(y) <= 1).all()
  np.testing.assert_allclose(y[2:4], 1.0, atol=1e-5)  # both latent frames of the identical shot
  np.testing.assert_allclose(y[5], 1.0, atol=1e-5)  # 4 pixel frames of the target grouped into one latent frame
  assert y[[0, 1, 4]].max() < 1.0 - 1e-3
  assert int(np.argmax(y)) in (2, 3, 5)
  np.testing.assert_array_equal(embedder.labels([other, same, mixed], target), y)  # deterministic
  # The labels are relevance() over the pooled embeddings.
  groups = pl.latent_frame_groups([5, 5, 5])
  d, c = embedder.embed(np.concatenate([other, same, mixed]))
  td, tc = embedder.embed(target)
  expect = pl.relevance(pl.pool_latent_frames(d, groups), pl.pool_latent_frames(c, groups), td, tc)
  np.testing.assert_allclose(y, expect, atol=1e-6)
  with pytest.raises(ValueError, match="1 \\+ 4 k"):
    embedder.labels([other[:4]], target)


def test_from_pretrained(tmp_path, embedder):
  torch = pytest.importorskip("torch")
  from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model  # pylint: disable=g-import-not-at-top

  # The fixture's sizes: equal modules share the embedder's compiled function.
  torch.manual_seed(0)
  Dinov2Model(
      Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16)
  ).save_pretrained(str(tmp_path / "dinov2"))
  clip_ref = CLIPVisionModel(
      CLIPVisionConfig(
          hidden_size=24,
          intermediate_size=48,
          num_hidden_layers=2,
          num_attention_heads=2,
          patch_size=4,
          image_size=16,
          hidden_act="gelu",
      )
  ).eval()
  clip_ref.save_pretrained(str(tmp_path / "image_encoder"))
  mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
  (tmp_path / "dinov2" / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
  emb = pl.Embedder.from_pretrained(
      str(tmp_path / "dinov2"), str(tmp_path / "image_encoder"), dino_short_side=16, batch_size=4
  )
  assert emb.dino_mean == tuple(mean) and emb.dino_std == tuple(std) and emb.clip_mean == cv.CLIP_MEAN
  assert emb.dino == embedder.dino and emb.clip == embedder.clip
  frames = _frames(2, 5)
  d, c = emb.embed(frames)
  assert d.shape == (2, 32) and c.shape == (2, 24) and np.isfinite(d).all()
  pixels = np.asarray(cv.preprocess(jnp.asarray(frames, jnp.float32) / 127.5 - 1, crop_size=16))
  with torch.no_grad():
    ref = clip_ref(
        pixel_values=torch.as_tensor(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    ).pooler_output.numpy()
  np.testing.assert_allclose(c, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  with pytest.raises(ValueError, match=r"config\.json: missing"):
    pl.Embedder.from_pretrained(str(tmp_path / "dinov2"), str(tmp_path))
