"""End to end on 8 simulated devices: train, kill and resume exactly, sample reproducibly, resume a story."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from onestory_jax import checkpoints
from onestory_jax import objective
from onestory_jax import pipeline
from onestory_jax import sampler
from onestory_jax import story as story_lib
from onestory_jax import trainer as trainer_lib
from onestory_jax import video_io
from tests.helpers import load_config

STEPS = 4


def _config(**kw):
  return load_config(
      "tiny",
      num_train_steps=STEPS,
      checkpoint_every_steps=2,
      log_every_steps=2,
      sample_every_steps=4,
      warmup_fraction_dc=0.5,
      **kw,
  )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-step tiny run on 8 devices; checkpoints at steps 2 and 4."""
  assert jax.device_count() == 8
  workdir = str(tmp_path_factory.mktemp("run"))
  state = trainer_lib.train_and_evaluate(_config(), workdir)
  return workdir, jax.device_get(state.params)


def test_training_runs_sharded_and_checkpoints(trained):
  workdir, params = trained
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [2, 4]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  cfg = checkpoints.load_config_from_workdir(workdir)
  assert cfg.num_train_steps == STEPS and tuple(cfg.conditioner.kernels[0]) == (1, 2, 2)


def test_rerunning_after_a_kill_resumes_exactly(trained, tmp_path):
  """Drop the last checkpoint (as if killed after step 2); re-running the command ends on identical params."""
  workdir, params = trained
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints", "4"))
  state = trainer_lib.train_and_evaluate(_config(), copy)
  assert int(state.step) == STEPS
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)


def test_resume_gives_identical_next_batch_and_loss(trained):
  workdir, _ = trained
  config = _config()
  tr = trainer_lib.Trainer(config)
  mngr = checkpoints.checkpoint_manager(workdir, config)

  def restored_step():
    it = iter(tr.dataset())
    state = checkpoints.restore_checkpoint(mngr, 2, tr.program.abstract_state, it)
    batch = next(it)
    _, metrics = tr.step(state, batch)
    return batch, jax.device_get(metrics)

  b1, m1 = restored_step()
  b2, m2 = restored_step()
  mngr.close()
  for k in b1:
    np.testing.assert_array_equal(b1[k], b2[k])
  assert float(m1["loss"]) == float(m2["loss"])
  # The restored iterator continues after the 2 batches consumed before the checkpoint.
  it = iter(tr.dataset())
  fresh = [next(it) for _ in range(3)]
  np.testing.assert_array_equal(fresh[2]["frames"], b1["frames"])


def test_loss_weight_t_reweights_only_l_shot(trained):
  """``config.flow.loss_weight_t`` scales down the velocity MSE of samples with t below it, and nothing else."""
  _, params = trained
  metrics = {}
  for weight_t in (0.0, 0.5):
    tr = trainer_lib.Trainer(_config(**{"flow.loss_weight_t": weight_t}))
    batch = next(iter(tr.dataset()))
    _, metrics[weight_t] = jax.jit(
        lambda p, b, tr=tr: objective.loss_fn(p, tr.system, tr.enc, b, jax.random.key(3), jax.numpy.asarray(STEPS))
    )(params, batch)
  assert float(metrics[0.5]["l_sel"]) == float(metrics[0.0]["l_sel"])
  assert 0.0 < float(metrics[0.5]["l_shot"]) < float(metrics[0.0]["l_shot"])


def test_bad_config_errors():
  with pytest.raises(ValueError, match="batch_size"):
    trainer_lib.Trainer(load_config("tiny", **{"data.batch_size": 6}))
  with pytest.raises(ValueError, match="optim.frozen"):
    trainer_lib.Trainer(load_config("tiny", **{"optim.frozen": ("nope",)}))
  with pytest.raises(ValueError, match="mesh.shape"):
    trainer_lib.Trainer(load_config("tiny", **{"mesh.shape": (3, -1, 1, 1)}))


def _story(tmp_path, n=3, pattern="recall"):
  from onestory_jax.data import storyworld

  cfg = storyworld.StoryWorldConfig(height=32, width=32, frames_per_shot=8)
  s = storyworld.generate_story(7, pattern, cfg, num_shots=n)
  path = tmp_path / "story.json"
  path.write_text(json.dumps(s))
  return story_lib.load_story(str(path))


def _generator(workdir, guidance=2.0, memory_guidance=None):
  system, params, enc = checkpoints.load_for_sampling(workdir)
  return pipeline.OneStoryPipeline(
      system, params, enc, steps=3, shift=1.0, guidance=guidance, memory_guidance=memory_guidance
  )


def _sample(pipe, story, out, seed, memory="full"):
  """What `sample` does: the story's plan through the API into `out`, then every file; the manifest."""
  run = pipe.story(seed=seed, start_image=story.start_image, memory=memory, out=out)
  run.plan(story.captions)
  run.resume()
  run.save()
  return run.manifest


def _without_times(records):
  return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_sampling_is_reproducible_and_memory_matters(trained, tmp_path):
  workdir, _ = trained
  gen = _generator(workdir)
  story = _story(tmp_path)
  m1 = _sample(gen, story, str(tmp_path / "a"), seed=3)
  m2 = _sample(gen, story, str(tmp_path / "b"), seed=3)
  assert all(r["seconds"] > 0 for r in m1["shots"])
  f1 = video_io.load_frames_npz(str(tmp_path / "a" / "frames.npz"))
  f2 = video_io.load_frames_npz(str(tmp_path / "b" / "frames.npz"))
  assert len(f1) == 3 and f1[0].shape == (8, 32, 32, 3)
  for a, b in zip(f1, f2):
    np.testing.assert_array_equal(a, b)
  assert _without_times(m1["shots"]) == _without_times(m2["shots"])
  # Manifest: shot 1 has no memory; later shots select valid memory frames under the budget.
  assert m1["shots"][0]["selected"] == [] and m1["shots"][0]["context_tokens"] == 0
  assert [m["memory_frames"] for m in m1["shots"]] == [0, 4, 8]  # earlier shots only, 4 latent frames each
  sel = m1["shots"][2]["selected"]
  assert 1 <= len(sel) <= 4 and all(0 <= s["memory_frame"] < 8 for s in sel)
  assert all(s["patchifier"] in ([1, 2, 2], [1, 4, 4], [1, 8, 8]) for s in sel)
  assert m1["shots"][2]["context_tokens"] <= 16
  for name in ["shot_00.mp4", "shot_02.mp4", "story.mp4", "contact_sheet.png", "manifest.json"]:
    assert os.path.getsize(tmp_path / "a" / name) > 0
  # Another seed gives another story; no memory changes later shots but not the first.
  _sample(gen, story, str(tmp_path / "c"), seed=4)
  f3 = video_io.load_frames_npz(str(tmp_path / "c" / "frames.npz"))
  assert not np.array_equal(f1[0], f3[0])
  mn = _sample(gen, story, str(tmp_path / "d"), seed=3, memory="none")
  f4 = video_io.load_frames_npz(str(tmp_path / "d" / "frames.npz"))
  np.testing.assert_array_equal(f1[0], f4[0])
  assert not np.array_equal(f1[2], f4[2])
  assert all(s["selected"] == [] for s in mn["shots"])


def test_interrupted_story_resumes_where_it_stopped(trained, tmp_path, monkeypatch):
  workdir, _ = trained
  gen = _generator(workdir, memory_guidance=0.0)
  story = _story(tmp_path)
  full = _sample(gen, story, str(tmp_path / "full"), seed=5)
  calls = {"n": 0}
  real_call = sampler.ShotGenerator.__call__

  def dying(self, *a, **k):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt("killed")
    return real_call(self, *a, **k)

  monkeypatch.setattr(sampler.ShotGenerator, "__call__", dying)
  out = str(tmp_path / "part")
  with pytest.raises(KeyboardInterrupt):
    _sample(gen, story, out, seed=5)
  partial = json.loads(open(os.path.join(out, "manifest.json")).read())
  assert len(partial["shots"]) == 2 and not partial["complete"] and partial["num_shots"] == 3
  with pytest.raises(ValueError, match="already exists"):
    _sample(gen, story, out, seed=5)
  with pytest.raises(ValueError, match="sampler"):  # other sampler settings would not continue the same story
    _generator(workdir, guidance=4.0).open(out)
  with pytest.raises(ValueError, match="memory_guidance"):
    _generator(workdir, memory_guidance=1.5).open(out)
  # A manifest written before memory guidance existed records no such setting: it was off.
  old = dict(partial, sampler={k: v for k, v in partial["sampler"].items() if k != "memory_guidance"})
  assert partial["sampler"]["memory_guidance"] == 0.0
  video_io.atomic_write_json(os.path.join(out, "manifest.json"), old)
  monkeypatch.setattr(sampler.ShotGenerator, "__call__", real_call)
  run = gen.open(out)
  assert len(run) == 2 and run.seed == 5 and [p["caption"] for p in run.pending] == story.captions[2:]
  run.resume()
  run.save()
  assert run.manifest["complete"] and _without_times(run.manifest["shots"]) == _without_times(full["shots"])
  for a, b in zip(
      video_io.load_frames_npz(os.path.join(out, "frames.npz")),
      video_io.load_frames_npz(str(tmp_path / "full" / "frames.npz")),
  ):
    np.testing.assert_array_equal(a, b)


def test_export_then_sample_matches_workdir(trained, tmp_path):
  workdir, _ = trained
  out = str(tmp_path / "export")
  checkpoints.export_params(workdir, out)
  assert sorted(os.listdir(out)) == ["config.json", "params", "step.txt"]
  story = _story(tmp_path, n=2, pattern="consistency")
  m_work = _sample(_generator(workdir), story, str(tmp_path / "w"), seed=1)
  m_exp = _sample(_generator(out), story, str(tmp_path / "e"), seed=1)
  assert _without_times(m_work["shots"]) == _without_times(m_exp["shots"])
  for a, b in zip(
      video_io.load_frames_npz(str(tmp_path / "w" / "frames.npz")),
      video_io.load_frames_npz(str(tmp_path / "e" / "frames.npz")),
  ):
    np.testing.assert_array_equal(a, b)


def test_export_sets_sampler_defaults_only(trained, tmp_path):
  workdir, _ = trained
  out = str(tmp_path / "export")
  checkpoints.export_params(workdir, out, sample={"shift": 3, "guidance": None, "memory_guidance": 1})
  exported = checkpoints.load_for_sampling(out)[0].config
  trained_cfg = checkpoints.load_config_from_workdir(workdir)
  assert exported.sample.shift == 3.0 and isinstance(exported.sample.shift, float)
  assert exported.sample.memory_guidance == 1.0 and isinstance(exported.sample.memory_guidance, float)
  assert pipeline.OneStoryPipeline.from_pretrained(out).settings["memory_guidance"] == 1.0
  assert exported.sample.guidance == trained_cfg.sample.guidance
  assert exported.flow.timestep_shift == trained_cfg.flow.timestep_shift
  with pytest.raises(ValueError, match="no field 'cfg'"):
    checkpoints.export_params(workdir, str(tmp_path / "bad"), sample={"cfg": 2.0})


def test_init_params_fine_tunes_from_an_export(trained, tmp_path):
  """config.init_params: a fresh run starts from the export's parameters (sharded, step 0, fresh AdamW)."""
  workdir, params = trained
  out = str(tmp_path / "export")
  checkpoints.export_params(workdir, out)
  tr = trainer_lib.Trainer(_config(init_params=out))
  state = tr.init_state()
  assert int(state.step) == 0
  assert all(
      float(jax.numpy.abs(m).max()) == 0.0
      for m in jax.tree.leaves(state.opt_state)
      if getattr(m, "ndim", 0) > 0 and m.dtype == jax.numpy.float32
  )
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  dit = state.params["dit"]["patch_embedding"]["kernel"]
  assert dit.sharding == tr.program.state_shardings.params["dit"]["patch_embedding"]["kernel"]
  # A run whose model differs gets every differing parameter named, before anything trains.
  with pytest.raises(
      ValueError,
      match=r"does not fit the run's model \(1 difference;.*\n  \['frame_selection'\]"
      r"\['queries'\]: export has shape \(4, 32\), the run's model \(6, 32\)",
  ):
    trainer_lib.Trainer(_config(init_params=out, **{"selection.num_queries": 6})).init_state()
  with pytest.raises(ValueError, match="not an exported checkpoint"):
    trainer_lib.Trainer(_config(init_params=str(tmp_path))).init_state()
  with pytest.raises(ValueError, match="config.init_params and config.pretrained both set"):
    trainer_lib.Trainer(_config(init_params=out, pretrained=str(tmp_path))).init_state()


def test_init_params_can_change_the_conditioner_kernels(trained, tmp_path):
  """Fine-tuning with other conditioner.kernels: kept kernels come from the export (matched by kernel, not by
  index), a new kernel starts from the export's DiT patch embedding (tiled, FramePack), sharded like the rest."""
  workdir, params = trained
  out = str(tmp_path / "export")
  checkpoints.export_params(workdir, out)
  old = params["adaptive_conditioner"]
  pe = params["dit"]["patch_embedding"]
  tr = trainer_lib.Trainer(
      _config(init_params=out, **{"conditioner.kernels": ((1, 2, 2), (1, 2, 4), (1, 4, 4), (1, 8, 8))})
  )
  state = tr.init_state()
  new = jax.device_get(state.params["adaptive_conditioner"])
  for n, o in (("patchifier_0", "patchifier_0"), ("patchifier_2", "patchifier_1"), ("patchifier_3", "patchifier_2")):
    for k in ("kernel", "bias"):
      np.testing.assert_array_equal(new[n][k], old[o][k])
  c = old["patchifier_0"]["kernel"].shape[3]
  base = pe["kernel"][:1, :, :, :c]
  np.testing.assert_allclose(new["patchifier_1"]["kernel"], np.concatenate([base, base], axis=2) / 2, rtol=1e-6)
  np.testing.assert_array_equal(new["patchifier_1"]["bias"], pe["bias"])
  kernel = state.params["adaptive_conditioner"]["patchifier_1"]["kernel"]
  assert kernel.sharding == tr.program.state_shardings.params["adaptive_conditioner"]["patchifier_1"]["kernel"]
  for a, b in zip(jax.tree.leaves(params["dit"]), jax.tree.leaves(state.params["dit"])):
    np.testing.assert_array_equal(a, np.asarray(b))
  # Dropping a kernel keeps the others, whatever their new index.
  state = trainer_lib.Trainer(_config(init_params=out, **{"conditioner.kernels": ((1, 2, 2), (1, 8, 8))})).init_state()
  np.testing.assert_array_equal(
      state.params["adaptive_conditioner"]["patchifier_1"]["kernel"], old["patchifier_2"]["kernel"]
  )
  assert set(state.params["adaptive_conditioner"]) == {"patchifier_0", "patchifier_1"}
  # Anything else that differs is still named.
  with pytest.raises(ValueError, match=r"\['frame_selection'\]\['queries'\]: export has shape"):
    trainer_lib.Trainer(
        _config(init_params=out, **{"conditioner.kernels": ((1, 2, 2), (1, 8, 8)), "selection.num_queries": 6})
    ).init_state()


def test_memory_ablation_compares_every_strategy(trained):
  from onestory_jax import memory_ablation
  from onestory_jax import memory_strategies

  workdir, _ = trained
  out = first = memory_ablation.run(
      workdir, "recall", num_stories=1, out=None, memory=memory_strategies.STRATEGIES, steps=2
  )
  for mode in memory_strategies.STRATEGIES:
    assert 0.0 <= out[mode]["character_consistency"] <= 1.0
    assert set(out[mode]) == set(memory_ablation.METRICS)
  assert 0.0 <= out["top1_character_hit"]["onestory"] <= 1.0 and out["top1_character_hit"]["none"] == 0.0
  assert set(out["character_consistency_gain"]) == {f"onestory - {m}" for m in memory_strategies.STRATEGIES[1:]}
  gain = out["character_consistency_gain"]["onestory - none"]
  assert gain["stories"] == 1 and gain["standard_error"] is None
  assert gain["stories_better"] + gain["stories_worse"] <= 1

  # Several memory guidance scales: each strategy at each (none once), paired with the first mode, same seeds.
  out = memory_ablation.run(
      workdir, "recall", num_stories=1, out=None, memory=("onestory", "none"), steps=2, memory_guidance=(0.0, 2.0)
  )
  assert out["memory"] == ["onestory g_m=0", "onestory g_m=2", "none"]
  assert out["sample_memory_guidance"] == [0.0, 2.0]
  assert set(out["character_consistency_gain"]) == {"onestory g_m=0 - onestory g_m=2", "onestory g_m=0 - none"}
  # g_m = 0 samples as without the setting: the same per-story scores as the first run's 'onestory'.
  assert out["per_story"]["onestory g_m=0"] == first["per_story"]["onestory"]
  assert out["per_story"]["none"] == first["per_story"]["none"]
  assert out["per_story"]["onestory g_m=2"] != out["per_story"]["onestory g_m=0"]


def test_memory_ablation_references_rank_as_expected():
  """Ground truth scores near the top; random colours far below; a random colour of the same name in between."""
  from onestory_jax import memory_ablation
  from onestory_jax.data import storyworld

  stories = [storyworld.generate_story(seed, "recall") for seed in range(100, 108)]
  ref = memory_ablation.reference_scores(stories)
  assert ref["ground_truth"] > 0.9
  assert ref["random_colour"] < ref["random_colour_same_name"] < ref["ground_truth"]
  assert ref["random_colour"] < 0.25
  # Only returning characters change colour: first appearances match the ground truth exactly.
  s = stories[0]
  frames = memory_ablation.recolour_returning_characters(s, np.random.default_rng(0), same_name=False)
  truth = storyworld.render_story(s)
  np.testing.assert_array_equal(frames[0], truth[0])
  returning = [
      j
      for j, shot in enumerate(s["shots"])
      if any(c in sum((t["characters"] for t in s["shots"][:j]), []) for c in shot["characters"])
  ]
  assert returning and all(not np.array_equal(frames[j], truth[j]) for j in returning)


def test_selection_top1_hit_follows_annotations():
  from onestory_jax import memory_ablation

  story = {"shots": [{"characters": [0]}, {"characters": [1]}, {"characters": [0]}, {"characters": [2]}]}
  info = lambda idx, ok=True: {"indices": np.array([idx, 0]), "valid": np.array([ok, ok])}
  f = 4  # latent frames per shot
  assert memory_ablation.selection_top1_hit(story, 2, info(1), f)  # frame 1 = shot 0, which shows character 0
  assert not memory_ablation.selection_top1_hit(story, 2, info(5), f)  # frame 5 = shot 1: character 1 only
  assert not memory_ablation.selection_top1_hit(story, 2, info(1, ok=False), f)  # nothing selected
  assert memory_ablation.selection_top1_hit(story, 3, info(1), f) is None  # character 2 is new: nothing to recall
  assert memory_ablation.selection_top1_hit(story, 0, info(0, ok=False), f) is None


def test_missing_checkpoint_errors(tmp_path):
  with pytest.raises(ValueError, match="no checkpoints directory"):
    checkpoints.load_for_sampling(str(tmp_path))


def test_i2msv_start_image_enters_shot_one(trained, tmp_path):
  workdir, _ = trained
  gen = _generator(workdir)
  story = _story(tmp_path)
  from onestory_jax.data import storyworld

  start = storyworld.render_shot(story.raw, 0)[0]
  video_io.save_png(str(tmp_path / "start.png"), start)
  raw = dict(story.raw, start_image="start.png")
  (tmp_path / "i2v.json").write_text(json.dumps(raw))
  i2v = story_lib.load_story(str(tmp_path / "i2v.json"))
  m = _sample(gen, i2v, str(tmp_path / "i2v"), seed=3)
  t = _sample(gen, story, str(tmp_path / "t2v"), seed=3)
  assert m["start_image"].endswith("start.png") and t["start_image"] is None
  fi = video_io.load_frames_npz(str(tmp_path / "i2v" / "frames.npz"))
  ft = video_io.load_frames_npz(str(tmp_path / "t2v" / "frames.npz"))
  assert not np.array_equal(fi[0], ft[0])  # same seed, the start image changes shot 1
