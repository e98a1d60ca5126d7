"""Memory strategies (onestory_jax/memory_strategies.py): what each gives the next shot, under one budget."""

import numpy as np
import pytest

from onestory_jax import OneStoryPipeline
from onestory_jax import memory_strategies as ms


def _bank(shots=3, frames=4, seed=0):
  rng = np.random.default_rng(seed)
  bank = rng.normal(size=(shots * frames, 2, 2, 3)).astype(np.float32)
  return bank, np.repeat(np.arange(shots), frames)


def _given(strategy, bank, shots, k=4):
  idx, valid = ms.choose(strategy, bank, shots, k)
  return idx[valid].tolist()


def test_each_strategy_picks_its_frames_best_rank_first():
  bank, shots = _bank()
  assert ms.choose("onestory", bank, shots, 4) is None and ms.choose("full", bank, shots, 4) is None
  assert _given("none", bank, shots) == []
  assert _given("last_frame", bank, shots) == [11]
  assert _given("recent", bank, shots) == [11, 10, 9, 8]
  assert _given("uniform", bank, shots) == [11, 7, 4, 0]  # evenly over all 12 frames, most recent first
  assert _given("recent", bank[:2], shots[:2]) == [1, 0]  # fewer frames than K: the rest stay invalid
  assert _given("last_frame", bank[:0], shots[:0]) == []
  with pytest.raises(ValueError, match="memory must be one of"):
    ms.choose("random", bank, shots, 4)


def test_keyframes_keep_the_first_and_the_newest_distinct_frames():
  bank, shots = _bank()
  bank[1] = bank[0]  # a repeat of the shot's first frame is no keyframe
  bank[5:8] = bank[4]  # shot 1 holds still: one keyframe
  keys = ms.keyframes(bank, shots)
  assert keys == [0, 2, 3, 4, 8, 9, 10, 11]
  # The first keyframe is kept for good (StoryMem's fixed frames); the rest of K are the newest, newest first.
  assert _given("keyframes", bank, shots) == [11, 10, 9, 0]


def test_the_sampler_takes_the_strategy_choice_under_the_same_budget():
  pipe = OneStoryPipeline.from_pretrained(steps=1)
  captions = [
      "a red round character moves left in a blue place, wide view.",
      "a new green square character moves right in a new yellow place, close view.",
      "the same first round character moves up in the blue place from shot 1, wide view.",
  ]
  budget = pipe.system.model.budget
  stories = {m: pipe.generate(captions, seed=3, memory=m) for m in ms.STRATEGIES}
  for m, story in stories.items():
    record = story.shots[2].record
    given = [c["memory_frame"] for c in record["selected"]]
    assert record["context_tokens"] <= budget
    if m != "onestory":
      bank = np.concatenate([s.latents for s in story.shots[:2]])
      idx, valid = ms.choose(m, bank, np.repeat([0, 1], 4), int(pipe.system.config.selection.k_sel))
      assert given == idx[valid][: len(given)].tolist(), m
  assert [c["memory_frame"] for c in stories["last_frame"].shots[2].record["selected"]] == [7]
  assert stories["none"].shots[2].record["selected"] == []
  # Shot 0 has no memory whatever the strategy: the same first shot everywhere.
  for story in stories.values():
    np.testing.assert_array_equal(story.shots[0].frames, stories["onestory"].shots[0].frames)
  assert not np.array_equal(stories["last_frame"].shots[2].frames, stories["onestory"].shots[2].frames)
