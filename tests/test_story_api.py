"""The Python API (onestory_jax.pipeline) and `sample`'s --regenerate / --overwrite, on the shipped demo checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from onestory_jax import OneStoryPipeline
from onestory_jax import pipeline
from onestory_jax import sampler
from onestory_jax import video_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = [
    "a red round character moves left in a blue place, wide view.",
    "a new green square character moves right in a new yellow place, close view.",
    "the same second square character moves up in the yellow place from shot 2, wide view.",
]


@pytest.fixture(scope="module")
def pipe():
  return OneStoryPipeline.from_pretrained(steps=2)


def test_generate_next_shot_and_save(pipe, tmp_path):
  story = pipe.generate(CAPTIONS[:2], seed=4)
  assert len(story) == 2 and story.complete and story.captions == CAPTIONS[:2]
  shot = story.next_shot(CAPTIONS[2])
  assert shot.index == 2 and shot.seed == 6 and shot.frames.shape == (8, 32, 32, 3) and shot.frames.dtype == np.uint8
  assert [s.record["memory_frames"] for s in story.shots] == [0, 4, 8]
  assert all(s.record["seconds"] > 0 for s in story.shots)
  assert story.shots[2].record["selected"] and story.shots[0].record["selected"] == []
  out = story.save(str(tmp_path / "s"))
  names = set(os.listdir(out))
  assert {"shot_00.mp4", "shot_02.mp4", "story.mp4", "contact_sheet.png", "frames.npz", "latents.npz"} <= names
  m = json.loads(open(os.path.join(out, "manifest.json")).read())
  assert m["complete"] and [p["caption"] for p in m["plan"]] == CAPTIONS and m["sampler"]["steps"] == 2
  assert m["story_digest"] == pipeline.story_digest(CAPTIONS)
  for a, b in zip(video_io.load_frames_npz(os.path.join(out, "frames.npz")), story.frames):
    np.testing.assert_array_equal(a, b)
  # The same story seed gives the same shots, whether generated at once or shot by shot.
  again = pipe.story(seed=4)
  for c in CAPTIONS:
    again.next_shot(c)
  for a, b in zip(again.frames, story.frames):
    np.testing.assert_array_equal(a, b)


def test_regenerate_keeps_the_earlier_shots_and_redoes_the_later_ones(pipe):
  story = pipe.generate(CAPTIONS, seed=1)
  before = [s.frames.copy() for s in story.shots]
  story.regenerate(1, seed=99)
  assert story.shots[1].seed == 99 and len(story) == 3
  np.testing.assert_array_equal(story.shots[0].frames, before[0])  # bit-identical: never regenerated
  assert not np.array_equal(story.shots[1].frames, before[1])
  assert not np.array_equal(story.shots[2].frames, before[2])  # generated again from the new memory ...
  assert story.shots[2].seed == 3  # ... with its own seed: the story as if shot 1 had had seed 99 from the start
  fresh = pipe.story(seed=1)
  fresh.plan(CAPTIONS, seeds=[1, 99, 3])
  fresh.resume()
  for a, b in zip(story.frames, fresh.frames):
    np.testing.assert_array_equal(a, b)
  # Back to seed 2 (the story's own for shot 1): the original shots return exactly, the later one included.
  story.regenerate(1, seed=2)
  for a, b in zip(story.frames, before):
    np.testing.assert_array_equal(a, b)
  kept = story.shots[2].frames.copy()
  story.regenerate(1, caption=CAPTIONS[1].replace("yellow", "purple"), keep_later=True)
  assert "purple" in story.shots[1].caption and not np.array_equal(story.shots[1].frames, before[1])
  np.testing.assert_array_equal(story.shots[2].frames, kept)
  story.truncate(1)
  assert len(story) == 1 and story.pending == [] and story.complete
  with pytest.raises(ValueError, match=r"shot 5: the story has shots 0..0"):
    story.regenerate(5)
  with pytest.raises(ValueError, match="caption"):
    story.next_shot("  ")


def test_memory_none_and_start_image(pipe):
  with_memory = pipe.generate(CAPTIONS[:2], seed=0)
  without = pipe.generate(CAPTIONS[:2], seed=0, memory="none")
  np.testing.assert_array_equal(with_memory.frames[0], without.frames[0])
  assert not np.array_equal(with_memory.frames[1], without.frames[1])
  assert without.shots[1].record["memory_frames"] == 0
  image = np.zeros((32, 32, 3), np.uint8)
  image[:, :16] = (250, 20, 20)
  i2v = pipe.generate(CAPTIONS[:1], seed=0, start_image=image)
  assert not np.array_equal(i2v.frames[0], with_memory.frames[0])
  assert i2v.manifest["start_image"] == "<array>"
  with pytest.raises(ValueError, match=r"start_image must be uint8 \[32, 32, 3\]"):
    pipe.story(start_image=np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="memory must be one of"):
    pipe.story(memory="some")


def test_a_story_open_on_a_folder_survives_a_kill_between_its_writes(pipe, tmp_path, caplog):
  out = str(tmp_path / "story")
  story = pipe.generate(CAPTIONS, seed=2, out=out)
  with pytest.raises(ValueError, match="already exists"):
    pipe.story(out=out)
  # Killed after frames.npz and latents.npz of a regenerated shot 2 were written, before the manifest: shot 2's
  # latents no longer match the manifest's record.
  with np.load(os.path.join(out, "latents.npz")) as z:
    lat = {k: z[k] for k in z.files}
  lat["shot_2"] = lat["shot_2"] + 1.0
  np.savez(os.path.join(out, "latents.npz"), **lat)
  with caplog.at_level("WARNING"):
    reopened = pipe.open(out)
  assert len(reopened) == 2 and [p["caption"] for p in reopened.pending] == CAPTIONS[2:]
  assert any("continues from shot 2" in r.getMessage() for r in caplog.records)
  reopened.resume()
  for a, b in zip(reopened.frames, story.frames):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="sampler settings"):
    OneStoryPipeline(pipe.system, pipe.generator.params, pipe.generator.enc, steps=3).open(out)


def test_unknown_words_are_named(pipe, caplog):
  with caplog.at_level("WARNING"):
    pipe.generate(["a red fox trots through a snowy forest."], seed=0)
  (msg,) = [r.getMessage() for r in caplog.records if "vocabulary" in r.getMessage()]
  assert "'fox', 'trots', 'through', 'snowy', 'forest'" in msg and "onestory_jax.data.tokenizer" in msg


def test_memory_capacity_depends_only_on_the_memory():
  assert [sampler.memory_capacity(n, 4) for n in (0, 1, 4, 5, 8, 9, 17)] == [4, 4, 4, 8, 8, 16, 32]


def _sample(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "onestory_jax.sample", "--steps=2", *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )


def test_sample_regenerate_and_overwrite_on_the_command_line(pipe, tmp_path):
  story_file = tmp_path / "story.json"
  story_file.write_text(json.dumps({"seed": 5, "shots": [{"caption": c} for c in CAPTIONS[:2]]}))
  out = str(tmp_path / "out")
  done = _sample(f"--story={story_file}", f"--out={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  first = video_io.load_frames_npz(os.path.join(out, "frames.npz"))
  api = pipe.generate(CAPTIONS[:2], seed=5)  # the API and the command line make the same story
  for a, b in zip(first, api.frames):
    np.testing.assert_array_equal(a, b)
  refused = _sample(f"--story={story_file}", f"--out={out}")
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines()[-1].endswith("or --overwrite to replace it")
  new_caption = CAPTIONS[1].replace("yellow", "purple")
  done = _sample(f"--out={out}", "--regenerate=1", "--seed=9", f"--caption={new_caption}")
  assert done.returncode == 0, done.stderr[-3000:]
  second = video_io.load_frames_npz(os.path.join(out, "frames.npz"))
  np.testing.assert_array_equal(second[0], first[0])
  assert not np.array_equal(second[1], first[1])
  m = json.loads(open(os.path.join(out, "manifest.json")).read())
  assert m["shots"][1]["seed"] == 9 and m["shots"][1]["caption"] == new_caption and m["complete"]
  assert m["plan"][1] == {"caption": new_caption, "seed": 9}
  done = _sample(f"--story={story_file}", f"--out={out}", "--overwrite")
  assert done.returncode == 0, done.stderr[-3000:]
  for a, b in zip(video_io.load_frames_npz(os.path.join(out, "frames.npz")), first):
    np.testing.assert_array_equal(a, b)
  bad = _sample(f"--out={out}", "--regenerate=7")
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == "shot 7: the story has shots 0..1"
