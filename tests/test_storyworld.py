"""Tests for StoryWorld (generator, renderer, captions, CLI), its tokenizer and TFDS builder."""

import colorsys
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from onestory_jax.data import storyworld as sw
from onestory_jax.data import tokenizer as tk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = sw.StoryWorldConfig(height=16, width=16, frames_per_shot=4, max_shots=4)


def _stories(pattern=None, count=40, cfg=sw.StoryWorldConfig()):
  return [sw.generate_story(seed, pattern, cfg) for seed in range(count)]


def _hsv(rgb):
  return colorsys.rgb_to_hsv(*rgb)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_story_and_frames():
  a, b = sw.generate_story(7), sw.generate_story(7)
  assert a == b
  for x, y in zip(sw.render_story(a), sw.render_story(b)):
    np.testing.assert_array_equal(x, y)


def test_different_seeds_differ():
  stories = [sw.generate_story(s, "recall", num_shots=3) for s in range(5)]
  for i in range(5):
    for j in range(i + 1, 5):
      assert stories[i]["characters"] != stories[j]["characters"]
      assert not np.array_equal(sw.render_shot(stories[i], 0), sw.render_shot(stories[j], 0))


def test_story_is_json_and_renders_identically_after_round_trip():
  story = sw.generate_story(11, cfg=SMALL)
  loaded = json.loads(json.dumps(story))
  assert loaded == story
  for i in range(len(story["shots"])):
    np.testing.assert_array_equal(sw.render_shot(loaded, i), sw.render_shot(story, i))


def test_render_shape_dtype_and_motion():
  story = sw.generate_story(3, cfg=SMALL)
  frames = sw.render_story(story)
  assert len(frames) == len(story["shots"])
  for shot in frames:
    assert shot.shape == (4, 16, 16, 3) and shot.dtype == np.uint8
    # Characters always move: consecutive frames differ.
    assert all(np.any(shot[t] != shot[t + 1]) for t in range(3))


def test_render_without_start_is_deterministic():
  story = sw.generate_story(5, "consistency", num_shots=2)
  for shot in story["shots"]:
    del shot["start"], shot["speed"]
  a, b = sw.render_shot(story, 1), sw.render_shot(json.loads(json.dumps(story)), 1)
  np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- patterns


def test_pattern_from_seed_and_shot_counts():
  cfg = sw.StoryWorldConfig(min_shots=2, max_shots=5)
  stories = _stories(count=60, cfg=cfg)
  assert {s["pattern"] for s in stories} == set(sw.PATTERNS)
  for s in stories:
    assert sw.MIN_SHOTS_FOR_PATTERN[s["pattern"]] <= len(s["shots"]) <= 5
  assert len(sw.generate_story(0, "compose", num_shots=6)["shots"]) == 6


def test_consistency_keeps_the_same_characters():
  for s in _stories("consistency"):
    sets = {tuple(shot["characters"]) for shot in s["shots"]}
    assert len(sets) == 1 and len(s["characters"]) == len(next(iter(sets)))


def test_recall_has_intervening_shot_then_returns():
  for s in _stories("recall"):
    shots = s["shots"]
    assert len(shots) >= 3
    assert shots[0]["characters"] == [0]
    assert 0 not in shots[1]["characters"] and 1 in shots[1]["characters"]
    assert 0 in shots[2]["characters"]


def test_compose_has_a_shot_composing_separately_introduced_characters():
  for s in _stories("compose"):
    solo_first = {}
    for i, shot in enumerate(s["shots"]):
      if len(shot["characters"]) == 1:
        solo_first.setdefault(shot["characters"][0], i)
    composed = [
        i
        for i, shot in enumerate(s["shots"])
        if len(shot["characters"]) >= 2 and all(solo_first.get(c, i) < i for c in shot["characters"])
    ]
    assert composed, s["shots"]


# ----------------------------------------------------------------------------- appearance


def test_at_least_five_distinct_kinds():
  assert len(sw.KINDS) >= 5
  masks = []
  for kind in sw.KINDS:
    story = {
        "seed": 0,
        "height": 32,
        "width": 32,
        "frames_per_shot": 1,
        "characters": [{"id": 0, "kind": kind, "color": [1.0, 0.0, 0.0], "size": 1.0}],
        "environments": [{"id": 0, "layout": "horizon", "colors": [[0, 0, 0], [0, 0, 0]], "params": {"split": 0.5}}],
        "shots": [
            {
                "characters": [0],
                "environment": 0,
                "action": "left",
                "framing": "close",
                "speed": 1.0,
                "start": [[16.0, 16.0]],
            }
        ],
    }
    masks.append(sw.render_shot(story, 0)[0, ..., 0] > 127)
  for i in range(len(masks)):
    assert 20 < masks[i].sum() < 32 * 32 / 2
    for j in range(i):
      assert np.any(masks[i] != masks[j]), (sw.KINDS[i], sw.KINDS[j])
  kinds_seen = {c["kind"] for s in _stories(count=60) for c in s["characters"]}
  assert kinds_seen == set(sw.KINDS)


def test_colours_names_and_distinguishable_characters():
  for s in _stories(count=60):
    for c in s["characters"]:
      h, sat, v = _hsv(c["color"])
      assert sat >= 0.6 - 1e-3 and v >= 0.75 - 1e-3
      assert c["color_name"] == sw.hue_name(h)
    for e in s["environments"]:
      for rgb in e["colors"]:
        _, sat, v = _hsv(rgb)
        assert sat <= 0.45 + 1e-3 and 0.25 - 1e-3 <= v <= 0.7 + 1e-3
      assert e["color_name"] in sw.HUE_NAMES + (sw.GRAY,)
    chars = s["characters"]
    for i in range(len(chars)):
      for j in range(i):
        assert chars[i]["kind"] != chars[j]["kind"] or chars[i]["color_name"] != chars[j]["color_name"]


def test_hue_names():
  assert sw.hue_name(0.0) == "red" and sw.hue_name(0.99) == "red"
  assert sw.hue_name(120 / 360) == "green" and sw.hue_name(230 / 360) == "blue"


def test_characters_stay_in_frame_and_apart():
  cfg = sw.StoryWorldConfig()
  for s in _stories(count=40):
    for shot in s["shots"]:
      starts = np.asarray(shot["start"])
      d = np.asarray({"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[shot["action"]], float)
      end = starts + d * shot["speed"] * (cfg.frames_per_shot - 1)
      for p in (starts, end):
        assert np.all(p >= 0) and np.all(p <= 32)
      for i in range(len(starts)):
        for j in range(i):
          assert np.linalg.norm(starts[i] - starts[j]) >= 6.0
      assert 0.75 <= shot["speed"] <= 1.25


# ----------------------------------------------------------------------------- captions


def test_caption_grammar_exact():
  story = {
      "height": 32,
      "width": 32,
      "frames_per_shot": 8,
      "characters": [
          {"id": 0, "kind": "round", "color_name": "red"},
          {"id": 1, "kind": "square", "color_name": "blue"},
      ],
      "environments": [{"id": 0, "color_name": "green"}, {"id": 1, "color_name": "gray"}],
      "shots": [
          {"characters": [0], "environment": 0, "action": "left", "framing": "wide"},
          {"characters": [1], "environment": 1, "action": "up", "framing": "close"},
          {"characters": [0], "environment": 0, "action": "right", "framing": "wide"},
          {"characters": [0, 1], "environment": 1, "action": "down", "framing": "wide"},
      ],
  }
  captions = [sw.caption_for_shot(story, i) for i in range(4)]
  assert captions == [
      "a red round character moves left in a green place, wide view.",
      "a new blue square character moves up in a new gray place, close view.",
      "the same first round character moves right in the green place from shot 1, " "wide view.",
      "the first round character and the second square character move down "
      "together in the gray place from shot 2, wide view.",
  ]


def test_generated_captions_refer_back():
  for s in _stories(count=40):
    seen_chars, first_env = [], {}
    for i, shot in enumerate(s["shots"]):
      cap = shot["caption"]
      assert cap.endswith(f"{shot['framing']} view.") and f" {shot['action']}" in cap
      for c in shot["characters"]:
        ch = s["characters"][c]
        if c in seen_chars:
          ordinal = sw.ORDINALS[seen_chars.index(c)]
          assert f"{ordinal} {ch['kind']} character" in cap
          # the colour of a returning character comes only from memory
          assert f"{ch['color_name']} {ch['kind']}" not in cap
        else:
          assert f"{ch['color_name']} {ch['kind']} character" in cap
      seen_chars += [c for c in shot["characters"] if c not in seen_chars]
      env = shot["environment"]
      if env in first_env:
        name = s["environments"][env]["color_name"]
        assert cap.endswith(f"in the {name} place from shot {first_env[env] + 1}, " f"{shot['framing']} view.")
      else:
        name = s["environments"][env]["color_name"]
        assert f"{'a' if i == 0 else 'a new'} {name} place" in cap
        first_env[env] = i
      if i == 0:
        assert " new " not in f" {cap} "


def test_vocabulary_covers_every_caption():
  vocab = sw.vocabulary()
  assert vocab == sw.vocabulary() and len(set(vocab)) == len(vocab)
  tok = tk.storyworld_tokenizer(max_len=40)
  captions = [shot["caption"] for seed in range(300) for shot in sw.generate_story(seed)["shots"]]
  ids = tok.encode(captions)
  assert not np.any(ids == tok.unk_id)
  assert np.all((ids != tok.pad_id).sum(1) <= 40)  # Fits the configs' text_len.


def test_pseudo_labels_formula():
  story = {
      "height": 8,
      "width": 8,
      "frames_per_shot": 1,
      "characters": [],
      "environments": [],
      "shots": [
          {"characters": [0], "environment": 0},
          {"characters": [1], "environment": 1},
          {"characters": [0, 1], "environment": 0},
          {"characters": [1], "environment": 0},
          {"characters": [0, 1], "environment": 1},
      ],
  }
  y = sw.pseudo_labels(story, [0, 1, 2, 3], 4)
  assert y.dtype == np.float32
  np.testing.assert_allclose(y, [0.375, 0.625, 0.75, 0.375])
  np.testing.assert_allclose(sw.pseudo_labels(story, [2, 1], 0), [1.0, 0.0])
  with pytest.raises(ValueError, match="shot index"):
    sw.pseudo_labels(story, [0], 9)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="pattern must be one of"):
    sw.generate_story(0, "heist")
  with pytest.raises(ValueError, match="num_shots"):
    sw.generate_story(0, "recall", num_shots=2)
  with pytest.raises(ValueError, match="seed"):
    sw.generate_story(-1)
  with pytest.raises(ValueError, match="max_shots"):
    sw.StoryWorldConfig(min_shots=4, max_shots=3)
  with pytest.raises(ValueError, match="height"):
    sw.StoryWorldConfig(height=4)
  story = sw.generate_story(0, cfg=SMALL)
  with pytest.raises(ValueError, match="shot_index"):
    sw.render_shot(story, len(story["shots"]))
  with pytest.raises(ValueError, match="'environments'"):
    sw.render_shot({k: v for k, v in story.items() if k != "environments"}, 0)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_encode_decode_and_ids():
  tok = tk.CaptionTokenizer.from_vocabulary(["a", "red", "place", ",", "."], max_len=6)
  assert tok.pad_id == 0 and tok.unk_id == 1 and tok.vocab_size == 7
  ids = tok.encode(["A RED place, far.", "a"])
  assert ids.dtype == np.int32 and ids.shape == (2, 6)
  np.testing.assert_array_equal(ids, [[2, 3, 4, 5, 1, 6], [2, 0, 0, 0, 0, 0]])
  assert tok.encode(["a a a a a a a a"]).tolist() == [[2] * 6]  # Truncated.
  assert tok.decode(ids[1]) == "a"
  assert tok.decode(tok.encode(["red place ."])[0]) == "red place ."
  with pytest.raises(ValueError, match="sequence of strings"):
    tok.encode("a red place")
  with pytest.raises(ValueError, match="unique"):
    tk.CaptionTokenizer.from_vocabulary(["a", "a"], 4)
  with pytest.raises(ValueError, match="max_len"):
    tk.CaptionTokenizer.from_vocabulary(["a"], 0)


def test_tokenizer_save_load_and_pickle(tmp_path):
  tok = tk.storyworld_tokenizer(24)
  caps = [s["caption"] for s in sw.generate_story(1)["shots"]]
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  loaded = tk.CaptionTokenizer.from_file(path, 24)
  np.testing.assert_array_equal(loaded.encode(caps), tok.encode(caps))
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.encode(caps), tok.encode(caps))
  assert clone.vocab_size == len(sw.vocabulary()) + 2
  with pytest.raises(ValueError, match="does not exist"):
    tk.CaptionTokenizer.from_file(str(tmp_path / "missing.json"), 8)


# ----------------------------------------------------------------------------- CLI and assets


def _run_cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "onestory_jax.data.storyworld", *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
  )


def test_export_cli_writes_story_and_frames(tmp_path):
  out = tmp_path / "story"
  proc = _run_cli(
      "export",
      "--seed=4",
      "--pattern=compose",
      f"--out={out}",
      "--num_shots=4",
      "--height=16",
      "--width=16",
      "--frames_per_shot=4",
  )
  assert proc.returncode == 0, proc.stderr
  with open(out / "story.json") as f:
    story = json.load(f)
  cfg = sw.StoryWorldConfig(height=16, width=16, frames_per_shot=4)
  assert story == sw.generate_story(4, "compose", cfg, num_shots=4)
  with np.load(out / "frames.npz") as frames:
    assert sorted(frames.files) == [f"shot_{i}" for i in range(4)]
    for i, expected in enumerate(sw.render_story(story)):
      np.testing.assert_array_equal(frames[f"shot_{i}"], expected)


def test_export_cli_bad_pattern(tmp_path):
  proc = _run_cli("export", "--seed=1", "--pattern=heist", f"--out={tmp_path / 'x'}")
  assert proc.returncode != 0
  assert "pattern must be one of" in proc.stderr
  assert not (tmp_path / "x" / "story.json").exists()


@pytest.mark.parametrize("pattern", sw.PATTERNS)
def test_example_story_files(pattern):
  path = os.path.join(ROOT, "onestory_jax", "assets", "stories", f"{pattern}.json")
  with open(path) as f:
    story = json.load(f)
  assert story["pattern"] == pattern and 4 <= len(story["shots"]) <= 6
  assert story == sw.generate_story(story["seed"], pattern, num_shots=len(story["shots"]))
  for shot in story["shots"]:
    assert isinstance(shot["caption"], str) and shot["caption"]
    assert isinstance(shot["characters"], list) and isinstance(shot["environment"], int)


def test_config_from_experiment_config():
  import ml_collections  # pylint: disable=g-import-not-at-top

  data = ml_collections.ConfigDict(
      {"height": 16, "width": 24, "frames_per_shot": 4, "min_shots": 3, "max_shots": 5, "batch_size": 8}
  )
  assert sw.StoryWorldConfig.from_config(data) == sw.StoryWorldConfig(16, 24, 4, 3, 5)
  assert sw.StoryWorldConfig.from_config(data, min_shots=3, max_shots=3).max_shots == 3
  old = ml_collections.ConfigDict({"height": 16, "width": 16, "frames_per_shot": 4})  # no shot range
  assert sw.StoryWorldConfig.from_config(old) == sw.StoryWorldConfig(16, 16, 4)
  with pytest.raises(ValueError, match="unknown fields"):
    sw.StoryWorldConfig.from_config(data, shots=3)
  with pytest.raises(ValueError, match="height"):
    sw.StoryWorldConfig.from_config(data, height=4)


# ----------------------------------------------------------------------------- TFDS


def test_tfds_round_trip(tmp_path):
  from onestory_jax.data import storyworld_tfds  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path / "tfds")
  storyworld_tfds.build(data_dir, "tiny")
  cfg = sw.StoryWorldConfig(height=16, width=16, frames_per_shot=4, max_shots=4)
  for split, count in (("train", 6), ("validation", 2)):
    source = storyworld_tfds.storyworld_data_source(data_dir, split)
    assert len(source) == count and source.features_shape == (4, 4, 16, 16, 3)
    for k in range(count):
      item = source[k]
      seed = sw.story_seed(storyworld_tfds.SPLIT_BASE_SEEDS[split], k)
      story = sw.generate_story(seed, cfg=cfg)
      assert item["index"] == k and item["story"] == story
      np.testing.assert_array_equal(item["frames"], np.stack(sw.render_story(story)))
  assert pickle.loads(pickle.dumps(source))[1]["story"] == source[1]["story"]
  with pytest.raises(ValueError, match="no built StoryWorld config"):
    storyworld_tfds.storyworld_data_source(data_dir, "train", "demo")
  with pytest.raises(ValueError, match="split"):
    storyworld_tfds.storyworld_data_source(data_dir, "test")
  # Reading needs no TensorFlow.
  code = (
      "import sys; from onestory_jax.data import storyworld_tfds as st; "
      f"s = st.storyworld_data_source({data_dir!r}, 'train'); "
      "assert s[5]['frames'].shape[1:] == (4, 16, 16, 3); "
      "print('TF_LOADED', 'tensorflow' in sys.modules)"
  )
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "TF_LOADED False" in proc.stdout
