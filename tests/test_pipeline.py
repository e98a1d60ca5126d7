"""Tests for the grain training pipeline (triplets, shot inflation, pseudo-labels)."""

import importlib.util
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from onestory_jax.data import pipeline
from onestory_jax.data import sources
from onestory_jax.data import storyworld_sources
from onestory_jax.data import storyworld as sw
from onestory_jax.data import tokenizer as tk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**data):
  spec = importlib.util.spec_from_file_location("onestory_config", os.path.join(ROOT, "configs", "onestory.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  for key, value in data.items():
    config.data[key] = value
  return config


def _take(ds, n):
  it = iter(ds)
  try:
    return [next(it) for _ in range(n)]
  finally:
    if hasattr(it, "close"):
      it.close()


def _story_of(config, index):
  cfg = sw.StoryWorldConfig.from_config(config.data)
  return sw.generate_story(sw.story_seed(config.seed, int(index)), cfg=cfg)


def _shot_index(story, frames):
  """Index of the story shot whose rendering equals `frames`, else None."""
  for i in range(len(story["shots"])):
    if np.array_equal(sw.render_shot(story, i), frames):
      return i
  return None


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_shapes_and_dtypes():
  config = _config()
  (batch,) = _take(pipeline.make_train_dataset(config, warmup_steps=0), 1)
  b, t, h, w = 8, config.data.frames_per_shot, config.data.height, config.data.width
  expected = {
      "frames": ((b, 3, t, h, w, 3), np.uint8),
      "tokens": ((b, config.data.text_len), np.int32),
      "sel_labels": ((b, 2), np.float32),
      "real_first": ((b, 2), np.bool_),
      "memory_shots": ((b, 2), np.int32),
      "synthetic": ((b,), np.bool_),
      "story": ((b,), np.int32),
  }
  assert set(batch) == set(expected)
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  assert np.all(batch["real_first"].sum(1) == 1)


def test_deterministic_and_seed_dependent():
  config = _config()
  a = _take(pipeline.make_train_dataset(config, warmup_steps=1), 2)
  b = _take(pipeline.make_train_dataset(config, warmup_steps=1), 2)
  for x, y in zip(a, b):
    _assert_batches_equal(x, y)
  c = _take(pipeline.make_train_dataset(_config(shuffle_seed=1), warmup_steps=1), 1)
  assert not np.array_equal(a[0]["story"], c[0]["story"])


def test_per_process_sharding():
  config = _config()
  whole = _take(pipeline.make_train_dataset(config, warmup_steps=1), 2)
  parts = [
      _take(pipeline.make_train_dataset(config, warmup_steps=1, process_index=p, process_count=2), 2) for p in range(2)
  ]
  for step in range(2):
    assert parts[0][step]["frames"].shape[0] == 4
    for key in whole[step]:
      np.testing.assert_array_equal(parts[0][step][key], whole[step][key][0::2], err_msg=key)
      np.testing.assert_array_equal(parts[1][step][key], whole[step][key][1::2], err_msg=key)


def test_warmup_is_always_synthetic_then_real_triplets():
  config = _config(p_inflate=0.0)
  batches = _take(pipeline.make_train_dataset(config, warmup_steps=2), 4)
  for batch in batches[:2]:
    assert batch["synthetic"].all()
  for batch in batches[2:]:
    short = np.array([len(_story_of(config, k)["shots"]) < 3 for k in batch["story"]])
    np.testing.assert_array_equal(batch["synthetic"], short)
  assert not batches[2]["synthetic"].all() or not batches[3]["synthetic"].all()


def test_real_triplet_labels_follow_the_formula():
  config = _config(p_inflate=0.0)
  (batch,) = _take(pipeline.make_train_dataset(config, warmup_steps=0), 1)
  tok = tk.storyworld_tokenizer(config.data.text_len)
  checked = 0
  for j in range(8):
    if batch["synthetic"][j]:
      continue
    story = _story_of(config, batch["story"][j])
    a, b, c = (_shot_index(story, batch["frames"][j, k]) for k in range(3))
    assert None not in (a, b, c) and a < b < c
    np.testing.assert_allclose(batch["sel_labels"][j], sw.pseudo_labels(story, [a, b], c))
    np.testing.assert_array_equal(batch["real_first"][j], [True, False])
    np.testing.assert_array_equal(batch["memory_shots"][j], [a, b])
    np.testing.assert_array_equal(batch["tokens"][j], tok.encode([story["shots"][c]["caption"]])[0])
    checked += 1
  assert checked >= 3


@pytest.mark.parametrize("p_syn_second", [0.0, 1.0])
def test_inserted_shots_get_minus_one(p_syn_second):
  config = _config(p_inflate=1.0, p_insert=1.0, p_syn_second=p_syn_second)
  (batch,) = _take(pipeline.make_train_dataset(config, warmup_steps=0), 1)
  first_pos, syn_pos = (0, 1) if p_syn_second == 1.0 else (1, 0)
  for j in range(8):
    assert batch["synthetic"][j]
    assert batch["real_first"][j, first_pos] and not batch["real_first"][j, syn_pos]
    story = _story_of(config, batch["story"][j])
    a = _shot_index(story, batch["frames"][j, first_pos])
    b = _shot_index(story, batch["frames"][j, 2])
    assert a is not None and b is not None and a < b
    assert _shot_index(story, batch["frames"][j, syn_pos]) is None  # From another story.
    assert batch["sel_labels"][j, syn_pos] == -1.0
    assert batch["memory_shots"][j, first_pos] == a  # the real shot keeps its place in the story
    assert 0 <= batch["memory_shots"][j, syn_pos] <= b and batch["memory_shots"][j, syn_pos] != a
    assert batch["sel_labels"][j, first_pos] == pytest.approx(float(sw.pseudo_labels(story, [a], b)[0]))


def test_augmented_first_shots_get_zero():
  config = _config(p_inflate=1.0, p_insert=0.0, p_syn_second=0.5)
  (batch,) = _take(pipeline.make_train_dataset(config, warmup_steps=0), 1)
  orders = set()
  for j in range(8):
    first_pos = int(np.argmax(batch["real_first"][j]))
    syn_pos = 1 - first_pos
    orders.add(first_pos)
    assert batch["sel_labels"][j, syn_pos] == 0.0
    assert not np.array_equal(batch["frames"][j, syn_pos], batch["frames"][j, first_pos])
  assert orders == {0, 1}


def test_augment_shot_is_consistent_over_frames():
  frame = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
  shot = np.repeat(frame[None], 4, axis=0)
  out = pipeline.augment_shot(shot, np.random.default_rng(1))
  assert out.shape == shot.shape and out.dtype == np.uint8
  assert all(np.array_equal(out[0], out[t]) for t in range(4))
  assert not np.array_equal(out, shot)
  np.testing.assert_array_equal(out, pipeline.augment_shot(shot, np.random.default_rng(1)))
  with pytest.raises(ValueError, match="uint8"):
    pipeline.augment_shot(shot.astype(np.float32), np.random.default_rng(1))


@pytest.mark.parametrize("worker_count", [0, 1])
def test_checkpoint_resumes_at_the_identical_next_batch(tmp_path, worker_count):
  config = _config(worker_count=worker_count)
  it = iter(pipeline.make_train_dataset(config, warmup_steps=1))
  restored = iter(pipeline.make_train_dataset(config, warmup_steps=1))
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  try:
    next(it)
    next(it)
    manager.save(2, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it), next(it)]
    manager.restore(2, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(restored)))
    for want in expected:
      _assert_batches_equal(next(restored), want)
  finally:
    manager.close()
    for iterator in (it, restored):
      if hasattr(iterator, "close"):
        iterator.close()


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  from onestory_jax.data import storyworld_tfds  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  storyworld_tfds.build(data_dir, "tiny")
  return data_dir


def test_tfds_source(tiny_tfds):
  from onestory_jax.data import storyworld_tfds  # pylint: disable=g-import-not-at-top

  config = _config(
      source="tfds",
      tfds_data_dir=tiny_tfds,
      height=16,
      width=16,
      frames_per_shot=4,
      max_shots=4,
      p_inflate=0.0,
      batch_size=4,
  )
  (batch,) = _take(pipeline.make_train_dataset(config, warmup_steps=0), 1)
  assert batch["frames"].shape == (4, 3, 4, 16, 16, 3)
  source = storyworld_tfds.storyworld_data_source(tiny_tfds, "train")
  assert np.all(batch["story"] < len(source))
  for j in range(4):
    frames = source[int(batch["story"][j])]["frames"]
    assert any(np.array_equal(batch["frames"][j, 2], f) for f in frames)
  bad = _config(source="tfds", tfds_data_dir=tiny_tfds)  # 32x32x8 vs the 16x16x4 data.
  with pytest.raises(ValueError, match="frames_per_shot, height, width"):
    pipeline.make_train_dataset(bad, warmup_steps=0)


def test_bad_configs_raise():
  with pytest.raises(ValueError, match="config.data.source"):
    pipeline.make_train_dataset(_config(source="s3"), warmup_steps=0)
  with pytest.raises(ValueError, match="tfds_data_dir"):
    pipeline.make_train_dataset(_config(source="tfds"), warmup_steps=0)
  with pytest.raises(ValueError, match="multiple of process_count"):
    pipeline.make_train_dataset(_config(batch_size=6), warmup_steps=0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.make_train_dataset(_config(), warmup_steps=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="p_insert"):
    pipeline.make_train_dataset(_config(p_insert=1.5), warmup_steps=0)
  with pytest.raises(ValueError, match=">= 2 stories"):
    pipeline.make_train_dataset(_config(num_train_stories=1), warmup_steps=0)


def test_batches_follow_batch_spec():
  config = _config(batch_size=4)
  spec = pipeline.batch_spec(config)
  (batch,) = _take(pipeline.make_train_dataset(config, warmup_steps=0), 1)
  assert set(batch) == set(spec)
  for key, (shape, dtype) in spec.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  (local,) = _take(pipeline.make_train_dataset(config, warmup_steps=0, process_count=2), 1)
  assert {k: v.shape for k, v in local.items()} == {k: (2,) + s[1:] for k, (s, _) in spec.items()}


def test_sources_registry():
  assert {"on_the_fly", "tfds"} <= set(sources.available_sources())
  assert sources.SOURCES["on_the_fly"] is storyworld_sources.on_the_fly_source
  stories = sources.make_story_source(_config())
  assert isinstance(stories, sources.StorySource) and len(stories) == 100_000
  with pytest.raises(ValueError, match=r"config.data.source must be one of \(.*'on_the_fly'.*'tfds'.*\), " r"got 's3'"):
    sources.make_story_source(_config(source="s3"))
  sources.register_source("on_the_fly", storyworld_sources.on_the_fly_source)  # same factory: no-op
  with pytest.raises(ValueError, match="already registered"):
    sources.register_source("on_the_fly", lambda config: None)


class _ConstantLabels(storyworld_sources.ProceduralStories):
  """StoryWorld stories whose memory shots all get the pseudo-label 0.5."""

  def pseudo_labels(self, story, memory_shots, target):
    return np.full(len(memory_shots), 0.5, np.float32)


def test_a_registered_source_drives_the_sampler(monkeypatch):
  def factory(config):
    return _ConstantLabels(sw.StoryWorldConfig.from_config(config.data), config.seed, 10)

  monkeypatch.setitem(sources.SOURCES, "constant", factory)
  config = _config(source="constant", p_inflate=0.0)
  (batch,) = _take(pipeline.make_train_dataset(config, warmup_steps=0), 1)
  assert np.all(batch["story"] < 10)
  real = ~batch["synthetic"]
  assert real.sum() >= 3 and np.all(batch["sel_labels"][real] == 0.5)
  monkeypatch.setitem(sources.SOURCES, "not_a_source", lambda config: [1, 2])
  with pytest.raises(TypeError, match="StorySource"):
    pipeline.make_train_dataset(_config(source="not_a_source"), warmup_steps=0)


def test_sampler_checks_the_layout():
  config = _config()
  stories = sources.make_story_source(config)
  spec = pipeline.TripletSpec(
      seed=0, shuffle_seed=0, global_batch=8, warmup_steps=0, p_inflate=0.0, p_insert=0.5, p_syn_second=0.5
  )
  tokenizer = tk.storyworld_tokenizer(config.data.text_len)
  sample = pipeline.TripletSampler(spec, stories, tokenizer, pipeline.example_spec(config))(0, 3)
  assert {k: (v.shape, v.dtype) for k, v in sample.items()} == pipeline.example_spec(config)
  wrong = pipeline.example_spec(_config(height=16))
  with pytest.raises(ValueError, match="'frames' has shape"):
    pipeline.TripletSampler(spec, stories, tokenizer, wrong)(0, 3)


def test_the_data_benchmark_times_the_pipeline_against_the_step():
  from onestory_jax import benchmark
  from tests.helpers import load_config

  out = benchmark.benchmark_train_step(load_config("tiny", **{"model.num_layers": 1}), steps=1, data_batches=3)
  assert out["data_worker_count"] == 0 and out["data_batches_per_s"] > 0
  assert out["data_over_step"] == pytest.approx(out["data_batches_per_s"] * out["step_time_s"])
