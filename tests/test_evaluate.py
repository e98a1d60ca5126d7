"""Tests of the StoryWorld metrics (onestory_jax/evaluate.py, onestory_jax/metrics/)."""

import colorsys
import copy
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from onestory_jax import evaluate
from onestory_jax.metrics import shot_analysis
from onestory_jax.metrics import storyworld_metrics
from onestory_jax.data import storyworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATTERNS = ("consistency", "recall", "compose")


def _story(pattern: str, seed: int = 3, num_shots: int = 5) -> dict:
  return storyworld.generate_story(seed, pattern, num_shots=num_shots)


@pytest.fixture(scope="module")
def recall():
  story = _story("recall")
  return story, storyworld.render_story(story)


@pytest.fixture(scope="module")
def recall_metrics(recall):
  return evaluate.evaluate_story(*recall)


def _far_hue(story: dict) -> float:
  """A hue as far as possible from every character's hue."""
  hues = [colorsys.rgb_to_hsv(*c["color"])[0] for c in story["characters"]]
  candidates = np.arange(0.0, 1.0, 0.01)
  dist = [min(min(abs(h - x) % 1.0, 1.0 - abs(h - x) % 1.0) for x in hues) for h in candidates]
  return float(candidates[int(np.argmax(dist))])


def _shared_shot(story: dict) -> tuple[int, int]:
  """(shot, character) such that the character also appears in another shot."""
  for i, shot in enumerate(story["shots"]):
    for c in shot["characters"]:
      if sum(c in s["characters"] for s in story["shots"]) >= 2:
        return i, c
  raise AssertionError("story has no shared character")


# ----------------------------------------------------------------------------- units


def test_srgb_to_lab_reference_values():
  lab = shot_analysis.srgb_to_lab(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
  np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.02)
  np.testing.assert_allclose(lab[1], [0.0, 0.0, 0.0], atol=1e-9)
  np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.05)
  np.testing.assert_allclose(lab[3], [32.30, 79.19, -107.86], atol=0.05)


def test_cluster_colours_finds_flat_colours_in_size_order():
  red, green, blue = shot_analysis.srgb_to_lab(np.array([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.3, 0.9]]))
  pixels = np.concatenate(
      [
          np.repeat(red[None], 50, 0),
          np.repeat(green[None], 30, 0),
          np.repeat(blue[None], 20, 0),
          (red + green)[None] / 2,
      ]
  )  # one blend
  centres, labels = shot_analysis.cluster_colours(pixels, merge_delta_e=10.0, max_clusters=8, min_fraction=0.04)
  np.testing.assert_allclose(centres, np.stack([red, green, blue]), atol=1e-9)
  assert np.bincount(labels).tolist() in ([51, 30, 20], [50, 31, 20])
  again = shot_analysis.cluster_colours(pixels[::-1].copy(), merge_delta_e=10.0, max_clusters=8, min_fraction=0.04)
  np.testing.assert_allclose(again[0], centres)


def test_best_matching_equals_brute_force():
  rng = np.random.default_rng(0)
  for rows, cols, n in [(3, 4, 2), (4, 2, 2), (3, 3, 3), (2, 5, 1), (4, 4, 3), (2, 2, 5)]:
    sim = rng.random((rows, cols))
    k = min(n, rows, cols)
    best = max(
        sum(sim[r, c] for r, c in zip(rs, cs))
        for rs in itertools.combinations(range(rows), k)
        for cs in itertools.permutations(range(cols), k)
    )
    assert storyworld_metrics._best_matching(sim, n) == pytest.approx(best)


def _moving_squares(colours, starts, step, t=8, size=5, hw=32, bg=(0.45, 0.42, 0.40)):
  frames = np.empty((t, hw, hw, 3))
  frames[:] = bg
  frames[:, hw // 2 :] = (0.30, 0.32, 0.36)  # a second flat background region
  for colour, (y, x) in zip(colours, starts):
    for k in range(t):
      yy, xx = y + step[0] * k, x + step[1] * k
      frames[k, yy : yy + size, xx : xx + size] = colour
  return np.round(frames * 255).astype(np.uint8)


def test_analyze_shot_counts_and_tracks_a_moving_square():
  shot = shot_analysis.analyze_shot(_moving_squares([(0.95, 0.2, 0.1)], [(10, 4)], (0, 1)))
  assert shot.count == 1 and shot.frame_counts.tolist() == [1] * 8
  assert shot.direction == "right"
  # Centroid of frames 6-7 minus frames 0-1: 6 px to the right.
  np.testing.assert_allclose(shot.displacement, (6.0, 0.0), atol=1e-9)
  good = [c for c in shot.clusters if c.quality >= 0.5]
  assert len(good) == 1 and good[0].shape is not None
  np.testing.assert_allclose(good[0].shape, np.ones((4, 4)))  # a square fills its box
  assert shot.background_quality == 1.0 and shot.background_valid.all()
  up = shot_analysis.analyze_shot(_moving_squares([(0.95, 0.2, 0.1)], [(20, 4)], (-1, 0)))
  assert up.direction == "up"


def test_static_character_has_no_direction():
  shot = shot_analysis.analyze_shot(_moving_squares([(0.2, 0.3, 0.95)], [(10, 10)], (0, 0)))
  assert shot.count == 1 and shot.direction is None
  assert shot.displacement == (0.0, 0.0)


def test_same_coloured_characters_count_twice_and_match_both():
  red = (0.95, 0.2, 0.1)
  two = shot_analysis.analyze_shot(_moving_squares([red, red], [(4, 2), (20, 2)], (0, 1)))
  one = shot_analysis.analyze_shot(_moving_squares([red], [(4, 2)], (0, 1)))
  assert two.count == 2 and one.count == 1
  (cluster,) = [c for c in two.clusters if c.quality >= 0.5]
  assert cluster.multiplicity == 2
  assert storyworld_metrics.character_pair_score(two, two, 2) == pytest.approx(1.0)
  # Only one of the two shared characters has a counterpart in `one`.
  assert storyworld_metrics.character_pair_score(two, one, 2) == pytest.approx(0.5)


def test_touching_characters_of_different_colours_are_two_entities():
  frames = _moving_squares([(0.95, 0.2, 0.1), (0.2, 0.3, 0.95)], [(10, 2), (10, 7)], (0, 1))
  assert shot_analysis.analyze_shot(frames).count == 2


# ----------------------------------------------------------------------------- story metrics


@pytest.mark.parametrize("pattern", PATTERNS)
def test_ground_truth_frames_score_near_the_top(pattern):
  story = _story(pattern)
  m = evaluate.evaluate_story(story, storyworld.render_story(story))
  assert m["num_character_pairs"] >= 1 and m["num_shots"] == 5
  assert m["character_consistency"] >= 0.9
  if m["environment_consistency"] is not None:
    assert m["environment_consistency"] >= 0.9
  assert m["direction_accuracy"] == 1.0
  assert m["count_accuracy"] >= 0.8
  assert m["inter_avg"] >= 0.9
  assert all(p["score"] >= 0.8 for p in m["character_pairs"] + m["environment_pairs"])


def test_pairs_cover_all_shots_that_share(recall, recall_metrics):
  story, _ = recall
  shots = story["shots"]
  want_c = [
      [i, j]
      for i, j in itertools.combinations(range(len(shots)), 2)
      if set(shots[i]["characters"]) & set(shots[j]["characters"])
  ]
  want_e = [
      [i, j]
      for i, j in itertools.combinations(range(len(shots)), 2)
      if shots[i]["environment"] == shots[j]["environment"]
  ]
  m = recall_metrics
  assert [p["shots"] for p in m["character_pairs"]] == want_c
  assert [p["shots"] for p in m["environment_pairs"]] == want_e
  assert m["num_character_pairs"] == len(want_c) and m["num_environment_pairs"] == len(want_e)
  assert any(j - i > 1 for i, j in want_c)  # not only neighbouring shots
  assert m["character_consistency"] == pytest.approx(np.mean([p["score"] for p in m["character_pairs"]]))
  assert m["inter_avg"] == pytest.approx((m["character_consistency"] + m["environment_consistency"]) / 2)
  json.dumps(m)  # serialisable


def test_recoloured_character_lowers_c_cons_only(recall, recall_metrics):
  story, frames = recall
  shot, char = _shared_shot(story)
  changed = copy.deepcopy(story)
  for c in changed["characters"]:
    if c["id"] == char:
      c["color"] = list(colorsys.hsv_to_rgb(_far_hue(story), 0.9, 0.9))
  bad = list(frames)
  bad[shot] = storyworld.render_shot(changed, shot)
  m = evaluate.evaluate_story(story, bad)
  base = recall_metrics
  assert m["character_consistency"] < base["character_consistency"] - 0.1
  hit = [p for p in m["character_pairs"] if shot in p["shots"] and char in p["shared"]]
  assert hit and all(p["score"] < 0.6 for p in hit)
  assert m["environment_consistency"] == pytest.approx(base["environment_consistency"], abs=0.02)
  assert m["direction_accuracy"] == base["direction_accuracy"]


def test_swapped_background_lowers_e_cons_only(recall, recall_metrics):
  story, frames = recall
  pair = recall_metrics["environment_pairs"][0]
  shot = pair["shots"][1]
  other = next(e["id"] for e in story["environments"] if e["id"] != pair["environment"])
  changed = copy.deepcopy(story)
  changed["shots"][shot]["environment"] = other
  bad = list(frames)
  bad[shot] = storyworld.render_shot(changed, shot)
  m = evaluate.evaluate_story(story, bad)
  base = recall_metrics
  assert m["environment_consistency"] < base["environment_consistency"] - 0.1
  hit = [p for p in m["environment_pairs"] if shot in p["shots"]]
  assert all(p["score"] < 0.75 for p in hit)
  assert m["character_consistency"] == pytest.approx(base["character_consistency"], abs=0.05)


def test_reversed_time_breaks_direction_only(recall, recall_metrics):
  story, frames = recall
  m = evaluate.evaluate_story(story, [f[::-1] for f in frames])
  assert m["direction_accuracy"] == 0.0
  opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
  assert all(s["detected_direction"] == opposite[s["action"]] for s in m["shots"])
  base = recall_metrics
  assert m["character_consistency"] == pytest.approx(base["character_consistency"], abs=0.02)
  assert m["environment_consistency"] == pytest.approx(base["environment_consistency"], abs=0.02)
  assert m["count_accuracy"] == base["count_accuracy"]


def test_pure_noise_scores_low(recall):
  story, frames = recall
  rng = np.random.default_rng(0)
  noise = [rng.integers(0, 256, f.shape, dtype=np.uint8) for f in frames]
  m = evaluate.evaluate_story(story, noise)
  assert m["character_consistency"] < 0.2
  assert m["environment_consistency"] < 0.1
  assert m["direction_accuracy"] <= 0.25
  assert m["count_accuracy"] <= 0.25
  assert all(s["background_quality"] == 0.0 for s in m["shots"])


def _palette_mosaic(shape, palette, rng, cell=4, frame_stride=2):
  """Cells of ``cell`` x ``cell`` pixels drawn from ``palette``, redrawn every ``frame_stride`` frames:
  what an undertrained demo model samples (one cell per latent cell of the space-to-depth codec)."""
  t, h, w, _ = shape
  out = np.zeros(shape, np.uint8)
  for t0 in range(0, t, frame_stride):
    pick = rng.integers(len(palette), size=(h // cell, w // cell))
    out[t0 : t0 + frame_stride] = np.kron(palette[pick], np.ones((cell, cell, 1), np.uint8))
  return out


def test_noise_mosaic_from_a_few_colours_scores_low_c_cons(recall):
  """Every shot offers a cell in every colour, so the cluster matching alone finds each shared
  character everywhere; the clutter charge (count_precision) is what keeps C-Cons low."""
  story, frames = recall
  rng = np.random.default_rng(0)
  muted = [colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.65)) for _ in range(5)]
  vivid = [colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0)) for _ in range(2)]
  palette = np.round(np.asarray(muted + vivid) * 255).astype(np.uint8)
  mosaic = [_palette_mosaic(f.shape, palette, rng) for f in frames]
  m = evaluate.evaluate_story(story, mosaic)
  analyses = [shot_analysis.analyze_shot(f) for f in mosaic]
  matched = [
      storyworld_metrics.character_pair_score(analyses[i], analyses[j], len(p["shared"]))
      for p in m["character_pairs"]
      for i, j in [p["shots"]]
  ]
  assert np.mean(matched) > 0.9  # the colours alone match ...
  assert m["character_consistency"] < 0.15  # ... but 10+ entities per shot are clutter
  assert all(s["detected_count"] >= 10 for s in m["shots"])
  assert all(
      s["count_precision"] == pytest.approx(s["num_characters"] / s["detected_count"])
      for s in m["shots"]
      if s["num_characters"]
  )


def test_extra_entity_is_charged_by_count_precision(recall, recall_metrics):
  story, frames = recall
  shot = next(
      i
      for i, s in enumerate(story["shots"])
      if len(s["characters"]) == 1
      and any(p["shots"][0] == i or p["shots"][1] == i for p in recall_metrics["character_pairs"])
  )
  changed = copy.deepcopy(story)
  extra = dict(story["characters"][0], id=len(story["characters"]))
  extra["color"] = list(colorsys.hsv_to_rgb(_far_hue(story), 0.9, 0.95))
  changed["characters"].append(extra)
  target = changed["shots"][shot]
  target["characters"] = target["characters"] + [extra["id"]]
  sizes = [storyworld.FRAMING_SIZE_PX[target["framing"]]] * 2
  target["start"] = storyworld._draw_starts(
      np.random.default_rng(0),
      sizes,
      target["action"],
      target["speed"],
      story["height"],
      story["width"],
      story["frames_per_shot"],
  )
  bad = list(frames)
  bad[shot] = storyworld.render_shot(changed, shot)
  m = evaluate.evaluate_story(story, bad)  # the annotation still says one character
  assert m["shots"][shot]["detected_count"] == 2
  assert m["shots"][shot]["count_precision"] == 0.5
  for p, base in zip(m["character_pairs"], recall_metrics["character_pairs"]):
    if shot in p["shots"]:
      assert p["score"] == pytest.approx(base["score"] * np.sqrt(0.5), abs=0.03)
    else:
      assert p["score"] == pytest.approx(base["score"])
  assert all(s["count_precision"] == 1.0 for s in recall_metrics["shots"])


def test_shuffled_shots_score_lower(recall, recall_metrics):
  story, frames = recall
  m = evaluate.evaluate_story(story, frames[1:] + frames[:1])
  base = recall_metrics
  assert m["inter_avg"] < base["inter_avg"] - 0.15
  assert m["character_consistency"] < base["character_consistency"]
  assert m["environment_consistency"] < base["environment_consistency"]
  assert m["direction_accuracy"] < base["direction_accuracy"]


def test_mild_degradation_keeps_scores_high(recall):
  story, frames = recall
  rng = np.random.default_rng(1)
  noisy = [np.clip(f + rng.normal(0.0, 4.0, f.shape), 0, 255).astype(np.uint8) for f in frames]
  m = evaluate.evaluate_story(story, noisy)
  assert m["character_consistency"] >= 0.85 and m["environment_consistency"] >= 0.85
  assert m["direction_accuracy"] == 1.0


def test_missing_character_lowers_c_cons_and_count(recall, recall_metrics):
  story, frames = recall
  shot, char = _shared_shot(story)
  changed = copy.deepcopy(story)
  keep = [k for k, c in enumerate(story["shots"][shot]["characters"]) if c != char]
  changed["shots"][shot]["characters"] = [story["shots"][shot]["characters"][k] for k in keep]
  changed["shots"][shot]["start"] = [story["shots"][shot]["start"][k] for k in keep]
  bad = list(frames)
  bad[shot] = storyworld.render_shot(changed, shot)
  m = evaluate.evaluate_story(story, bad)
  hit = [p for p in m["character_pairs"] if shot in p["shots"] and p["shared"] == [char]]
  assert hit and all(p["score"] < 0.05 for p in hit)
  assert m["shots"][shot]["detected_count"] == len(keep)
  assert m["count_accuracy"] < recall_metrics["count_accuracy"]


def test_environment_only_shot():
  story = _story("recall")
  story["shots"][1]["characters"] = []
  story["shots"][1]["start"] = []
  m = evaluate.evaluate_story(story, storyworld.render_story(story))
  assert m["shots"][1]["detected_count"] == 0 and m["shots"][1]["detected_direction"] is None
  assert m["num_direction_shots"] == len(story["shots"]) - 1
  assert m["direction_accuracy"] == 1.0
  assert m["count_accuracy"] >= 0.8


def test_deterministic(recall, recall_metrics):
  story, frames = recall
  again = evaluate.evaluate_story(copy.deepcopy(story), [f.copy() for f in frames])
  assert json.dumps(again, sort_keys=True) == json.dumps(recall_metrics, sort_keys=True)


# ----------------------------------------------------------------------------- bad input


def test_bad_frames_raise_clear_errors(recall):
  story, frames = recall
  with pytest.raises(ValueError, match="expected 5 shots"):
    evaluate.evaluate_story(story, frames[:4])
  with pytest.raises(ValueError, match="shot_2: expected dtype uint8"):
    evaluate.evaluate_story(story, frames[:2] + [frames[2].astype(np.float32)] + frames[3:])
  with pytest.raises(ValueError, match=r"shot_0: expected shape \[T, H, W, 3\]"):
    evaluate.evaluate_story(story, [frames[0][..., :2]] + frames[1:])
  with pytest.raises(ValueError, match="shot_1: expected frames of 32 x 32"):
    evaluate.evaluate_story(story, [frames[0], frames[1][:, :16]] + frames[2:])
  with pytest.raises(ValueError, match="shot_0: expected at least 2 frames"):
    evaluate.evaluate_story(story, [frames[0][:1]] + frames[1:])


def test_bad_story_raises_clear_errors(recall):
  story, frames = recall
  bad = copy.deepcopy(story)
  bad["shots"][2]["action"] = "sideways"
  with pytest.raises(ValueError, match=r"story.shots\[2\].action"):
    evaluate.evaluate_story(bad, frames)
  bad = copy.deepcopy(story)
  del bad["shots"][0]["characters"]
  with pytest.raises(ValueError, match=r"story.shots\[0\].characters"):
    evaluate.evaluate_story(bad, frames)
  with pytest.raises(ValueError, match="story.shots"):
    evaluate.evaluate_story({"shots": []}, [])


def test_load_samples_errors(tmp_path, recall):
  _, frames = recall
  with pytest.raises(ValueError, match="frames.npz: not found"):
    evaluate.load_samples(str(tmp_path), 5)
  np.savez(tmp_path / "frames.npz", shot_0=frames[0], shot_2=frames[2])
  with pytest.raises(ValueError, match="missing key 'shot_1'"):
    evaluate.load_samples(str(tmp_path), 3)
  with pytest.raises(ValueError, match=r"unexpected keys \['shot_2'\]"):
    evaluate.load_samples(str(tmp_path), 1)


def test_metric_registry(recall, recall_metrics, monkeypatch):
  from onestory_jax import metrics  # pylint: disable=g-import-not-at-top

  assert metrics.names() == (
      "character_consistency",
      "environment_consistency",
      "inter_avg",
      "direction_accuracy",
      "count_accuracy",
  )
  assert list(recall_metrics)[:5] == list(metrics.names())
  assert metrics.get("inter_avg") is storyworld_metrics.inter_avg
  with pytest.raises(ValueError, match="unknown metric"):
    metrics.get("fvd")
  with pytest.raises(ValueError, match="already registered"):
    metrics.register_metric("inter_avg", lambda ev: 0.0)

  def shots_shown(ev):
    return float(len(ev.frames)) if ev.analyses else None

  monkeypatch.setitem(metrics.METRICS, "shots_shown", shots_shown)
  m = evaluate.evaluate_story(*recall)
  assert m["shots_shown"] == 5.0
  assert {k: v for k, v in m.items() if k != "shots_shown"} == recall_metrics


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run(
      [sys.executable, "-m", "onestory_jax.evaluate", *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )


def test_cli_end_to_end(tmp_path, recall, recall_metrics):
  story, _ = recall
  storyworld.export_story(story, str(tmp_path))
  (tmp_path / "manifest.json").write_text(json.dumps({"steps": 4, "checkpoint": "ckpt_10", "shots": [1, 2]}))
  out = tmp_path / "metrics.json"
  proc = _cli(f"--story={tmp_path / 'story.json'}", f"--samples={tmp_path}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("character consistency ") and proc.stdout.strip().endswith(f"all metrics in {out}")
  assert len(proc.stdout.strip().splitlines()) == 1 and proc.stderr == ""
  proc = _cli(f"--story={tmp_path / 'story.json'}", f"--samples={tmp_path}", "--json")
  printed = json.loads(proc.stdout)
  assert printed == json.loads(out.read_text())
  assert printed["manifest"] == {"steps": 4, "checkpoint": "ckpt_10"}
  for key in (
      "character_consistency",
      "environment_consistency",
      "inter_avg",
      "direction_accuracy",
      "count_accuracy",
      "num_character_pairs",
  ):
    assert printed[key] == pytest.approx(recall_metrics[key])


def test_cli_reports_missing_key(tmp_path, recall):
  story, frames = recall
  (tmp_path / "story.json").write_text(json.dumps(story))
  np.savez(tmp_path / "frames.npz", **{f"shot_{i}": f for i, f in enumerate(frames[:3])})
  proc = _cli(f"--story={tmp_path / 'story.json'}", f"--samples={tmp_path}")
  assert proc.returncode == 2
  assert "frames.npz" in proc.stderr and "missing key 'shot_3'" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


def test_cli_warns_when_the_samples_are_of_another_story(tmp_path, recall):
  from onestory_jax import pipeline

  story, _ = recall
  storyworld.export_story(story, str(tmp_path))
  captions = [s["caption"] for s in story["shots"]]
  (tmp_path / "manifest.json").write_text(json.dumps({"story_digest": pipeline.story_digest(captions)}))
  proc = _cli(f"--story={tmp_path / 'story.json'}", f"--samples={tmp_path}")
  assert proc.returncode == 0 and proc.stderr == ""
  (tmp_path / "manifest.json").write_text(json.dumps({"story_digest": pipeline.story_digest(captions[:2])}))
  proc = _cli(f"--story={tmp_path / 'story.json'}", f"--samples={tmp_path}")
  assert proc.returncode == 0 and proc.stderr.startswith("warning: ") and "other captions" in proc.stderr
