"""python -m onestory_jax.data.build and config.data.source='multishot', end to end on tiny random weights.

A tiny random Wan2.1-I2V release in the diffusers layout (tests/test_wan_smoke.py's ``build_release``: VAE, umT5,
CLIP, DiT) plus a tiny random DINOv2 (transformers ``save_pretrained``) is converted with the project's converter;
four StoryWorld videos at the tiny config's 32x32 are curated (python -m onestory_jax.data.curate's pipeline) into
2- and 3-shot units at 16 fps with 5-frame clips, and two units whose source is a text file named .mp4 and a missing
file are added to the manifest. The build runs on Beam's DirectRunner through TFDS; the records are checked against
the models (the VAE latents the pixel path would compute, umT5 text, App. A.2 labels, the image-encoder input), read
as 3-shot triplets with shot inflation, trained on for 2 steps of the tiny Wan config without any VAE or text-encoder
call in the step, and the run is resumed exactly after a simulated kill. A build killed with SIGKILL resumes without
encoding its finished units again, and bad flags or inputs end with one line and exit status 2.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
import transformers

from onestory_jax import convert
from onestory_jax import next_shot
from onestory_jax import objective
from onestory_jax import sharding
from onestory_jax import trainer as trainer_lib
from onestory_jax import weights
from onestory_jax.data import build
from onestory_jax.data import pipeline as data_pipeline
from onestory_jax.data.curation import captions as captions_lib
from onestory_jax.data.curation import decode
from onestory_jax.data.curation import pipeline as curation
from onestory_jax.data.curation import synthetic
from onestory_jax.data.curation.config import CurationConfig
from onestory_jax.data.multishot import encoder as encoder_lib
from onestory_jax.data.multishot import layout as layout_lib
from onestory_jax.data.multishot import reader as reader_lib
from onestory_jax.models import codec as codec_lib
from onestory_jax.models.wan import umt5 as te
from tests.helpers import xla_flags
from tests.test_wan_smoke import FRAMES, HW, build_release, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FPS = 16
BAD_UNITS = {"broken/0": "text.mp4", "missing/0": "missing.mp4"}  # unit id -> source file name


def _config(world, **overrides):
  return tiny_config(
      "wan21_i2v_14b_480p",
      world["converted"],
      **{"data.source": "multishot", "data.records": world["records"], **overrides},
  )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The converted tiny release (with DINOv2), the curated videos, and the manifest with two bad units."""
  root = tmp_path_factory.mktemp("build")
  src, dst = str(root / "release"), str(root / "converted")
  build_release(src)
  torch.manual_seed(1)
  transformers.Dinov2Model(
      transformers.Dinov2Config(
          hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=28
      )
  ).save_pretrained(os.path.join(src, "dinov2"))
  assert convert.main([f"--src={src}", f"--dst={dst}", "--scan_layers", "--batch_mb=0.05"]) == 0
  videos = root / "videos"
  videos.mkdir()
  lines = []
  for i in range(4):
    video = synthetic.make_video(
        str(videos / f"v{i}.mp4"), seed=900 + i, fps=FPS, num_shots=(3, 4), seconds=(1.0, 2.0), size=HW
    )
    lines.append(json.dumps(video.captions_line()))
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
  curated = root / "curated"
  config = CurationConfig(fps=FPS, frames_per_shot=FRAMES, height=HW, width=HW)
  curation.curate(
      curation.find_videos([str(videos / "*.mp4")]),
      str(curated),
      config,
      captions_lib.JsonlCaptions(str(root / "captions.jsonl")),
      progress=False,
  )
  good = (curated / "manifest.jsonl").read_text().splitlines()
  (videos / "text.mp4").write_text("this is not a video\n" * 20)
  bad = []
  for uid, name in BAD_UNITS.items():
    unit = json.loads(good[0])
    unit.update(id=uid, source=str(videos / name))
    bad.append(json.dumps(unit))
  manifest = good[:2] + bad[:1] + good[2:] + bad[1:]  # bad units in the middle and at the end
  (curated / "manifest.jsonl").write_text("\n".join(manifest) + "\n")
  return dict(
      root=root,
      converted=dst,
      curated=str(curated),
      manifest=str(curated / "manifest.jsonl"),
      lines=manifest,
      good=[json.loads(l) for l in good],
      records=str(root / "records"),
  )


@pytest.fixture(scope="module")
def built(world):
  """The records of the manifest (DirectRunner, in process); the unit cache is kept for the resume test."""
  summary = build.build(
      manifest=world["manifest"], config=_config(world), out=world["records"], name="tiny", keep_cache=True
  )
  return summary, reader_lib.MultiShotRecords(summary["dataset_dir"])


# ----------------------------------------------------------------------------- the build


def test_every_good_unit_is_a_record_and_bad_ones_are_named(world, built):
  summary, records = built
  n_good = len(world["good"])
  print(
      f"\nbuild: {summary['units']} units -> {summary['records']} records in {summary['seconds']:.1f} s "
      f"({summary['units_per_second']:.3f} units/s, first unit includes compilation); load {os.getloadavg()}"
  )
  assert n_good >= 4 and summary["units"] == n_good + len(BAD_UNITS) and len(records) == n_good
  assert summary["records"] == n_good and not summary["already_built"]
  failed = {f["unit"]: f for f in summary["failed"]}
  assert set(failed) == set(BAD_UNITS)
  for uid, name in BAD_UNITS.items():
    assert failed[uid]["reason"] == "undecodable" and failed[uid]["shot"] == 0
    assert failed[uid]["source"].endswith(name) and failed[uid]["message"]
  assert "No such file" in failed["missing/0"]["message"] or "cannot open" in failed["missing/0"]["message"]
  line = build.failure_line(failed["broken/0"])
  assert line.startswith("skipped unit broken/0 (manifest line 3,") and "shot 0 undecodable" in line
  on_disk = [json.loads(l) for l in open(os.path.join(os.path.dirname(summary["dataset_dir"]), "failed.jsonl"))]
  assert {f["unit"] for f in on_disk} == set(BAD_UNITS)
  # Manifest order; the features of docs/records.md.
  assert [records[k]["unit"] for k in range(len(records))] == [u["id"] for u in world["good"]]
  meta = records.metadata
  assert meta["records"] == n_good and meta["augmentations"] == 1 and len(meta["failed"]) == 2
  lay = records.layout
  assert lay == layout_lib.RecordLayout.from_config(_config(world))
  f = lay.latent_shape
  assert f == (2, HW // 8, HW // 8, 16) and lay.image_size == (28, 28) and lay.text_dim == 32
  for k in range(len(records)):
    r, n = records[k], len(world["good"][k]["shots"])
    assert r["latents"].shape == (n,) + f and r["latents"].dtype == np.float16
    assert r["augmented_latents"].shape == (n - 1, 1) + f and r["start_latents"].shape == (n,) + f
    assert r["images"].shape == (n, f[0], 28, 28, 3) and r["augmented_images"].shape == (n - 1, 1, f[0], 28, 28, 3)
    assert r["tokens"].shape == (n, 16) and r["text"].shape == (n, 16, 32) and r["sel_labels"].shape == (n, n, f[0])
    assert json.loads(r["meta_json"]) == world["good"][k] and int(r["num_shots"]) == n


def test_records_hold_what_the_models_compute(world, built):
  """Latents = the pixel path's VAE encoding; text = umT5 as the trainer restores it; labels = Embedder.labels;
  images: CLIP preprocessing of the stored input equals that of the full frame, bit for bit."""
  _, records = built
  config = _config(world)
  system = next_shot.make_system(config)
  enc = system.encoder_params(jax.random.key(0))  # the VAE and CLIP restored as the trainer does
  abstract = sharding.strip_boxes(jax.eval_shape(system.init_params, jax.random.key(0))["text_encoder"])
  te_params = weights.load_converted(world["converted"], "text_encoder", abstract)
  embedder = encoder_lib.load_embedder(world["converted"], None, None)
  k = next(i for i, u in enumerate(world["good"]) if len(u["shots"]) == 3)
  unit, r = world["good"][k], records[k]
  shots = [np.stack([x for _, x in decode.iter_frames(unit["source"], FPS, HW, HW, *s["clip"])]) for s in unit["shots"]]
  lat = np.asarray(system.encode_shots(enc, np.stack(shots)))
  np.testing.assert_allclose(r["latents"].astype(np.float32), lat, rtol=2e-3, atol=2e-3 * np.abs(lat).max())
  video = np.zeros((1, FRAMES, HW, HW, 3), np.float32)
  video[0, 0] = codec_lib.to_unit(shots[1][0])
  start = np.asarray(system.codec.encode(enc["codec"], video))[0]
  np.testing.assert_allclose(
      r["start_latents"][1].astype(np.float32), start, rtol=2e-3, atol=2e-3 * np.abs(start).max()
  )
  rng = np.random.default_rng([0, int(hashlib.sha256(unit["id"].encode()).hexdigest()[:8], 16), 1, 0])
  aug = np.asarray(system.encode_shots(enc, data_pipeline.augment_shot(shots[1], rng)[None]))[0]
  np.testing.assert_allclose(
      r["augmented_latents"][1, 0].astype(np.float32), aug, rtol=2e-3, atol=2e-3 * np.abs(aug).max()
  )
  tokens = system.tokenizer.encode([s["caption"] for s in unit["shots"]])
  np.testing.assert_array_equal(r["tokens"], tokens)
  text = np.asarray(system.model.apply({"params": {"text_encoder": te_params}}, tokens, method="encode_text"))
  np.testing.assert_allclose(r["text"].astype(np.float32), text, rtol=2e-3, atol=2e-3 * np.abs(text).max())
  assert not np.any(
      np.asarray(system.model.apply({"params": {"text_encoder": te_params}}, 0 * tokens, method="encode_text"))
  )
  # Pseudo-labels: any memory pair against the target is Embedder.labels on those shots.
  want = embedder.labels([shots[0], shots[1]], shots[2])
  np.testing.assert_allclose(np.concatenate([r["sel_labels"][0, 2], r["sel_labels"][1, 2]]), want, atol=1e-5)
  np.testing.assert_allclose(r["sel_labels"][0, 1], embedder.labels([shots[0]], shots[1]), atol=1e-5)
  # Image path: one stored input per latent frame (the first pixel frame of its group).
  rep = records.layout.representative_frames()
  assert rep.tolist() == [0, 1]
  full = system.image_encoder.preprocess(codec_lib.to_unit(shots[2][rep]))
  stored = system.image_encoder.preprocess(codec_lib.to_unit(r["images"][2]))
  np.testing.assert_array_equal(np.asarray(full), np.asarray(stored))


def test_triplets_with_shot_inflation_from_records(world, built):
  _, records = built
  config = _config(world, **{"data.batch_size": 8, "data.p_inflate": 0.5})
  spec = data_pipeline.batch_spec(config)
  assert "frames" not in spec and spec["latents"][0] == (8, 3, 2, 4, 4, 16) and spec["sel_labels"][0] == (8, 2, 2)
  assert spec["text"][0] == (8, 16, 32) and spec["images"][0] == (8, 3, 2, 28, 28, 3)
  it = iter(data_pipeline.make_train_dataset(config, warmup_steps=0))
  kinds = set()
  for _ in range(3):
    batch = next(it)
    for name, (shape, dtype) in spec.items():
      assert batch[name].shape == shape and batch[name].dtype == dtype, name
    for row in range(8):
      rec = records[int(batch["story"][row])]
      lat, labels = batch["latents"][row], batch["sel_labels"][row]
      shots = batch["memory_shots"][row]
      # The target is a stored shot of the story, with its caption's tokens and embedding.
      target = next(t for t in range(int(rec["num_shots"])) if np.array_equal(lat[2], rec["latents"][t]))
      np.testing.assert_array_equal(batch["text"][row], rec["text"][target])
      np.testing.assert_array_equal(batch["tokens"][row], rec["tokens"][target])
      np.testing.assert_array_equal(batch["start_latents"][row], rec["start_latents"][target])
      np.testing.assert_array_equal(batch["images"][row, 2], rec["images"][target])
      if not batch["synthetic"][row]:
        kinds.add("real")
        for m in range(2):
          np.testing.assert_array_equal(lat[m], rec["latents"][shots[m]])
          np.testing.assert_array_equal(labels[m], rec["sel_labels"][shots[m], target])
        continue
      first = int(np.argmax(batch["real_first"][row]))
      syn = 1 - first
      np.testing.assert_array_equal(lat[first], rec["latents"][shots[first]])
      np.testing.assert_array_equal(labels[first], rec["sel_labels"][shots[first], target])
      if labels[syn][0] == -1.0:  # cross-video insertion: a shot of another story
        kinds.add("inserted")
        assert (labels[syn] == -1.0).all()
        assert any(
            np.array_equal(lat[syn], records[j]["latents"][s])
            for j in range(len(records))
            if j != int(batch["story"][row])
            for s in range(int(records[j]["num_shots"]))
        )
      else:  # the stored augmented copy of the first shot
        kinds.add("augmented")
        assert (labels[syn] == 0.0).all()
        np.testing.assert_array_equal(lat[syn], rec["augmented_latents"][shots[first], 0])
        np.testing.assert_array_equal(batch["images"][row, syn], rec["augmented_images"][shots[first], 0])
  assert kinds == {"real", "inserted", "augmented"}, kinds
  with pytest.raises(ValueError, match=r"do not fit the run config.*\n  text_len: 16 vs 8"):
    reader_lib.open_records(_config(world, **{"data.text_len": 8}))
  # Per-process sharding: process p of 2 reads positions p, p + 2, ... of the same global order.
  full = next(iter(data_pipeline.make_train_dataset(config, warmup_steps=0)))
  for p in range(2):
    part = next(iter(data_pipeline.make_train_dataset(config, warmup_steps=0, process_index=p, process_count=2)))
    for name in spec:
      np.testing.assert_array_equal(part[name], full[name][p::2])


# ----------------------------------------------------------------------------- training on the records


@pytest.fixture(scope="module")
def trained(world, built, tmp_path_factory):
  """2 steps of the tiny Wan config on the records (a checkpoint per step); counts VAE and text-encoder calls made
  while the train step is traced and run."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = _config(world, num_train_steps=2, checkpoint_every_steps=1, log_every_steps=1, warmup_fraction_dc=0.5)
  rec = {"metrics": [], "in_step": False, "calls": []}
  trainers = []
  real_init, real_step = trainer_lib.Trainer.__init__, trainer_lib.Trainer.step
  real_encode_raw, real_decode_raw = codec_lib.WanVAECodec.encode_raw, codec_lib.WanVAECodec.decode_raw
  real_text = te.T5Encoder.__call__

  def counted(name, fn):
    def wrapper(*args, **kwargs):
      if rec["in_step"]:
        rec["calls"].append(name)
      return fn(*args, **kwargs)

    return wrapper

  def step(self, state, batch):
    rec["in_step"] = True
    try:
      state, metrics = real_step(self, state, batch)
    finally:
      rec["in_step"] = False
    rec["metrics"].append(jax.device_get(metrics))
    return state, metrics

  def init(self, *args, **kwargs):  # one Trainer (one compiled step) serves the run and its resume
    if trainers:
      self.__dict__.update(trainers[0].__dict__, workdir=args[1] if len(args) > 1 else kwargs.get("workdir"))
      return
    real_init(self, *args, **kwargs)
    trainers.append(self)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer_lib.Trainer, "__init__", init)
    mp.setattr(trainer_lib.Trainer, "step", step)
    mp.setattr(codec_lib.WanVAECodec, "encode_raw", counted("vae.encode", real_encode_raw))
    mp.setattr(codec_lib.WanVAECodec, "decode_raw", counted("vae.decode", real_decode_raw))
    mp.setattr(te.T5Encoder, "__call__", counted("umt5", real_text))
    t0 = time.time()
    state = trainer_lib.train_and_evaluate(config, workdir)
    rec["seconds"] = time.time() - t0
    rec["final"] = jax.device_get(state.params)
    copy = str(tmp_path_factory.mktemp("copy") / "run")
    shutil.copytree(workdir, copy)
    shutil.rmtree(os.path.join(copy, "checkpoints", "2"))  # as if killed after step 1
    first = list(rec["metrics"])
    rec["metrics"].clear()
    resumed = trainer_lib.train_and_evaluate(config, copy)
    rec["resumed"] = jax.device_get(resumed.params)
    rec["resumed_metrics"] = list(rec["metrics"])
    rec["metrics"] = first
  rec["trainer"] = trainers[0]
  return rec


def test_training_on_records_runs_without_vae_or_text_encoder(trained):
  print(f"\ntraining: 2 steps of the tiny Wan config on the records in {trained['seconds']:.1f} s (with compilation)")
  assert trained["calls"] == []
  assert len(trained["metrics"]) == 2
  for m in trained["metrics"]:
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 and m["l_sel"] > 0


def test_the_call_counters_see_the_pixel_path(world, trained):
  """The counters of the fixture do see the VAE and umT5 when the same loss is traced on a pixel batch."""
  tr = trained["trainer"]
  pixel = _config(world, **{"data.source": "on_the_fly"})
  batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in data_pipeline.batch_spec(pixel).items()}
  calls = []
  with pytest.MonkeyPatch.context() as mp:
    real_encode_raw, real_text = codec_lib.WanVAECodec.encode_raw, te.T5Encoder.__call__
    mp.setattr(codec_lib.WanVAECodec, "encode_raw", lambda *a, **k: calls.append("vae") or real_encode_raw(*a, **k))
    mp.setattr(te.T5Encoder, "__call__", lambda *a, **k: calls.append("umt5") or real_text(*a, **k))
    jax.eval_shape(
        lambda p, b: objective.loss_fn(p, tr.system, tr.enc, b, jax.random.key(0), jax.numpy.asarray(1)),
        tr.program.abstract_state.params,
        batch,
    )
  assert "vae" in calls and "umt5" in calls


def test_training_on_records_resumes_exactly(trained):
  """The run killed after step 1 and started again repeats step 2 bit for bit (same batch from the restored grain
  iterator, same loss, same parameters)."""
  assert len(trained["resumed_metrics"]) == 1
  assert float(trained["resumed_metrics"][0]["loss"]) == float(trained["metrics"][1]["loss"])
  for a, b in zip(jax.tree.leaves(trained["final"]), jax.tree.leaves(trained["resumed"])):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- resume and the command line


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR="", XLA_FLAGS=xla_flags())


def test_a_killed_build_resumes_without_redoing_finished_units(world, built, tmp_path):
  """SIGKILL the command after its first finished unit; the rerun encodes only the rest and writes the same
  records; a third run finds them built."""
  summary, records = built
  out = tmp_path / "records"
  args = [
      sys.executable,
      "-m",
      "onestory_jax.data.build",
      f"--curated={world['curated']}",
      f"--pretrained={world['converted']}",
      f"--out={out}",
      "--name=tiny",
      "--noprogress",
      "--direct_num_workers=1",  # a Beam pipeline option, passed through
      f"--config={_config_file(world, tmp_path)}",
  ]
  # The test process's XLA setup (8 host devices), so that the units the command encodes are bit-identical to the
  # ones encoded here.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR="")
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  units = out / "cache" / "tiny" / "units"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if units.is_dir() and any(p.suffix == ".npz" and not p.name.startswith(".") for p in units.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  os.kill(proc.pid, signal.SIGKILL)
  proc.communicate()
  done = len([p for p in units.iterdir() if p.suffix == ".npz" and not p.name.startswith(".")])
  assert 1 <= done < summary["records"]
  assert not (out / "multishot" / "tiny" / "1.0.0").exists()
  again = build.build(manifest=world["manifest"], config=_config(world), out=str(out), name="tiny")
  assert again["cached_before"] == done and again["encoded"] == summary["records"] - done
  assert again["records"] == summary["records"] and {f["unit"] for f in again["failed"]} == set(BAD_UNITS)
  assert not (out / "cache" / "tiny").exists()  # removed after success (--keep_cache keeps it)
  resumed = reader_lib.MultiShotRecords(again["dataset_dir"])
  for k in range(len(records)):
    a, b = records[k], resumed[k]
    assert sorted(a) == sorted(b)
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  third = build.build(manifest=world["manifest"], config=_config(world), out=str(out), name="tiny")
  assert third["already_built"] and third["records"] == summary["records"]
  with pytest.raises(ValueError, match="holds a build 'tiny' of other inputs"):
    build.build(manifest=world["manifest"], config=_config(world), out=str(out), name="tiny", augmentations=2)


def _config_file(world, directory) -> str:
  """The test's config as a config file for the command line (the tiny release's VAE sizes are not a preset)."""
  (directory / "config.json").write_text(_config(world).to_json())
  path = directory / "tiny_config.py"
  path.write_text(
      "import json\nfrom onestory_jax import checkpoints\n\n\ndef get_config():\n"
      f"  return checkpoints.config_from_dict(json.load(open({str(directory / 'config.json')!r})))\n"
  )
  return str(path)


BAD_CASES = [
    ([], "--curated is required"),
    (["--curated=CURATED", "--pretrained=CONVERTED", "--out=OUT", "--bogus_option=1"], "unknown flag --bogus_option=1"),
    (["--curated=CURATED", "--pretrained=CONVERTED", "--out=OUT", "--dtype=int8"], "--dtype must be one of"),
    (["--curated=CURATED", "--pretrained=CONVERTED", "--out=OUT"], "was curated at 32x32, but config.data is 480x832"),
    (["--curated=CURATED", "--pretrained=/nonexistent/conv", "--out=OUT"], "not a directory"),
    (["--curated=/nonexistent/cur", "--pretrained=CONVERTED", "--out=OUT"], "no manifest at /nonexistent/cur"),
    (
        ["--curated=CURATED", "--pretrained=CONVERTED", "--out=OUT", "--config=TINY", "--dinov2=/nonexistent/d"],
        "--dinov2=/nonexistent/d: no config.json",
    ),
    (
        ["--curated=CURATED", "--pretrained=CONVERTED", "--out=OUT", "--config=TINY", "--config.text_encoder.d_ff=8"],
        "text_encoder.d_ff: run config has 8, the release has 64",
    ),
]


def test_bad_input_is_one_line_and_exit_status_2(world, tmp_path):
  tiny = _config_file(world, tmp_path)
  procs = []
  for i, (args, _) in enumerate(BAD_CASES):
    args = [
        a.replace("=TINY", f"={tiny}")
        .replace("=CURATED", f"={world['curated']}")
        .replace("=CONVERTED", f"={world['converted']}")
        .replace("=OUT", f"={tmp_path / f'out{i}'}")
        for a in args
    ]
    procs.append(
        subprocess.Popen(
            [sys.executable, "-m", "onestory_jax.data.build", *args],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
  for (args, expected), proc in zip(BAD_CASES, procs):
    stdout, stderr = proc.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2, (args, stderr[-3000:])
    assert len(lines) == 1 and expected in lines[0], (args, stderr[-3000:])
    assert "Traceback" not in stderr and stdout.strip() == ""


def test_split_argv():
  known = {"curated", "out", "progress"}
  ours, beam = build.split_argv(
      ["p", "--curated=C", "--runner_v2", "--project", "my-proj", "--noprogress", "--config.seed=1", "--region=x"],
      known,
  )
  assert ours == ["p", "--curated=C", "--noprogress", "--config.seed=1"]
  assert beam == ["--runner_v2", "--project", "my-proj", "--region=x"]
  build.check_beam_args(["--runner=DirectRunner", "--direct_num_workers=2", "--project", "p", "--region=x"])
  with pytest.raises(ValueError, match="unknown flag --nope"):
    build.check_beam_args(["--nope=1"])
