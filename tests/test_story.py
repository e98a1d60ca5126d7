"""Tests for onestory_jax/story.py: story files and start images."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from onestory_jax import story as story_lib


def _write(directory, obj, name="story.json"):
  path = directory / name
  path.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=2))
  return path


def _image(path, w, h):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
  return path


def test_valid_story_keeps_extra_keys(tmp_path):
  (tmp_path / "img").mkdir()
  _image(tmp_path / "img" / "start.png", 8, 8)
  obj = {
      "pattern": "recall",
      "characters": [{"id": 0, "name": "fox"}],
      "environments": [{"id": 2, "name": "forest"}],
      "seed": 7,
      "start_image": "img/start.png",
      "shots": [
          {
              "caption": "  A fox in a forest. ",
              "characters": [0],
              "environment": 2,
              "action": "walks",
              "framing": "wide",
          },
          {"caption": "A river."},
          {"caption": "The fox again.", "characters": [], "environment": None},
      ],
  }
  path = _write(tmp_path, obj)
  story = story_lib.load_story(path, max_shots=3)
  assert len(story.shots) == 3
  assert story.captions == ["A fox in a forest.", "A river.", "The fox again."]
  first = story.shots[0]
  assert first.characters == (0,) and first.environment == 2
  assert first.extra == {"action": "walks", "framing": "wide"}
  assert story.shots[1].characters is None and story.shots[1].environment is None
  assert story.shots[2].characters == () and story.shots[2].environment is None
  assert story.seed == 7
  assert story.start_image == str(tmp_path / "img" / "start.png")
  assert story.raw["pattern"] == "recall" and story.raw["environments"][0]["name"] == "forest"


def test_start_image_resolved_relative_to_story_dir(tmp_path, monkeypatch):
  sub = tmp_path / "stories"
  sub.mkdir()
  _image(sub / "frame.png", 4, 4)
  _write(sub, {"shots": [{"caption": "x"}], "start_image": "frame.png"})
  monkeypatch.chdir(tmp_path)  # the working directory does not matter
  story = story_lib.load_story(os.path.join("stories", "story.json"))
  assert story.start_image == str(sub / "frame.png")
  assert os.path.isabs(story.start_image)
  # An absolute path is kept as is; no start image and no seed give None.
  abs_story = story_lib.load_story(
      _write(tmp_path, {"shots": [{"caption": "x"}], "start_image": str(sub / "frame.png")})
  )
  assert abs_story.start_image == str(sub / "frame.png")
  plain = story_lib.load_story(_write(tmp_path, {"shots": [{"caption": "x"}]}, "plain.json"))
  assert plain.start_image is None and plain.seed is None


@pytest.mark.parametrize(
    "obj, message",
    [
        ([1, 2], r"the top level must be a JSON object with 'shots', got list"),
        ({}, r"'shots' must be a non-empty list, got null"),
        ({"shots": []}, r"'shots' must be a non-empty list, got \[\]"),
        ({"shots": "abc"}, r"'shots' must be a non-empty list, got 'abc'"),
        (
            {"shots": [{"caption": "a"}, {"caption": "b"}, {"caption": 5}]},
            r"story.json: shots\[2\].caption must be a non-empty string, got 5$",
        ),
        ({"shots": [{"caption": "   "}]}, r"shots\[0\].caption must be a non-empty string, got '   '"),
        ({"shots": [{"text": "a"}]}, r"shots\[0\] has no 'caption'"),
        ({"shots": ["a"]}, r"shots\[0\] must be an object with a 'caption', got str"),
        (
            {"shots": [{"caption": "a", "characters": [0, "b"]}]},
            r"shots\[0\].characters must be a list of non-negative ints, got \[0, \"b\"\]",
        ),
        ({"shots": [{"caption": "a", "characters": 3}]}, r"shots\[0\].characters must be a list"),
        ({"shots": [{"caption": "a", "characters": [True]}]}, r"shots\[0\].characters must be a list"),
        (
            {"shots": [{"caption": "a", "environment": "forest"}]},
            r"shots\[0\].environment must be a non-negative int, got 'forest'",
        ),
        ({"shots": [{"caption": "a"}], "seed": "7"}, r"seed must be an int, got '7'"),
        ({"shots": [{"caption": "a"}], "seed": 1.5}, r"seed must be an int, got 1.5"),
        ({"shots": [{"caption": "a"}], "start_image": 3}, r"start_image must be a non-empty string"),
        (
            {"shots": [{"caption": "a"}], "start_image": "missing.png"},
            r"start_image file not found: 'missing.png' \(resolved to .*missing.png\)",
        ),
        ({"shots": [{"caption": "a"}] * 4}, r"'shots' has 4 shots, more than max_shots = 3"),
    ],
)
def test_validation_errors_name_file_and_field(tmp_path, obj, message):
  path = _write(tmp_path, obj)
  with pytest.raises(ValueError, match=message) as info:
    story_lib.load_story(path, max_shots=3)
  assert str(info.value).startswith(f"{path}: ")


def test_invalid_json_reports_line_and_column(tmp_path):
  path = _write(tmp_path, '{\n  "shots": [\n    {"caption": "a"}\n    {"caption": "b"}\n  ]\n}')
  with pytest.raises(ValueError, match=r"story.json: invalid JSON at line 4, column 5: " r"Expecting ',' delimiter"):
    story_lib.load_story(path)


def test_missing_and_non_utf8_story_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope.json: story file not found"):
    story_lib.load_story(tmp_path / "nope.json")
  path = tmp_path / "latin1.json"
  path.write_bytes(b'{"shots": [{"caption": "caf\xe9"}]}')
  with pytest.raises(ValueError, match=r"latin1.json: story file is not UTF-8"):
    story_lib.load_story(path)


def test_load_image_same_size_is_exact(tmp_path):
  rgba = np.random.default_rng(1).integers(0, 256, (6, 10, 4), dtype=np.uint8)
  Image.fromarray(rgba).save(tmp_path / "a.png")
  image = story_lib.load_image(tmp_path / "a.png", 6, 10)
  assert image.shape == (6, 10, 3) and image.dtype == np.uint8
  expected = np.asarray(Image.fromarray(rgba).convert("RGB"))
  np.testing.assert_array_equal(image, expected)


def test_load_image_crops_and_resizes(tmp_path):
  # A 40x20 image whose left and right quarters are red and whose middle is blue:
  # centre-cropping to a square keeps only blue.
  pixels = np.zeros((20, 40, 3), np.uint8)
  pixels[:, :10] = (255, 0, 0)
  pixels[:, 30:] = (255, 0, 0)
  pixels[:, 10:30] = (0, 0, 255)
  Image.fromarray(pixels).save(tmp_path / "wide.png")
  image = story_lib.load_image(tmp_path / "wide.png", 8, 8)
  assert image.shape == (8, 8, 3)
  assert (image[..., 2] > 240).all() and (image[..., 0] < 15).all()


def test_load_image_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no such image file: .*none.png"):
    story_lib.load_image(tmp_path / "none.png", 8, 8)
  (tmp_path / "text.png").write_text("not an image")
  with pytest.raises(ValueError, match=r"cannot read .*text.png as an image"):
    story_lib.load_image(tmp_path / "text.png", 8, 8)
  _image(tmp_path / "ok.png", 4, 4)
  with pytest.raises(ValueError, match=r"height must be a positive int, got 0"):
    story_lib.load_image(tmp_path / "ok.png", 0, 8)


# ----------------------------------------------------------------------------- StoryMem's ST-Bench scripts

ST_BENCH = {
    "story_overview": "A round character looks for its friend.",
    "scenes": [
        {
            "scene_num": 1,
            "cut": ["True", "False"],
            "video_prompts": [
                "a red round character moves left in a blue place, wide view.",
                "the same first round character moves right in the blue place from shot 1, close view.",
            ],
        },
        {"scene_num": 2, "cut": [True], "video_prompts": ["a new green square character moves up in a new red place."]},
    ],
}


def test_st_bench_scripts_load_and_round_trip(tmp_path):
  path = tmp_path / "script.json"
  path.write_text(json.dumps(ST_BENCH))
  story = story_lib.load_story(str(path))
  assert story.captions == [p for s in ST_BENCH["scenes"] for p in s["video_prompts"]]
  assert [(s.extra["scene"], s.extra["cut"]) for s in story.shots] == [(1, True), (1, False), (2, True)]
  assert story.raw["story_overview"] == ST_BENCH["story_overview"]
  back = story_lib.to_st_bench(story)
  assert back == {
      "story_overview": ST_BENCH["story_overview"],
      "scenes": [
          {"scene_num": 1, "cut": [True, False], "video_prompts": ST_BENCH["scenes"][0]["video_prompts"]},
          {"scene_num": 2, "cut": [True], "video_prompts": ST_BENCH["scenes"][1]["video_prompts"]},
      ],
  }
  # A story of this project's format without scene numbers is one scene that starts with a cut.
  plain = story_lib.parse_story({"shots": [{"caption": "a."}, {"caption": "b."}]})
  assert story_lib.to_st_bench(plain)["scenes"] == [
      {"scene_num": 1, "cut": [True, False], "video_prompts": ["a.", "b."]}
  ]
  bad = dict(ST_BENCH, scenes=[{"scene_num": 1, "cut": ["maybe"], "video_prompts": ["a."]}])
  path.write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"script\.json: scenes\[0\]\.cut\[0\] must be true/false"):
    story_lib.load_story(str(path))
  path.write_text(json.dumps(dict(ST_BENCH, scenes=[{"scene_num": 1, "cut": [True, False], "video_prompts": ["a."]}])))
  with pytest.raises(ValueError, match=r"scenes\[0\]\.cut has 2 entries for 1 video_prompts"):
    story_lib.load_story(str(path))


def test_story_conversion_command(tmp_path):
  src = tmp_path / "script.json"
  src.write_text(json.dumps(ST_BENCH))
  out = tmp_path / "story.json"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
      [sys.executable, "-m", "onestory_jax.story", f"--story={src}", f"--out={out}"],
      cwd=root,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 0, done.stderr
  assert [s["caption"] for s in json.loads(out.read_text())["shots"]][0] == ST_BENCH["scenes"][0]["video_prompts"][0]
  back = tmp_path / "back.json"
  done = subprocess.run(
      [sys.executable, "-m", "onestory_jax.story", f"--story={out}", f"--out={back}", "--format=st_bench"],
      cwd=root,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 0, done.stderr
  assert json.loads(back.read_text())["scenes"][1]["video_prompts"] == ST_BENCH["scenes"][1]["video_prompts"]
