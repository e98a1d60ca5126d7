"""Curation (onestory_jax/data/curation, python -m onestory_jax.data.curate): cut detection on StoryWorld videos with
known cuts, bad files, the filters, captions, story units, resume after SIGKILL, and the command's bad-input exits."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from onestory_jax.data import curate_benchmark
from onestory_jax.data.curation import captions as captions_lib
from onestory_jax.data.curation import decode
from onestory_jax.data.curation import pipeline
from onestory_jax.data.curation import synthetic
from onestory_jax.data.curation import units as units_lib
from onestory_jax.data.curation.config import CurationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FPS = 16.0
# The test videos are 64x64 with shots of 1.5 to 4 s: train on 64x64, 16-frame (1 s) shots.
CONFIG = CurationConfig(fps=FPS, frames_per_shot=16, height=64, width=64)
FLAGS = ["--fps=16", "--frames_per_shot=16", "--height=64", "--width=64"]
# Source frame rates and containers of the story videos: resampling up, down and through.
STORY_VIDEOS = [(16, "mp4"), (24, "mp4"), (12, "mp4"), (25, "mkv"), (30, "mp4"), (16, "mkv"), (24, "mp4"), (16, "mp4")]
SPECIAL = ("story", "black", "story", "story", "duplicate", "story", "static", "story", "story")
MISSING_CAPTION = ("v1", 1)  # this video's shot 1 has no line in the captions file


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Story videos, one with a black, a duplicate and a static shot, one without a cut, three broken files, and the
  captions file; curated once (in this process)."""
  root = tmp_path_factory.mktemp("curate")
  src = root / "videos"
  src.mkdir()
  truth = {}
  for i, (fps, ext) in enumerate(STORY_VIDEOS):
    path = str(src / f"v{i}.{ext}")
    truth[f"v{i}"] = synthetic.make_video(path, seed=500 + i, fps=fps, codec="libx264" if ext == "mp4" else "mpeg4")
  truth["special"] = synthetic.make_video(str(src / "special.mp4"), seed=77, fps=16, kinds=SPECIAL)
  truth["nocut"] = synthetic.make_video(str(src / "nocut.mp4"), seed=78, fps=16, kinds=["story"], seconds=(3, 3))
  broken = synthetic.write_corrupt_files(str(src), truth["v0"].path)
  lines = []
  for name, video in truth.items():
    line = video.captions_line()
    if name == MISSING_CAPTION[0]:
      del line["shots"][MISSING_CAPTION[1]]
    lines.append(json.dumps(line))
  captions_path = root / "captions.jsonl"
  captions_path.write_text("\n".join(lines) + "\n")
  out = root / "out"
  videos = pipeline.find_videos([str(src / "*")])
  captioner = captions_lib.JsonlCaptions(str(captions_path))
  summary = pipeline.curate(videos, str(out), CONFIG, captioner, progress=False)
  records = {
      os.path.splitext(os.path.basename(v))[0]: json.loads(
          (out / "videos" / f"{pipeline.video_key(v)}.json").read_text()
      )
      for v in videos
  }
  return dict(
      root=root,
      src=src,
      out=out,
      truth=truth,
      broken=broken,
      captions=captions_path,
      summary=summary,
      records=records,
      manifest=[json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()],
      rejected=[json.loads(l) for l in (out / "rejected.jsonl").read_text().splitlines()],
  )


def _true_cuts(video: synthetic.SyntheticVideo) -> list[int]:
  """The video's cuts in frames at FPS (a cut at source time t starts at frame ceil(t * FPS))."""
  return [int(np.ceil(c / video.fps * FPS - 1e-9)) for c in video.cuts]


def test_cut_detection_precision_recall(corpus):
  names = [f"v{i}" for i in range(len(STORY_VIDEOS))] + ["special"]
  records = [corpus["records"][n] for n in names]
  scores = curate_benchmark.cut_scores(records, [corpus["truth"][n] for n in names], FPS)
  print(f"\ncut detection on {len(names)} videos: {scores}")
  assert scores["cuts"] >= 30
  assert scores["precision"] >= 0.95 and scores["recall"] >= 0.95
  for name in names:  # shot ranges tile the video
    shots = corpus["records"][name]["shots"]
    assert shots[0]["start_frame"] == 0 and shots[-1]["end_frame"] == corpus["records"][name]["video"]["frames"]
    assert all(a["end_frame"] == b["start_frame"] for a, b in zip(shots[:-1], shots[1:]))


def test_bad_files_and_single_shot_are_rejected_with_reasons(corpus):
  by_source = {r["source"]: r for r in corpus["rejected"] if r["shot"] is None}
  for path, reason in corpus["broken"].items():
    assert by_source[path]["reason"] == reason, by_source[path]
  assert "empty" in by_source[str(corpus["src"] / "empty.mp4")]["message"]
  assert "Invalid data" in by_source[str(corpus["src"] / "text.mp4")]["message"]
  assert by_source[corpus["truth"]["nocut"].path]["reason"] == "no_cut"
  assert set(r["reason"] for r in corpus["rejected"]) <= set(pipeline.REASONS)
  assert corpus["summary"]["rejected_videos"] == {"no_cut": 1, "undecodable": 3}
  assert not any(line["source"] in corpus["broken"] for line in corpus["manifest"])


def test_filters_reject_black_duplicate_and_static_shots(corpus):
  shots = corpus["records"]["special"]["shots"]
  assert len(shots) == len(SPECIAL)
  reasons = [s["reason"] for s in shots]
  assert reasons[1] == "black" and reasons[4] == "duplicate" and reasons[6] == "static", reasons
  # shots 0 and 5 pass every filter but have no kept neighbour; 2-3 and 7-8 make units
  assert reasons == ["unpaired", "black", None, None, "duplicate", "unpaired", "static", None, None]
  assert corpus["records"]["special"]["units"] == [[2, 3], [7, 8]]
  assert shots[4]["similarity"] > CONFIG.duplicate_similarity > max(s["similarity"] for s in shots[1:4])
  lines = {(r["source"], r["shot"]): r for r in corpus["rejected"]}
  assert lines[(corpus["truth"]["special"].path, 1)]["message"].startswith("mean luma")


def test_captions_from_jsonl_are_matched_to_shots(corpus):
  seen = 0
  for line in corpus["manifest"]:
    name = os.path.splitext(os.path.basename(line["source"]))[0]
    truth = corpus["truth"][name]
    for shot in line["shots"]:
      overlaps = [min(e, shot["end_s"]) - max(s, shot["start_s"]) for s, e in truth.spans]
      assert shot["caption"] == truth.captions[int(np.argmax(overlaps))]
      seen += 1
  assert seen == corpus["summary"]["shots_in_units"] >= 30
  name, index = MISSING_CAPTION
  missing = corpus["records"][name]["shots"][index]
  assert missing["reason"] == "no_captions" and missing["caption"] is None


def test_story_units(corpus):
  assert [units_lib.unit_sizes(n) for n in range(1, 8)] == [[], [2], [3], [2, 2], [3, 2], [3, 3], [3, 2, 2]]
  assert [units_lib.unit_sizes(n, 2) for n in (2, 3, 5)] == [[2], [2], [2, 2]]
  assert units_lib.story_units([True, True, False, True, True, True, True, True, False, True]) == [
      [0, 1],
      [3, 4, 5],
      [6, 7],
  ]
  total = 0
  for name, record in corpus["records"].items():
    passed = [s["reason"] in (None, "unpaired") for s in record["shots"]]
    assert record["units"] == units_lib.story_units(passed), name
    total += len(record["units"])
  assert total == len(corpus["manifest"]) == corpus["summary"]["units"]
  name, index = MISSING_CAPTION
  assert all(index not in u for u in corpus["records"][name]["units"])
  for line in corpus["manifest"]:
    assert 2 <= len(line["shots"]) <= 3 and (line["fps"], line["height"], line["width"]) == (FPS, 64, 64)
    indices = [s["index"] for s in line["shots"]]
    assert indices == list(range(indices[0], indices[0] + len(indices)))  # consecutive shots of the source
    for shot in line["shots"]:
      assert shot["start_s"] == shot["start_frame"] / FPS and shot["end_s"] == shot["end_frame"] / FPS
      a, b = shot["clip"]
      assert shot["start_frame"] <= a < b <= shot["end_frame"] and b - a == CONFIG.frames_per_shot


def test_two_stage_captioner_is_called_per_unit_with_frames(corpus):
  calls = []

  class Toy(captions_lib.TwoStageCaptioner):

    def caption(self, frames):
      calls.append(("caption", frames.shape))
      return f"a shot of brightness {int(frames.mean())}"

    def rewrite(self, caption, frames, previous_caption, previous_frames):
      calls.append(("rewrite", previous_caption))
      return f"after '{previous_caption}', {caption}"

  record = pipeline.curate_video(corpus["truth"]["special"].path, CONFIG, Toy())
  assert record["units"] == [[2, 3], [7, 8]]
  assert [c[0] for c in calls] == ["caption", "caption", "rewrite"] * 2
  assert calls[0][1] == (CONFIG.caption_frames, 64, 64, 3)
  first, second = (record["shots"][i]["caption"] for i in (2, 3))
  assert first.startswith("a shot of") and second.startswith(f"after '{first}'")


def test_decode_resamples_in_time_and_crops_the_centre(tmp_path):
  # 24 frames at 12 fps, frame i a flat grey of 8 * i, with a white centre band; read at 16 fps, 32x32 from 64x128.
  frames = np.repeat((np.arange(24, dtype=np.uint8) * 8)[:, None, None, None], 64, 1).repeat(128, 2).repeat(3, 3)
  frames[:, :, 48:80] = 255
  path = str(tmp_path / "ramp.mp4")
  synthetic.write_video(path, frames, 12, options={"qp": "0"})
  got = list(decode.iter_frames(path, 16, 32, 32))
  assert [k for k, _ in got] == list(range(32))  # 2 s at 16 fps
  for k, image in got:
    assert image.shape == (32, 32, 3)
    assert abs(int(image[16, 2, 0]) - 8 * (k * 12 // 16)) <= 2, k  # sample and hold
    assert image[:, 8:24].min() > 200  # the 32-px centre band of the 64x128 frame, scaled to 64x64 and cropped
  later = list(decode.iter_frames(path, 16, 32, 32, start_frame=20, end_frame=25))
  assert [k for k, _ in later] == list(range(20, 25))
  assert all(np.array_equal(a, got[k][1]) for k, a in later)


def test_config_validation_and_ml_collections():
  with pytest.raises(ValueError, match=r"CurationConfig\.fps"):
    CurationConfig(fps=0)
  with pytest.raises(ValueError, match=r"CurationConfig\.max_shots_per_unit"):
    CurationConfig(max_shots_per_unit=4)
  config = CurationConfig.from_config(ml_collections.ConfigDict({"fps": 24.0, "height": 256}), width=448)
  assert (config.fps, config.height, config.width, config.frames_per_shot) == (24.0, 256, 448, 81)
  assert CurationConfig().shortest_shot_seconds == 81 / 16 and CurationConfig().analysis_shape == (74, 128)


def _curate_cli(*flags, **kwargs):
  argv = [sys.executable, "-m", "onestory_jax.data.curate", "--noprogress", *flags]
  return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False, **kwargs)


def test_resume_after_sigkill_gives_the_same_manifest(corpus, tmp_path):
  out = tmp_path / "out"
  argv = [sys.executable, "-m", "onestory_jax.data.curate", f"--videos={corpus['src']}/*", "--noprogress"]
  argv += [f"--captions={corpus['captions']}", f"--out={out}", *FLAGS]
  proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  results = out / "videos"
  deadline = time.monotonic() + 60
  while proc.poll() is None and time.monotonic() < deadline:
    if results.is_dir() and any(p.suffix == ".json" for p in results.iterdir()):
      proc.send_signal(signal.SIGKILL)  # part way: one or more videos done, one in progress
      break
    time.sleep(0.002)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  assert not (out / "manifest.jsonl").exists()
  done = {p.name: p.stat().st_mtime_ns for p in results.iterdir() if p.suffix == ".json"}
  assert 1 <= len(done) < len(corpus["records"]), done
  resumed = _curate_cli(f"--videos={corpus['src']}/*", f"--captions={corpus['captions']}", f"--out={out}", *FLAGS)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resuming: {len(done)} of {len(corpus['records'])} videos were done already" in resumed.stderr
  assert {p: (results / p).stat().st_mtime_ns for p in done} == done  # finished videos were not redone
  for name in ("manifest.jsonl", "rejected.jsonl"):
    assert (out / name).read_bytes() == (corpus["out"] / name).read_bytes(), name
  assert not [p for p in results.iterdir() if p.name.endswith(".tmp")]


def test_bad_flags_and_inputs_exit_2_with_one_line(corpus, tmp_path):
  bad_captions = tmp_path / "captions.jsonl"
  bad_captions.write_text('{"video": "v0.mp4", "shots": []}\n{"video": "v1.mp4", "shots": [{"start": 2, "end": 1,')
  wrong_field = tmp_path / "wrong.jsonl"
  wrong_field.write_text('{"video": "v0.mp4", "shots": [{"start": 3, "end": 1, "caption": "x"}]}\n')
  videos = f"--videos={corpus['src']}/*.mp4"
  out = f"--out={tmp_path / 'out'}"
  cases = [
      ([f"--videos={tmp_path}/nothing/*.mp4", out], "no files match"),
      ([videos, f"--captions={bad_captions}", out], f"{bad_captions}:2: not valid JSON"),
      ([videos, f"--captions={wrong_field}", out], f"{wrong_field}:1: shots[0]: 'end' (1) must be after"),
      ([videos, f"--captions={tmp_path}/missing.jsonl", out], "--captions: cannot read"),
      ([videos, out, "--fps=-1"], "CurationConfig.fps must be a number > 0"),
      ([videos, out, "--fps=fast"], "flag --fps=fast"),
      ([videos, out, "--detector=transnetv2"], "unknown detector 'transnetv2'"),
      ([videos], "--out is required"),
      ([videos, out, "extra"], "unexpected arguments ['extra']"),
  ]
  for flags, message in cases:
    done = _curate_cli(*flags)
    assert done.returncode == 2, (flags, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], (flags, done.stderr[-2000:])
  verbose = _curate_cli(f"--videos={tmp_path}/nothing/*.mp4", out, "--verbose")
  assert verbose.returncode == 2 and "Traceback" in verbose.stderr
  assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_benchmark_runs():
  result = curate_benchmark.run(num_videos=1, height=64, width=64, source_fps=16)
  assert result["videos_per_s_per_core"] > 0 and result["shots"] >= 3


def test_parallel_workers_give_the_same_outputs_and_failures_are_reported(corpus, tmp_path):
  videos = pipeline.find_videos([str(corpus["src"] / "*")])
  captioner = captions_lib.JsonlCaptions(str(corpus["captions"]))
  pipeline.curate(videos, str(tmp_path / "par"), CONFIG, captioner, workers=2, progress=False)
  for name in ("manifest.jsonl", "rejected.jsonl", "summary.json"):
    assert (tmp_path / "par" / name).read_bytes() == (corpus["out"] / name).read_bytes(), name

  class Broken(captions_lib.TwoStageCaptioner):  # a backend that fails: reported for its video, the run goes on

    def caption(self, frames):
      raise RuntimeError("model exploded")

    def rewrite(self, caption, frames, previous_caption, previous_frames):
      return caption

  summary = pipeline.curate(videos[:3], str(tmp_path / "broken"), CONFIG, Broken(), progress=False)
  rejected = [json.loads(l) for l in (tmp_path / "broken" / "rejected.jsonl").read_text().splitlines()]
  failed = [r for r in rejected if r["reason"] == "failed"]
  assert summary["videos"] == 3 and failed and all(r["message"] == "RuntimeError: model exploded" for r in failed)
  for r in failed:  # not marked done: the next run tries it again
    record = json.loads((tmp_path / "broken" / "videos" / f"{pipeline.video_key(r['source'])}.json").read_text())
    assert record["fingerprint"] is None


def test_jsonl_captions_match_files_and_shots(tmp_path):
  (tmp_path / "sub").mkdir()
  lines = [
      {"video": "a.mp4", "shots": [{"start": 0, "end": 2, "caption": "one"}, {"start": 2, "end": 6, "caption": "two"}]},
      {"video": "sub/b.mp4", "shots": [{"start": 0.1, "end": 3.9, "caption": "whole"}]},
  ]
  path = tmp_path / "captions.jsonl"
  path.write_text("".join(json.dumps(l) + "\n" for l in lines) + "\n")
  jsonl = captions_lib.JsonlCaptions(str(path))
  a, b = str(tmp_path / "x" / "a.mp4"), str(tmp_path / "sub" / "b.mp4")
  jsonl.bind([a, b, str(tmp_path / "c.mp4")])
  # a few frames off still match; a caption over two detected shots (a false cut) matches neither
  assert jsonl.caption_shots([None] * 3, video=a, spans=[(0, 2.1), (2.1, 4.0), (4.0, 6.0)]) == ["one", None, None]
  assert jsonl.caption_shots([None], video=b, spans=[(0, 4)]) == ["whole"]
  assert jsonl.caption_shots([None], video=str(tmp_path / "c.mp4"), spans=[(0, 4)]) == [None]
  with pytest.raises(ValueError, match=r"captions.jsonl:1: video 'a.mp4' matches 2 input files"):
    jsonl.bind([a, str(tmp_path / "y" / "a.mp4")])
  path.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[0]) + "\n")
  with pytest.raises(ValueError, match=r"captions.jsonl:2: video 'a.mp4' already has captions on line 1"):
    captions_lib.JsonlCaptions(str(path))


def _tiny_vlm(path: str) -> None:
  """A tiny random LLaVA (CLIP vision tower, Llama text model, word-level tokenizer) with its processor, saved to
  ``path`` the way a downloaded model folder is."""
  import torch  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.models.clip import image_processing_pil_clip  # pylint: disable=g-import-not-at-top

  special = ["<s>", "</s>", "<pad>", "<image>"]
  words = "a the same man woman red blue walks sits in room street shot now and . USER: ASSISTANT:".split()
  vocab = {w: i for i, w in enumerate(special + ["[UNK]"] + words)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(special)
  tok.decoder = tokenizers.decoders.WordPiece()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="[UNK]"
  )
  chat = (
      "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}"
      "{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
  )
  images = image_processing_pil_clip.CLIPImageProcessorPil(
      size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
  )
  processor = transformers.LlavaProcessor(
      image_processor=images,
      tokenizer=tokenizer,
      patch_size=14,
      vision_feature_select_strategy="default",
      chat_template=chat,
      image_token="<image>",
      num_additional_image_tokens=1,
  )
  config = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(
          hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
      ),
      text_config=transformers.LlamaConfig(
          vocab_size=len(vocab),
          hidden_size=16,
          intermediate_size=32,
          num_hidden_layers=1,
          num_attention_heads=2,
          num_key_value_heads=1,
          bos_token_id=0,
          eos_token_id=1,
          pad_token_id=2,
      ),
      image_token_id=vocab["<image>"],
      vision_feature_layer=-1,
      vision_feature_select_strategy="default",
  )
  torch.manual_seed(0)
  transformers.LlavaForConditionalGeneration(config).save_pretrained(path)
  processor.save_pretrained(path)


def test_vlm_captioner_two_stage_with_a_tiny_random_model(corpus, tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from onestory_jax.data.curation import vlm  # pylint: disable=g-import-not-at-top

  model_dir = str(tmp_path / "tiny_vlm")
  _tiny_vlm(model_dir)
  prompts = []

  class Spy(vlm.VlmCaptioner):

    def generate(self, images, prompt):
      prompts.append((len(images), prompt))
      return super().generate(images, prompt)

  captioner = Spy(model_dir, max_new_tokens=6)
  record = pipeline.curate_video(corpus["truth"]["special"].path, CONFIG, captioner)
  assert record["units"] == [[2, 3], [7, 8]]
  texts = [record["shots"][i]["caption"] for u in record["units"] for i in u]
  assert all(isinstance(t, str) and t for t in texts), texts
  n = CONFIG.caption_frames
  assert [(k, p.startswith("The images are frames of one shot")) for k, p in prompts[:3]] == [
      (n, 1),
      (n, 1),
      (2 * n, 0),
  ]
  assert f'described as: "{texts[0]}"' in prompts[2][1]  # stage 2 sees the previous shot's caption
  plain = vlm.VlmCaptioner(model_dir)
  plain.generate(list(np.zeros((1, 32, 32, 3), np.uint8)), "describe the shot .")
  assert plain._model is not None and pickle.loads(pickle.dumps(plain))._model is None  # workers load their own

  out = tmp_path / "out"
  video = f"--videos={corpus['truth']['special'].path}"
  done = _curate_cli(video, f"--captioner={model_dir}", "--captioner_max_new_tokens=6", f"--out={out}", *FLAGS)
  assert done.returncode == 0, done.stderr[-3000:]
  manifest = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
  assert [[s["caption"] for s in line["shots"]] for line in manifest] == [texts[:2], texts[2:]]
  both = _curate_cli(video, f"--captioner={model_dir}", f"--captions={corpus['captions']}", f"--out={out}", *FLAGS)
  assert both.returncode == 2 and "not both" in both.stderr
  broken = tmp_path / "broken_vlm"  # a config and no weights
  broken.mkdir()
  (broken / "config.json").write_text((tmp_path / "tiny_vlm" / "config.json").read_text())
  done = _curate_cli(video, f"--captioner={broken}", f"--out={tmp_path / 'out2'}", *FLAGS)
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("--captioner: cannot load"), done.stderr
