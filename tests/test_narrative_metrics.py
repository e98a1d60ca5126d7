"""The real-video narrative metrics (C-Cons, E-Cons from DINOv2; caption alignment from CLIP) and the CLIP port.

Every tower is a tiny random transformers model saved in the published layout (``save_pretrained``: config.json,
model.safetensors; a CLIP folder also carries the fast tokenizer's tokenizer.json). The CLIP text and image features
are compared with transformers' ``CLIPModel``; the metrics are checked on synthetic stories whose character and
background pixels are known: a character pasted unchanged in every shot scores 1 with masks whatever the background,
a replaced character lowers C-Cons only, and so on.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the test extra; .ci/run installs it
import transformers  # pylint: disable=g-import-not-at-top
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top

from onestory_jax import evaluate
from onestory_jax import story as story_lib
from onestory_jax import video_io
from onestory_jax.metrics import narrative_metrics as nm
from onestory_jax.models import clip_text
from onestory_jax.models.wan import clip as vision_lib

VOCAB = {"!": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, 62)}, "<|startoftext|>": 62, "<|endoftext|>": 63}
H, W, T = 32, 48, 5  # mp4 encoders want sides in multiples of 16


def _save_clip(directory, eos_token_id=63, pad_token=None):
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(
      text_config=dict(
          vocab_size=64,
          hidden_size=32,
          intermediate_size=48,
          num_hidden_layers=2,
          num_attention_heads=4,
          max_position_embeddings=16,
          eos_token_id=eos_token_id,
          bos_token_id=62,
          pad_token_id=1,
      ),
      vision_config=dict(
          hidden_size=32,
          intermediate_size=40,
          num_hidden_layers=2,
          num_attention_heads=4,
          image_size=16,
          patch_size=4,
          hidden_act="gelu",
      ),
      projection_dim=24,
  )
  model = transformers.CLIPModel(cfg).eval()
  model.save_pretrained(str(directory))
  tok = Tokenizer(models.WordLevel(VOCAB, unk_token="!"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 62), ("<|endoftext|>", 63)]
  )
  tok.save(str(directory / "tokenizer.json"))
  if pad_token is not None:
    (directory / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token}))
  return model


def _save_dinov2(directory):
  torch.manual_seed(1)
  cfg = transformers.Dinov2Config(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16
  )
  transformers.Dinov2Model(cfg).save_pretrained(str(directory))


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
  root = tmp_path_factory.mktemp("towers")
  clip_ref = _save_clip(root / "clip")
  _save_dinov2(root / "dinov2")
  enc = nm.Encoders.from_pretrained(str(root / "dinov2"), str(root / "clip"), image_size=16, batch_size=8)
  return root, enc, clip_ref


# ----------------------------------------------------------------------------- the CLIP port
@pytest.mark.parametrize("eos_token_id", [63, 2])  # 2: configs written before transformers' PR 24773 (largest id)
def test_clip_features_match_transformers(tmp_path, eos_token_id):
  ref = _save_clip(tmp_path, eos_token_id=eos_token_id)
  module, params, tokenizer, processor = clip_text.load_clip(str(tmp_path))
  assert processor["crop_size"] == 16 and processor["mean"] == vision_lib.CLIP_MEAN
  long = " ".join(f"w{i}" for i in range(2, 30))  # 28 words: cut to 16 tokens, end-of-text kept
  ids, mask = tokenizer.encode(["W3 w4 w5", long, "w7"])
  assert ids.shape == mask.shape == (3, 16) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids[0, :5], [62, 3, 4, 5, 63])
  np.testing.assert_array_equal(ids[0, 5:], 63)  # padded with <|endoftext|> (no tokenizer_config.json)
  np.testing.assert_array_equal(mask.sum(1), [5, 16, 3])
  assert ids[1, -1] == 63 and ids[1, 0] == 62
  ours = np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), method="text_features"))
  with torch.no_grad():
    want = ref.get_text_features(input_ids=torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask))
  want = want.pooler_output.numpy()
  assert ours.shape == (3, 24)
  np.testing.assert_allclose(ours, want, atol=1e-5 * np.abs(want).max())
  pixels = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  ours = np.asarray(module.apply({"params": params}, jnp.asarray(pixels), method="image_features"))
  with torch.no_grad():
    want = ref.get_image_features(
        pixel_values=torch.as_tensor(pixels.transpose(0, 3, 1, 2).copy())
    ).pooler_output.numpy()
  np.testing.assert_allclose(ours, want, atol=1e-5 * np.abs(want).max())


def test_clip_tokenizer_pad_token_and_load_errors(tmp_path):
  _save_clip(tmp_path, pad_token="!")
  _, _, tokenizer, _ = clip_text.load_clip(str(tmp_path))
  ids, mask = tokenizer.encode(["w9"])
  np.testing.assert_array_equal(ids[0, :4], [62, 9, 63, 0])  # tokenizer_config.json's pad_token "!" (id 0)
  np.testing.assert_array_equal(mask[0, :4], [1, 1, 1, 0])
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<nope>"}))
  with pytest.raises(ValueError, match="tokenizer_config.json: pad_token '<nope>' is not in"):
    clip_text.load_clip(str(tmp_path))
  os.remove(tmp_path / "tokenizer_config.json")
  os.remove(tmp_path / "tokenizer.json")
  with pytest.raises(ValueError, match="tokenizer.json: missing"):
    clip_text.load_clip(str(tmp_path))
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(cfg["vision_config"] | {"model_type": "clip_vision_model"}))
  with pytest.raises(ValueError, match="config.json: CLIP config: expected a CLIPModel config"):
    clip_text.load_clip(str(tmp_path))
  with pytest.raises(ValueError, match="unknown tensor name 'text_model.pooler.weight'"):
    clip_text.torch_key_to_target("text_model.pooler.weight")
  assert clip_text.torch_key_to_target("logit_scale") is None
  assert clip_text.torch_key_to_target("text_projection.weight").path == ("text_projection", "kernel")


# ----------------------------------------------------------------------------- regions
def test_frame_indices_and_region_images():
  np.testing.assert_array_equal(nm.frame_indices(81, 5), [0, 20, 40, 60, 80])
  np.testing.assert_array_equal(nm.frame_indices(3, 8), [0, 1, 2])
  with pytest.raises(ValueError, match="frames_per_shot must be >= 1"):
    nm.frame_indices(3, 0)
  rng = np.random.RandomState(0)
  frame = rng.randint(0, 256, (H, W, 3)).astype(np.uint8)
  fill = np.array([124, 116, 104], np.uint8)
  mask = np.zeros((H, W), bool)
  mask[4:10, 6:18] = True  # 6 x 12 box
  mask[4, 6] = False  # a hole: its pixel takes the fill colour
  img = nm.region_image(frame, mask, 12, fill)  # side 12: no resize, letterboxed rows 3..8
  assert img.shape == (12, 12, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img[3:9][1:], frame[5:10, 6:18])
  np.testing.assert_array_equal(img[3, 0], fill)
  np.testing.assert_array_equal(img[3, 1:], frame[4, 7:18])
  np.testing.assert_array_equal(img[:3], np.broadcast_to(fill, (3, 12, 3)))
  np.testing.assert_array_equal(img[9:], np.broadcast_to(fill, (3, 12, 3)))
  bg = nm.background_image(frame, mask, W, fill)  # the whole frame, the character filled, letterboxed (no resize)
  top = (W - H) // 2
  np.testing.assert_array_equal(bg[top + 4, 7:18], np.broadcast_to(fill, (11, 3)))
  np.testing.assert_array_equal(bg[top + 4, 6], frame[4, 6])  # the hole keeps the frame's pixel
  np.testing.assert_array_equal(bg[top : top + H, :, :][0, 18:], frame[0, 18:])
  np.testing.assert_array_equal(bg[:top], np.broadcast_to(fill, (top, W, 3)))


# ----------------------------------------------------------------------------- the metrics
def _texture(seed, h, w):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def _shot(background, character, positions):
  """T frames of ``background`` with ``character`` ([h, w, 3], or None) pasted at ``positions[t]``; and its masks."""
  frames = np.repeat(background[None], T, axis=0)
  masks = np.zeros((T, H, W), bool)
  if character is not None:
    h, w, _ = character.shape
    for t, (y, x) in enumerate(positions):
      frames[t, y : y + h, x : x + w] = character
      masks[t, y : y + h, x : x + w] = True
  return frames, masks


def _story(specs):
  return story_lib.parse_story({"shots": [{"caption": c, "characters": ch, "environment": e} for c, ch, e in specs]})


def _four_shots(second_character=None):
  """Shots 0, 1 and 3 show character 0 (shot 1 ``second_character`` instead when given); shots 0 and 2 share
  environment 0 (the same background), shots 1 and 3 have their own."""
  char = _texture(10, 8, 6)
  bgs = {0: _texture(20, H, W), 1: _texture(21, H, W), 2: _texture(22, H, W)}
  moves = [[(2 + t, 3 + 4 * t) for t in range(T)], [(12, 20 - 3 * t) for t in range(T)], None, [(8, 8)] * T]
  shots, masks = [], {}
  for i, env in enumerate([0, 1, 0, 2]):
    c = None if i == 2 else (second_character if (i == 1 and second_character is not None) else char)
    f, m = _shot(bgs[env], c, moves[i] or [])
    shots.append(f)
    if c is not None:
      masks[nm.mask_key(i, 0)] = m
  story = _story([("w3 w4", [0], 0), ("w5 w6", [0], 1), ("w7", [], 0), ("w8 w9", [0], 2)])
  return story, shots, masks


def _npz(tmp_path, masks, name="masks.npz"):
  path = str(tmp_path / name)
  np.savez(path, **masks)
  return path


def test_masks_isolate_the_character(tmp_path, towers):
  _, enc, _ = towers
  story, shots, masks = _four_shots()
  m = nm.score_story(story, shots, enc, nm.NpzMasks(_npz(tmp_path, masks)), frames_per_shot=3)
  assert m["regions"] == "masks" and m["num_shots"] == 4
  # Character 0 is pasted unchanged: with masks its region images are equal in every shot.
  assert [p["shots"] for p in m["character_pairs"]] == [[0, 1], [0, 3], [1, 3]]
  assert m["num_character_pairs"] == 3
  np.testing.assert_allclose(m["character_consistency"], 1.0, atol=1e-5)
  assert [p["shots"] for p in m["environment_pairs"]] == [[0, 2]] and m["num_environment_pairs"] == 1
  assert 0.0 < m["environment_consistency"] < 1.0 - 1e-4  # the character's fill differs between shots 0 and 2
  assert m["shots"][0]["frames"] == [0, 2, 4] and m["shots"][0]["character_frames_in_view"] == {"0": 3}
  # Whole frames: the differing backgrounds now enter the character pairs.
  w = nm.score_story(story, shots, enc, nm.WholeFrame(), frames_per_shot=3)
  assert w["regions"] == "whole_frame" and w["num_character_pairs"] == 3
  assert w["character_consistency"] < m["character_consistency"] - 1e-3
  # A replaced character in shot 1 lowers C-Cons (its pairs only) and leaves E-Cons as it was.
  story2, shots2, masks2 = _four_shots(second_character=_texture(11, 8, 6))
  r = nm.score_story(story2, shots2, enc, nm.NpzMasks(_npz(tmp_path, masks2, "m2.npz")), frames_per_shot=3)
  sims = {tuple(p["shots"]): p["similarity"] for p in r["character_pairs"]}
  np.testing.assert_allclose(sims[0, 3], 1.0, atol=1e-5)
  assert sims[0, 1] < 1.0 - 1e-3 and sims[1, 3] < 1.0 - 1e-3
  assert r["environment_consistency"] == pytest.approx(m["environment_consistency"], abs=1e-6)
  assert r == nm.score_story(story2, shots2, enc, nm.NpzMasks(_npz(tmp_path, masks2, "m2.npz")), frames_per_shot=3)


def test_out_of_view_character_is_unscored(tmp_path, towers):
  _, enc, _ = towers
  story, shots, masks = _four_shots()
  masks[nm.mask_key(3, 0)][:] = False  # detected in no frame of shot 3
  masks[nm.mask_key(1, 0)][0] = False  # missing from one frame of shot 1
  m = nm.score_story(story, shots, enc, nm.NpzMasks(_npz(tmp_path, masks)), frames_per_shot=5)
  assert [p["shots"] for p in m["character_pairs"]] == [[0, 1]]
  assert [u["shots"] for u in m["unscored"]] == [[0, 3], [1, 3]]
  assert m["shots"][1]["character_frames_in_view"] == {"0": 4} and m["shots"][3]["character_frames_in_view"] == {"0": 0}


def test_caption_alignment_is_the_clip_cosine(towers):
  root, enc, clip_ref = towers
  story, shots, _ = _four_shots()
  m = nm.score_story(story, shots, nm.Encoders(**{**enc.__dict__, "dino": None}), frames_per_shot=2)
  assert m["character_consistency"] is None and m["num_character_pairs"] == 0
  ids, mask = clip_text.CLIPTokenizer.from_directory(str(root / "clip"), 16, 63).encode(story.captions)
  per_shot = []
  for i, f in enumerate(shots):
    chosen = f[[0, T - 1]]
    pixels = np.asarray(vision_lib.preprocess(jnp.asarray(chosen, jnp.float32) / 127.5 - 1.0, crop_size=16))
    with torch.no_grad():
      img = clip_ref.get_image_features(pixel_values=torch.as_tensor(pixels.transpose(0, 3, 1, 2).copy())).pooler_output
      txt = clip_ref.get_text_features(
          input_ids=torch.as_tensor(ids[i : i + 1]).long(), attention_mask=torch.as_tensor(mask[i : i + 1])
      ).pooler_output
    per_shot.append(torch.nn.functional.cosine_similarity(img, txt).mean().item())
  np.testing.assert_allclose([s["caption_alignment"] for s in m["shots"]], per_shot, atol=1e-5)
  assert m["caption_alignment"] == pytest.approx(np.mean(per_shot), abs=1e-5)


def test_mask_errors(tmp_path, towers):
  _, enc, _ = towers
  story, shots, masks = _four_shots()
  missing = {k: v for k, v in masks.items() if k != nm.mask_key(3, 0)}
  with pytest.raises(ValueError, match=r"missing key 'shot_3.character_0'"):
    nm.score_story(story, shots, enc, nm.NpzMasks(_npz(tmp_path, missing)))
  extra = {**masks, nm.mask_key(2, 0): masks[nm.mask_key(0, 0)]}
  with pytest.raises(ValueError, match=r"keys \['shot_2.character_0'\] name no annotated character"):
    nm.score_story(story, shots, enc, nm.NpzMasks(_npz(tmp_path, extra)))
  bad = {**masks, nm.mask_key(0, 0): masks[nm.mask_key(0, 0)][:, :10]}
  with pytest.raises(ValueError, match=r"shot_0.character_0: expected a bool or uint8 array of shape \[5, 32, 48\]"):
    nm.score_story(story, shots, enc, nm.NpzMasks(_npz(tmp_path, bad)))
  with pytest.raises(ValueError, match="masks file not found"):
    nm.mask_source(str(tmp_path / "nope.npz"))
  with pytest.raises(ValueError, match=r"unknown mask backend 'yolo' \(registered: \['npz'\]\)"):
    nm.mask_source("yolo:/weights")
  assert isinstance(nm.mask_source(None), nm.WholeFrame)
  bad_frames = [f.astype(np.float32) if i == 2 else f for i, f in enumerate(shots)]
  with pytest.raises(ValueError, match=r"OUT: shot 2: expected uint8 frames \[T, H, W, 3\] with T >= 1, got float32"):
    nm.score_story(story, bad_frames, enc, source="OUT")
  with pytest.raises(ValueError, match=r"expected 4 shots of frames"):
    nm.score_story(story, shots[:3], enc)


def test_registered_detector_backend(tmp_path, towers):
  """A detector plugs in by name; here one that returns the known masks (a real one would load its weights)."""
  _, enc, _ = towers
  story, shots, masks = _four_shots()

  class Known:
    name = "masks"

    def __init__(self, path):
      assert path == "/weights/known"

    def masks(self, shot, frames, characters):
      return {c: masks[nm.mask_key(shot, c)] for c in characters}

  nm.register_mask_backend("known", Known)
  try:
    m = nm.score_story(story, shots, enc, nm.mask_source("known:/weights/known"), frames_per_shot=3)
  finally:
    del nm.MASK_BACKENDS["known"]
  np.testing.assert_allclose(m["character_consistency"], 1.0, atol=1e-5)


def test_evaluate_cli_on_videos(tmp_path, towers):
  """``evaluate --dinov2 --clip --masks`` on shot_XX.mp4 files; and bad input: one line, exit status 2."""
  root, _, _ = towers
  story, shots, masks = _four_shots()
  samples = tmp_path / "samples"
  samples.mkdir()
  for i, f in enumerate(shots):
    video_io.write_mp4(str(samples / f"shot_{i:02d}.mp4"), f)
  assert [v.shape for v in evaluate.load_videos(str(samples), 4)] == [(T, H, W, 3)] * 4
  (tmp_path / "story.json").write_text(json.dumps(story.raw))
  masks_path = _npz(tmp_path, masks)
  out = tmp_path / "metrics.json"
  base = [sys.executable, "-m", "onestory_jax.evaluate", f"--story={tmp_path / 'story.json'}", f"--samples={samples}"]
  towers_flags = [f"--dinov2={root / 'dinov2'}", f"--clip={root / 'clip'}"]
  run = subprocess.run(
      base + towers_flags + [f"--masks={masks_path}", f"--output={out}"], capture_output=True, text=True
  )
  assert run.returncode == 0, run.stderr
  assert "character consistency" in run.stdout and "caption alignment" in run.stdout and "regions: masks" in run.stdout
  metrics = json.loads(out.read_text())
  assert metrics["num_character_pairs"] == 3 and metrics["masks"] == masks_path
  assert -1.0 <= metrics["caption_alignment"] <= 1.0 and 0.9 < metrics["character_consistency"] <= 1.0 + 1e-6
  run = subprocess.run(base + [f"--dinov2={root / 'clip'}"], capture_output=True, text=True)
  assert run.returncode == 2 and "Traceback" not in run.stderr
  assert "config.json" in run.stderr and len(run.stderr.strip().splitlines()) == 1
  os.remove(samples / "shot_02.mp4")
  with pytest.raises(ValueError, match="missing .*shot_02.mp4"):
    evaluate.load_videos(str(samples), 4)
