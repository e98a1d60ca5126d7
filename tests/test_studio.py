"""The studio (onestory_jax/studio.py): its session logic without a browser, then the page in headless Chromium.

The browser test drives the real page (Gradio, in this process, on 127.0.0.1) through Playwright with Debian's
Chromium (/usr/bin/chromium; Playwright's own browser download does not work here) and leaves a screenshot in
$TEST_ARTIFACTS_DIR (else the test's tmp_path).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from onestory_jax import pipeline as pipeline_lib
from onestory_jax import story as story_lib
from onestory_jax import studio as studio_lib
from tests import helpers

CAPTIONS = (
    "a red round character moves left in a blue place, wide view.",
    "the same first round character moves right in a new green place, close view.",
    "the same first round character moves left in the first blue place, wide view.",
)
EDITED = "the same first round character moves left in a new green place, wide view."
CHROMIUM = "/usr/bin/chromium"
STORIES = os.path.join(helpers.ROOT, "onestory_jax", "assets", "stories")
MEMORY_CAPTION = re.compile(r"^shot \d+ frame \d+ · score -?\d+\.\d\d · \d+x\d+x\d+$")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
  """The shipped demo with 2 sampler steps, shared by every test here (one compilation of its programs)."""
  pipe = pipeline_lib.OneStoryPipeline.from_pretrained(None, steps=2)
  return studio_lib.Studio(pipe, str(tmp_path_factory.mktemp("studio_root")))


_KEYS = iter(range(10**6))


@pytest.fixture
def session(studio):
  return studio.session(f"test{next(_KEYS)}")


def _files_of(folder):
  out = {}
  for dirpath, _, names in os.walk(folder):
    for n in names:
      p = os.path.join(dirpath, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, folder)] = f.read()
  return out


def test_generate_then_regenerate_the_second_shot(session):
  assert "Generated shot 0" in session.generate_next(CAPTIONS[0], "red round", "blue place")
  assert "Generated shot 1" in session.generate_next(CAPTIONS[1])
  first, second = session.shots[0].frames.copy(), session.shots[1].frames.copy()
  assert [e.caption for e in session.entries] == list(CAPTIONS[:2])

  assert "Regenerated shot 1" in session.regenerate(1, seed=7)
  shots = session.shots
  assert len(shots) == 2 and shots[1].seed == 7
  np.testing.assert_array_equal(shots[0].frames, first)  # bit-identical: shot 0 is not touched
  assert not np.array_equal(shots[1].frames, second)

  # The selected shot's view: its video and the memory that produced it.
  view = session.shot_view(1)
  assert os.path.isfile(view.video) and view.caption == CAPTIONS[1] and view.seed == 7
  selected = shots[1].record["selected"]
  assert len(view.memory) == len(selected) > 0
  for (path, caption), sel in zip(view.memory, selected):
    assert os.path.isfile(path) and MEMORY_CAPTION.match(caption), caption
    assert caption.startswith(f"shot {sel['shot']} frame {sel['latent_frame_in_shot']} · score {sel['score']:.2f}")
  assert "| rank | shot | latent frame | pixel frames | score | patchifier |" in view.details
  assert session.shot_view(0).memory == []  # the first shot has no memory

  # The downloads: the story file and the current version's video, contact sheet and manifest.
  names = [os.path.basename(p) for p in session.files()]
  assert names == ["story.json", "story.mp4", "contact_sheet.png", "manifest.json"]
  manifest = json.load(open(os.path.join(session.version_dir, "manifest.json")))
  assert [s["seed"] for s in manifest["shots"]] == [0, 7]
  story = story_lib.load_story(session.story_path)
  assert story.captions == list(CAPTIONS[:2]) and story.raw["shots"][1]["seed"] == 7
  assert story.raw["characters"] == [{"id": 0, "name": "red round"}] and story.shots[0].characters == (0,)
  assert story.raw["environments"] == [{"id": 0, "name": "blue place"}] and story.shots[0].environment == 0
  assert session.table()[1] == [1, "generated", CAPTIONS[1], "", "", "7"]


def test_bad_inputs_give_messages_and_keep_the_story(session, tmp_path):
  session.generate_next(CAPTIONS[0])
  before = _files_of(session.folder)
  frames = session.shots[0].frames.copy()
  entries = [dict(e.__dict__) for e in session.entries]

  text = tmp_path / "not_an_image.png"
  text.write_text("hello")
  bad_json = tmp_path / "bad.json"
  bad_json.write_text('{"shots": [{"caption": "a red round character"},]}')
  no_shots = tmp_path / "no_shots.json"
  no_shots.write_text('{"shots": []}')
  bad_cases = [
      (lambda: session.generate_next(""), "caption of the next shot is empty"),
      (lambda: session.generate_next("   ", "red round"), "caption of the next shot is empty"),
      (lambda: session.add_shot(""), "caption of the next shot is empty"),
      (lambda: session.set_start_image(str(text)), "not_an_image.png is not an image that can be read"),
      (lambda: session.set_start_image(str(tmp_path / "missing.png")), "no such image file"),
      (lambda: session.load_story(str(bad_json)), r"bad.json: not a story file \(JSONDecodeError"),
      (lambda: session.load_story(str(no_shots)), "'shots' must be a non-empty list"),
      (lambda: session.regenerate(3), r"select a generated shot to regenerate \(the story has shots 0..0\)"),
      (lambda: session.regenerate(0, caption=" "), "the caption of shot 0 is empty"),
      (lambda: session.regenerate(0, seed="x"), "shot 0's seed must be an integer"),
      (lambda: session.continue_from(None), "select the shot to continue from"),
      (lambda: session.set_plan([]), "the table has 0 shots but 1 are generated"),
      (lambda: session.set_plan([[0, "", "", "red round", "", ""]]), r"caption of shot 0 \(table row 1\) is empty"),
      (lambda: session.set_plan([[0, "", CAPTIONS[0], "", "", "1.5"]]), "shot 0's seed must be an integer"),
      (lambda: session.set_settings(steps=0), "steps must be an integer >= 1"),
      (lambda: session.set_settings(guidance=float("nan")), "guidance must be a finite number"),
      (lambda: session.set_settings(memory="some"), "memory must be one of"),
  ]
  for action, message in bad_cases:
    with pytest.raises(ValueError, match=message):
      action()
    assert len(session.shots) == 1 and session.start_image is None
    np.testing.assert_array_equal(session.shots[0].frames, frames)
    assert [dict(e.__dict__) for e in session.entries] == entries
    assert (session.seed, session.memory, session.steps) == (0, "onestory", 2)
  assert _files_of(session.folder) == before  # nothing on disk changed either


def test_sessions_write_to_separate_folders(studio):
  a, b = studio.session("tab-a"), studio.session("tab-b")
  assert studio.session("tab-a") is a and a.folder != b.folder
  assert os.path.dirname(a.folder) == os.path.dirname(b.folder) == studio.root
  plans = {a: CAPTIONS[:2], b: CAPTIONS[1:]}
  errors = []

  def write(s):  # two tabs at once: the model lock serializes their generations
    try:
      for c in plans[s]:
        s.generate_next(c)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=write, args=(s,)) for s in (a, b)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  ref = studio.session("tab-ref")  # the same story written alone
  for c in CAPTIONS[1:]:
    ref.generate_next(c)
  for s, captions in plans.items():
    assert s.version_dir.startswith(s.folder + os.sep)
    manifest = json.load(open(os.path.join(s.version_dir, "manifest.json")))
    assert [r["caption"] for r in manifest["shots"]] == list(captions)
    assert story_lib.load_story(s.story_path).captions == list(captions)
  for x, y in zip(b.shots, ref.shots):
    np.testing.assert_array_equal(x.frames, y.frames)
  studio.forget("tab-a")
  assert studio.session("tab-a") is not a and os.path.isdir(a.folder)  # a closed tab's files stay


def test_continue_from_here_and_plan_edits(session):
  session.set_plan([[None, None, c, "", "", ""] for c in CAPTIONS] + [["", "", "", "", "", ""]])
  assert [r[1] for r in session.table()] == ["planned"] * 3
  session.generate_next()
  session.generate_next()
  msg = session.continue_from(1)  # generates the rest of the plan
  assert "generated shots 2..2" in msg and len(session.shots) == 3
  frames = [s.frames.copy() for s in session.shots]

  # Continue from shot 0 with the plan unchanged: the same shots again, bit for bit.
  session.continue_from(0)
  for s, f in zip(session.shots, frames):
    np.testing.assert_array_equal(s.frames, f)

  # An edited caption shows as such until its shot is generated again.
  rows = session.table()
  rows[2][2] = CAPTIONS[0]
  session.set_plan(rows)
  assert [r[1] for r in session.table()] == ["generated", "generated", "edited"]
  session.continue_from(1)
  assert [r[1] for r in session.table()] == ["generated"] * 3 and session.shots[2].caption == CAPTIONS[0]
  np.testing.assert_array_equal(session.shots[1].frames, frames[1])

  # Keep later: shot 2 stays as it is, with the memory thumbnails of the shots it was made from.
  later = session.shots[2].frames.copy()
  thumbs = session.shot_view(2).memory
  assert "later shots kept" in session.regenerate(1, seed=11, keep_later=True)
  np.testing.assert_array_equal(session.shots[2].frames, later)
  assert session.shot_view(2).memory == thumbs
  assert session.table()[2][1] == "generated"

  # Continue from the last shot: nothing more is planned, the user types the next caption.
  assert "nothing more is planned" in session.continue_from(2)
  msg = session.continue_from(0)
  assert "generated shots 1..2" in msg and session.shots[1].seed == 11


def test_regenerate_fields_and_edited_rows(session):
  """The page's Caption / Seed fields show the selected shot's own: unchanged, the plan's row applies."""
  session.generate_next(CAPTIONS[0])
  session.generate_next(CAPTIONS[1])
  rows = session.table()
  rows[1][2], rows[1][5] = EDITED, "5"
  session.set_plan(rows)
  assert session.table()[1][1] == "edited"
  shot = session.shots[1]
  session.regenerate_with_fields(1, shot.caption, float(shot.seed))  # the fields as the page shows them
  assert (session.shots[1].caption, session.shots[1].seed) == (EDITED, 5)
  session.regenerate_with_fields(1, CAPTIONS[2], 9)  # typed into the fields
  assert (session.shots[1].caption, session.shots[1].seed) == (CAPTIONS[2], 9)
  assert session.table()[1][1:] == ["generated", CAPTIONS[2], "", "", "9"]
  with pytest.raises(ValueError, match="caption of shot 1 is empty"):
    session.regenerate_with_fields(1, "", 9)


def test_new_settings_take_effect_on_regenerate(session):
  session.generate_next(CAPTIONS[0])
  session.generate_next(CAPTIONS[1])
  first_dir, shots = session.version_dir, [s.frames.copy() for s in session.shots]
  session.set_settings(memory="none")
  assert "keeps the settings it started with" in session.generate_next(CAPTIONS[2])  # a story has one setting
  assert session.run.memory == "onestory" and session.version_dir == first_dir

  msg = session.regenerate(1)
  assert "re-sampled shots 0..2" in msg and session.run.memory == "none"
  assert os.path.basename(session.version_dir) == "story-02" and os.path.isdir(first_dir)
  np.testing.assert_array_equal(session.shots[0].frames, shots[0])  # same caption, seed, settings: same shot
  assert all(s.record["selected"] == [] for s in session.shots)  # memory none
  assert json.load(open(os.path.join(first_dir, "manifest.json")))["memory"] == "onestory"  # the old version stays

  # A start image (I2MSV) is a story setting too: it comes in when shot 0 is regenerated.
  assert "applies when shot 0 is regenerated" in session.set_start_image(os.path.join(STORIES, "recall_start.png"))
  assert session.run.start_image is None
  session.set_settings(memory="full")  # the old name of onestory
  assert "re-sampled shots 0..2" in session.regenerate(0)
  assert os.path.basename(session.version_dir) == "story-03" and session.run.start_image is not None
  assert os.path.isfile(os.path.join(session.version_dir, "start_image.png"))
  assert not np.array_equal(session.shots[0].frames, shots[0])
  assert session.start_image_view().shape == (128, 128, 3)


def test_pipelines_per_setting_share_the_model(studio):
  base = studio.pipe
  p = studio.pipeline(3, 2.0)
  assert p is studio.pipeline(3, 2.0) and p is not base
  assert p.settings == {
      "steps": 3,
      "shift": base.settings["shift"],
      "guidance": 2.0,
      "memory_guidance": base.settings["memory_guidance"],
  }
  assert (
      p.system is base.system and p.generator.params is base.generator.params and p.generator.enc is base.generator.enc
  )
  assert studio.pipeline(2, base.settings["guidance"]) is base
  for steps in range(4, 4 + studio.MAX_PIPELINES):
    studio.pipeline(steps, 2.0)
  assert studio.pipeline(2, base.settings["guidance"]) is base  # the loaded one is never dropped
  with pytest.raises(ValueError, match="guidance"):
    studio.pipeline(2, float("inf"))


def test_story_files_load_and_save(studio, tmp_path):
  s = studio.session("files")
  src = json.load(open(os.path.join(STORIES, "recall_i2v.json")))
  msg = s.load_story(os.path.join(STORIES, "recall_i2v.json"))  # a StoryWorld story with a start image
  assert f"Loaded recall_i2v.json: {len(src['shots'])} shots planned" in msg
  assert s.seed == src["seed"] and s.start_image is not None and s.start_image.shape == (32, 32, 3)
  assert s.entries[0].characters == "purple round" and s.entries[0].environment == "blue vertical"
  assert s.entries[0].extra["action"] == "right"
  obj = s.story_object()
  for key in ("pattern", "height", "width", "characters", "environments"):
    assert obj[key] == src[key], key  # what the studio does not edit is kept as it was
  assert [x["characters"] for x in obj["shots"]] == [x["characters"] for x in src["shots"]]
  assert [x["environment"] for x in obj["shots"]] == [x["environment"] for x in src["shots"]]
  assert obj["start_image"] == studio_lib.STORY_IMAGE

  # The page's free text: new names join the tables with new ids; the file stays a valid story file.
  s.add_shot(CAPTIONS[1], characters="purple round, grey owl", environment="snowy forest")
  saved = story_lib.load_story(s.write_story_file())
  last = saved.raw["shots"][-1]
  owl = next(c for c in saved.raw["characters"] if c.get("name") == "grey owl")
  assert last["characters"] == [0, owl["id"]] and owl["id"] == len(src["characters"])
  assert saved.raw["environments"][last["environment"]]["name"] == "snowy forest"
  assert saved.start_image == os.path.join(s.folder, studio_lib.STORY_IMAGE)

  # Saved and loaded again, in another session: the same plan.
  t = studio.session("files-2")
  copy = tmp_path / "copy"
  shutil.copytree(s.folder, copy)
  t.load_story(str(copy / "story.json"))
  assert [dict(e.__dict__) for e in t.entries] == [dict(e.__dict__) for e in s.entries]
  np.testing.assert_array_equal(t.start_image, s.start_image)

  # A story file whose start image is not next to it (an upload) loads without it, and says so.
  lone = tmp_path / "lone.json"
  shutil.copy(os.path.join(STORIES, "recall_i2v.json"), lone)
  u = studio.session("files-3")
  assert "upload it as the start image" in u.load_story(str(lone)) and u.start_image is None


def test_command_line_rejects_bad_flags():
  for flag, message in (("--steps=0", "--steps must be an integer >= 1"), ("--port=0", "--port must be in")):
    r = subprocess.run(
        [sys.executable, "-m", "onestory_jax.studio", flag],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=helpers.ROOT,
    )
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _screenshot(page, tmp_path) -> str:
  """A full-page screenshot, palette PNG (small), to $TEST_ARTIFACTS_DIR or tmp_path."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  out = os.environ.get("TEST_ARTIFACTS_DIR") or str(tmp_path)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "studio.png")
  raw = str(tmp_path / "studio_raw.png")
  page.screenshot(path=raw, full_page=True)
  with Image.open(raw) as im:
    im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
  print(f"studio screenshot: {path}")
  return path


def test_browser_two_shots_regenerate(studio, tmp_path):
  if not os.path.exists(CHROMIUM):
    pytest.fail(
        f"{CHROMIUM} is missing: the studio's browser test drives Debian's Chromium through Playwright. Install it "
        "with `apt-get update && apt-get install -y chromium` (Playwright's own browser download does not work here)."
    )
  from playwright.sync_api import expect  # pylint: disable=g-import-not-at-top
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  port = _free_port()
  before = set(os.listdir(studio.root))
  demo = studio_lib.launch(studio, port, block=False)
  try:
    with sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
      try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        status = page.locator("#status")

        for i, caption in enumerate(CAPTIONS[:2]):
          page.get_by_label("Next shot caption").fill(caption)
          page.locator("#next-characters textarea").fill("red round")
          page.locator("#next-environment textarea").fill(["blue place", "green place"][i])
          page.get_by_role("button", name="Generate next shot").click()
          expect(status).to_contain_text(f"Generated shot {i}", timeout=60_000)
        expect(page.locator("#shots")).to_contain_text(CAPTIONS[1])

        # Edit the second shot's caption in the table (double-click the cell, type, Enter): the row is the plan,
        # and Regenerate takes the edited caption with a new seed.
        cell = page.locator("#shots [data-testid=cell-1-2]")
        cell.dblclick()
        editor = cell.locator("input, textarea")  # the cell's editor, once the double-click has opened it
        expect(editor).to_be_focused(timeout=10_000)  # under load it opens late: keys sent before went elsewhere
        editor.fill(EDITED)
        page.keyboard.press("Enter")
        expect(status).to_contain_text("Plan updated", timeout=30_000)
        old_video = page.locator("#shot-video video").get_attribute("src")
        page.locator("#regen-seed input").fill("7")
        page.get_by_role("button", name="Regenerate this shot").click()
        expect(status).to_contain_text("Regenerated shot 1", timeout=60_000)

        expect(page.locator("#details")).to_contain_text("Shot 1 · seed 7")
        expect(page.locator("#regen-caption textarea")).to_have_value(EDITED)
        expect(page.locator("#shots [data-testid=cell-1-2]")).to_contain_text(EDITED)
        expect(page.locator("#shots [data-testid=cell-1-1]")).to_contain_text("generated")

        # The selected shot's video (a new one) and the story's; the memory thumbnails with their captions.
        expect(page.locator("#shot-video video")).to_have_count(1)
        expect(page.locator("#shot-video video")).not_to_have_attribute("src", old_video or "")
        expect(page.locator("#story-video video")).to_have_count(1)
        thumbs = page.locator("#memory-gallery img")
        expect(thumbs.first).to_be_visible()
        selected = _selected_memory(studio, before)
        assert thumbs.count() == len(selected) > 0
        expect(page.locator("#memory-gallery")).to_contain_text(
            f"shot 0 frame {selected[0]['latent_frame_in_shot']} · score {selected[0]['score']:.2f} · "
            + "x".join(map(str, selected[0]["patchifier"]))
        )
        expect(page.locator("#details")).to_contain_text("patchifier")
        links = page.locator("#downloads a")
        expect(links).to_have_count(4)
        hrefs = [links.nth(i).get_attribute("href") for i in range(4)]
        assert [h.rsplit("/", 1)[-1] for h in hrefs] == [
            "story.json",
            "story.mp4",
            "contact_sheet.png",
            "manifest.json",
        ]
        page.wait_for_function(  # the shot's video has loaded, so the screenshot shows it
            "() => [...document.querySelectorAll('video')].every(v => v.readyState >= 2)", timeout=15_000
        )
        _screenshot(page, tmp_path)

        # Clicking a row of the shot table selects that shot: shot 0 had no memory.
        page.locator("#shots").get_by_text(CAPTIONS[0]).click()
        expect(page.locator("#details")).to_contain_text("No memory: the first shot.")
        expect(page.locator("#regen-caption textarea")).to_have_value(CAPTIONS[0])

        # Bad input: a message in the page, nothing else happens.
        page.get_by_role("button", name="Generate next shot").click()
        expect(status).to_contain_text("the caption of the next shot is empty", timeout=30_000)

        # A story file that does not parse: a message in the page, the story stays.
        bad = tmp_path / "bad_story.json"
        bad.write_text('{"shots": [')
        page.locator("#story-file input[type=file]").set_input_files(str(bad))
        expect(status).to_contain_text("bad_story.json: not a story file", timeout=30_000)
        expect(page.locator("#shots")).to_contain_text(EDITED)
        expect(page.locator("#shot-video video")).to_have_count(1)

        # A second tab: its own story in its own folder; the first tab's story is untouched.
        other = browser.new_page()
        other.goto(f"http://127.0.0.1:{port}/")
        other.get_by_label("Next shot caption").fill(CAPTIONS[2])
        other.get_by_role("button", name="Generate next shot").click()
        expect(other.locator("#status")).to_contain_text("Generated shot 0", timeout=60_000)
      finally:
        browser.close()
  finally:
    demo.close()
  folders = sorted(set(os.listdir(studio.root)) - before)
  stories = [story_lib.load_story(os.path.join(studio.root, f, "story.json")).captions for f in folders]
  assert sorted(stories) == sorted([[CAPTIONS[0], EDITED], [CAPTIONS[2]]])
  first = story_lib.load_story(os.path.join(studio.root, folders[stories.index([CAPTIONS[0], EDITED])], "story.json"))
  assert first.raw["characters"] == [{"id": 0, "name": "red round"}] and first.shots[1].characters == (0,)
  assert [e["name"] for e in first.raw["environments"]] == ["blue place", "green place"]
  seconds = time.perf_counter() - start
  print(f"browser test: {seconds:.1f} s")


def _selected_memory(studio, before):
  """Frame Selection's choice for the browser session's selected shot (read on the server side)."""
  (folder,) = sorted(set(os.listdir(studio.root)) - before)
  (s,) = [s for s in studio.sessions() if os.path.basename(s.folder) == folder]
  return s.shots[s.selected].record["selected"]
