"""Parity of the umT5 text encoder and Wan's prompt tokenization with the torch reference.

A tiny random transformers ``UMT5EncoderModel`` is saved as safetensors (the published layout),
read back with ``safetensors.numpy`` and mapped tensor by tensor through
``text_encoder.umt5_torch_key_to_target`` into :class:`T5Encoder`'s parameters. Prompts go through
a small umT5-like Unigram ``tokenizer.json`` (pad = 0, eos = 1, unk = 2) loaded by
``tokenizer.load_umt5_tokenizer``, and are compared with transformers' tokenizer on the same file.

Relative error is ``max|ours - ref| / max|ref|`` over the whole output tensor. Float32 bound:
1e-5. Bfloat16 bound (our module computing in bfloat16 with float32 parameters, against the float32
reference): 3e-2, about four bfloat16 ulps (2^-8 each) at the largest output.
"""

import json
import os
import pickle

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers
import torch
from safetensors import safe_open
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel
from transformers.models.umt5.modeling_umt5 import UMT5Attention

from onestory_jax.data import tokenizer as tk
from onestory_jax.models.wan import umt5 as te

F32_TOL = 1e-5
BF16_TOL = 3e-2
TEXT_LEN = 512  # Wan's prompt length
D_MODEL, D_KV, D_FF, LAYERS, HEADS = 32, 12, 64, 2, 4  # heads * d_kv != d_model on purpose

PROMPTS = [
    "A red  round character walks in the green place.",
    "  the café &amp;amp; the green\n\tplace  ",  # whitespace and doubly escaped HTML
    "",
    "cafÃ© and the red character",  # mojibake that ftfy repairs
    " ".join(["the red round character walks"] * 150),  # longer than 512 pieces: truncated
    "a green 日 place",  # a character outside the vocabulary: <unk>
]


def rel_err(ours, ref) -> float:
  """max|ours - ref| / max|ref| (the parity metric of these tests)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _build_tokenizer_json(path: str) -> None:
  """A small umT5-like tokenizer: Unigram pieces, NFKC, metaspace, '$A </s>' post-processor."""
  special = ["<pad>", "</s>", "<unk>"]
  words = [
      "▁a",
      "▁the",
      "▁red",
      "▁round",
      "▁character",
      "▁walk",
      "▁in",
      "▁green",
      "▁place",
      "▁café",
      "▁and",
      "▁",
      "ing",
      "er",
      "s",
  ]
  chars = [c for c in "abcdefghijklmnopqrstuvwxyz,.!'&é" if c not in words]
  vocab = [(p, 0.0) for p in special] + [(w, -2.0 - 0.1 * i) for i, w in enumerate(words)] + [(c, -8.0) for c in chars]
  tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
  )
  tok.add_special_tokens(special)
  tok.save(path)


def _load_params(directory: str, key_map, abstract) -> dict:
  """Streams every safetensors file of ``directory`` through ``key_map`` into a param tree.

  Checks that every abstract parameter is written, with its shape, and nothing else.
  """
  want = {k: v.shape for k, v in flax.traverse_util.flatten_dict(abstract).items()}
  got = {}
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  assert files, f"no safetensors in {directory}"
  for file in files:
    with safe_open(os.path.join(directory, file), framework="numpy") as f:
      for name in f.keys():
        target = key_map(name)
        if target is None:
          continue
        assert target.layer is None
        value = target.transform(f.get_tensor(name))
        assert target.path in want, f"{name} -> unexpected path {target.path}"
        assert value.shape == want[target.path], (name, value.shape, want[target.path])
        got[target.path] = jnp.asarray(value, jnp.float32)
  missing = sorted(set(want) - set(got))
  assert not missing, f"parameters not written: {missing}"
  return flax.traverse_util.unflatten_dict(got)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """A tiny release: tokenizer/tokenizer.json and text_encoder/ (config.json + safetensors)."""
  root = tmp_path_factory.mktemp("umt5_release")
  os.makedirs(root / "tokenizer")
  _build_tokenizer_json(str(root / "tokenizer" / "tokenizer.json"))
  vocab = tokenizers.Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json")).get_vocab_size()
  torch.manual_seed(0)
  cfg = UMT5Config(
      vocab_size=vocab,
      d_model=D_MODEL,
      d_kv=D_KV,
      d_ff=D_FF,
      num_layers=LAYERS,
      num_heads=HEADS,
      feed_forward_proj="gated-gelu",
      dropout_rate=0.0,
  )
  model = UMT5EncoderModel(cfg).eval()
  with torch.no_grad():  # norms start at one; make them matter
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(str(root / "text_encoder"), safe_serialization=True)
  return root, model


@pytest.fixture(scope="module")
def ours(release):
  root, _ = release
  with open(root / "text_encoder" / "config.json") as f:
    sizes = te.config_from_transformers(json.load(f))
  config = ml_collections.ConfigDict(
      {
          "text_encoder": dict(sizes, text_len=TEXT_LEN, tokenizer=str(root / "tokenizer")),
          "model": {"dtype": "float32", "param_dtype": "float32"},
      }
  )
  tok = tk.load_umt5_tokenizer(config.text_encoder.tokenizer, config.text_encoder.text_len)
  model = te.make_text_encoder(config, tok.vocab_size)
  abstract = flax.linen.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  with open(root / "text_encoder" / "config.json") as f:
    cfg = json.load(f)
  # What the converter builds from the release's config.json is the module's own tree.
  assert jax.tree.map(lambda x: (x.shape, x.dtype), te.umt5_abstract_params_from_transformers(cfg)) == jax.tree.map(
      lambda x: (x.shape, x.dtype), abstract
  )
  params = _load_params(str(root / "text_encoder"), te.umt5_key_map_from_transformers(cfg), abstract)
  return config, tok, model, params


def _reference(model, ids, mask) -> np.ndarray:
  """Wan's use of umT5: last hidden state cut to each prompt's length, zero-padded back."""
  with torch.no_grad():
    out = model(
        torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
    ).last_hidden_state.numpy()
  return np.where(mask[..., None], out, 0.0)


# ------------------------------------------------------------------ tokenizer
def test_prompt_cleaning_matches_diffusers():
  from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean  # pylint: disable=g-import-not-at-top

  for p in PROMPTS:
    assert tk.clean_prompt(p) == prompt_clean(p)
  assert tk.clean_prompt("  cafÃ©  &amp;amp;\n x ") == "café & x"
  with pytest.raises(ValueError, match="str"):
    tk.clean_prompt(3)


def test_tokenizer_matches_transformers(release):
  root, _ = release
  file = str(root / "tokenizer" / "tokenizer.json")
  ours = tk.load_umt5_tokenizer(str(root / "tokenizer"), TEXT_LEN)
  ids, mask = ours.encode_with_mask(PROMPTS)
  assert ids.shape == mask.shape == (len(PROMPTS), TEXT_LEN) and ids.dtype == np.int32
  ref = PreTrainedTokenizerFast(tokenizer_file=file, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
  r = ref(
      [tk.clean_prompt(p) for p in PROMPTS],
      padding="max_length",
      max_length=TEXT_LEN,
      truncation=True,
      add_special_tokens=True,
      return_attention_mask=True,
  )
  np.testing.assert_array_equal(ids, np.asarray(r["input_ids"]))
  np.testing.assert_array_equal(mask, np.asarray(r["attention_mask"]).astype(bool))
  np.testing.assert_array_equal(ours.encode(PROMPTS), ids)
  # Hand-derived: pieces of "a red round character walks" (ids 3.. in vocabulary order), EOS, pads.
  ids1, mask1 = ours.encode_with_mask(["a  red round\ncharacter walks"])
  np.testing.assert_array_equal(ids1[0, :8], [3, 5, 6, 7, 8, 17, 1, 0])
  assert mask1.sum() == 7 and mask1[0, :7].all()
  assert ours.pad_id == 0 and ours.eos_id == 1 and ours.unk_id == 2
  assert ids[2, 0] == 1 and mask[2].sum() == 1  # the empty prompt is just EOS
  assert mask[4].all() and ids[4, -1] == 1  # truncated to 511 pieces + EOS
  assert 2 in ids[5][mask[5]]  # unknown character
  assert ours.decode(ids1[0]) == "a red round character walks"


def test_tokenizer_pickles_and_rejects_bad_input(release, tmp_path):
  root, _ = release
  ours = tk.load_umt5_tokenizer(str(root / "tokenizer" / "tokenizer.json"), 16)
  again = pickle.loads(pickle.dumps(ours))
  np.testing.assert_array_equal(again.encode(PROMPTS), ours.encode(PROMPTS))
  raw = tk.load_umt5_tokenizer(str(root / "tokenizer"), 16, clean=False)
  assert not np.array_equal(raw.encode([PROMPTS[1]]), ours.encode([PROMPTS[1]]))
  with pytest.raises(ValueError, match="tokenizer.json"):
    tk.load_umt5_tokenizer(str(tmp_path), 16)
  with pytest.raises(ValueError, match="max_len"):
    tk.load_umt5_tokenizer(str(root / "tokenizer"), 1)
  with pytest.raises(ValueError, match="one str"):
    ours.encode("a red place")
  no_eos = tokenizers.Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>"))
  no_eos.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="</s>"):
    tk.load_umt5_tokenizer(str(tmp_path), 16)
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="not a valid tokenizer.json"):
    tk.load_umt5_tokenizer(str(tmp_path / "bad"), 16)


# ------------------------------------------------------------------ key map and config
def test_key_map_and_config(release):
  root, model = release
  names = set(model.state_dict())
  assert "shared.weight" in names and "encoder.embed_tokens.weight" in names
  for name in names - {"encoder.embed_tokens.weight"}:
    assert te.umt5_torch_key_to_target(name, num_heads=HEADS).path[0] in (
        "token_embedding",
        "final_norm",
        "layers_0",
        "layers_1",
    )
  assert te.umt5_torch_key_to_target("shared.weight", num_heads=HEADS).path == ("token_embedding",)
  # The tied duplicate is skipped (transformers saves only shared.weight).
  assert te.umt5_torch_key_to_target("encoder.embed_tokens.weight", num_heads=HEADS) is None
  with safe_open(str(root / "text_encoder" / "model.safetensors"), framework="numpy") as f:
    assert "shared.weight" in f.keys() and "encoder.embed_tokens.weight" not in f.keys()
  q = te.umt5_torch_key_to_target("encoder.block.1.layer.0.SelfAttention.q.weight", num_heads=HEADS)
  assert q.path == ("layers_1", "attn", "q", "kernel")
  w = np.arange(HEADS * D_KV * D_MODEL, dtype=np.float32).reshape(HEADS * D_KV, D_MODEL)
  # kernel[d, h, k] = W[h * d_kv + k, d]
  np.testing.assert_array_equal(q.transform(w)[5, 2, 3], w[2 * D_KV + 3, 5])
  o = te.umt5_torch_key_to_target("encoder.block.0.layer.0.SelfAttention.o.weight", num_heads=HEADS)
  np.testing.assert_array_equal(o.transform(w.T)[2, 3, 5], w[2 * D_KV + 3, 5])
  with pytest.raises(ValueError, match="num_heads = 5"):
    te.umt5_torch_key_to_target("encoder.block.0.layer.0.SelfAttention.k.weight", num_heads=5).transform(w)
  for bad in (
      "decoder.block.0.layer.0.SelfAttention.q.weight",
      "lm_head.weight",
      "encoder.block.0.layer.1.DenseReluDense.wi.weight",
      "encoder.block.0.layer.2.layer_norm.weight",
      "encoder.final_layer_norm.bias",
  ):
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
      te.umt5_torch_key_to_target(bad, num_heads=HEADS)
  with pytest.raises(ValueError, match="num_heads"):
    te.umt5_torch_key_to_target("shared.weight", num_heads=0)

  with open(root / "text_encoder" / "config.json") as f:
    cfg = json.load(f)
  sizes = te.config_from_transformers(cfg)
  assert sizes == dict(
      name="umt5",
      vocab_size=cfg["vocab_size"],
      d_model=D_MODEL,
      d_kv=D_KV,
      d_ff=D_FF,
      num_layers=LAYERS,
      num_heads=HEADS,
      rel_buckets=32,
      rel_max_distance=128,
      eps=1e-6,
  )
  with pytest.raises(ValueError, match="model_type"):
    te.config_from_transformers(dict(cfg, model_type="t5"))
  with pytest.raises(ValueError, match="'d_kv'"):
    te.config_from_transformers({k: v for k, v in cfg.items() if k != "d_kv"})
  with pytest.raises(ValueError, match="gated"):
    te.config_from_transformers(dict(cfg, feed_forward_proj="relu", dense_act_fn="relu"))

  config = ml_collections.ConfigDict({"text_encoder": sizes, "model": {"dtype": "float32"}})
  assert te.text_dim(config) == D_MODEL
  with pytest.raises(ValueError, match="vocab_size"):
    te.make_text_encoder(config, sizes["vocab_size"] + 1)
  del config.text_encoder["d_kv"]
  with pytest.raises(ValueError, match=r"config\.text_encoder\.d_kv"):
    te.make_text_encoder(config, 10)


def test_umt5_xxl_sizes_match_transformers():
  """umT5-XXL (Wan's text encoder) through config_from_transformers: same parameter count, abstractly."""
  cfg = UMT5Config(
      vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"
  )
  sizes = te.config_from_transformers(cfg.to_dict())
  config = ml_collections.ConfigDict({"text_encoder": sizes, "model": {"dtype": "bfloat16"}})
  module = te.make_text_encoder(config, 256300)
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(flax.linen.unbox(abstract)))
  with torch.device("meta"):
    ref = UMT5EncoderModel(cfg)
  assert count == sum(p.numel() for p in ref.parameters())  # tied embedding counted once
  names = {n: tuple(t.shape) for n, t in ref.state_dict().items()}
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(abstract["params"]))
  key_map = te.umt5_key_map_from_transformers(cfg.to_dict())
  for name, shape in names.items():  # every published tensor lands on a parameter of its size
    target = key_map(name)
    if target is not None:
      assert target.transform(np.empty(shape, np.dtype([]))).shape == flat[target.path].shape, name


def test_buckets_match_transformers():
  rel = np.arange(-700, 701)
  for buckets, max_distance in ((32, 128), (32, 64), (16, 40)):
    cfg = UMT5Config(
        d_model=8,
        d_kv=2,
        num_heads=4,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=max_distance,
    )
    ref = UMT5Attention(cfg, has_relative_attention_bias=True)._relative_position_bucket(torch.as_tensor(rel)).numpy()
    np.testing.assert_array_equal(np.asarray(te.relative_position_bucket(jnp.asarray(rel), buckets, max_distance)), ref)


# ------------------------------------------------------------------ numerical parity
def test_parity_float32_with_padding_masks(release, ours):
  _, model = release
  _, tok, module, params = ours
  ids, mask = tok.encode_with_mask(PROMPTS)
  assert (~mask).any() and mask.all(axis=1).any()  # padded prompts and a full-length one
  ref = _reference(model, ids, mask)
  apply = jax.jit(module.apply)
  out = np.asarray(apply({"params": params}, jnp.asarray(ids), mask=jnp.asarray(mask)))
  assert out.shape == (len(PROMPTS), TEXT_LEN, D_MODEL)
  err = rel_err(out, ref)
  assert err <= F32_TOL, err
  assert (out[~mask] == 0).all()
  # The pad-id mask (what OneStory.encode_text uses) gives the same result here.
  np.testing.assert_array_equal(np.asarray(apply({"params": params}, jnp.asarray(ids))), out)
  # Real positions do not depend on what the padded positions hold.
  junk = np.where(mask, ids, 7).astype(np.int32)
  out2 = np.asarray(apply({"params": params}, jnp.asarray(junk), mask=jnp.asarray(mask)))
  assert rel_err(out2, ref) <= F32_TOL


def test_parity_bfloat16_bound(release, ours):
  _, model = release
  config, tok, _, params = ours
  config = ml_collections.ConfigDict(config.to_dict())
  config.text_encoder.dtype = "bfloat16"
  module = te.make_text_encoder(config, tok.vocab_size)
  ids, mask = tok.encode_with_mask(PROMPTS[:3])
  out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), mask=jnp.asarray(mask))
  assert out.dtype == jnp.bfloat16
  err = rel_err(np.asarray(out.astype(jnp.float32)), _reference(model, ids, mask))
  assert err <= BF16_TOL, err
  assert err > F32_TOL  # the bound is about bfloat16, which does change the result


def test_mask_argument_is_validated(ours):
  _, _, module, params = ours
  with pytest.raises(ValueError, match="mask"):
    module.apply({"params": params}, jnp.ones((2, 8), jnp.int32), mask=jnp.ones((2, 7), bool))
