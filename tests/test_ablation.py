"""The ablation command (onestory_jax/ablation.py): variants as config changes, trained, scored, tabled, resumed."""

import os

import numpy as np
import pytest

from onestory_jax import ablation
from onestory_jax import checkpoints
from onestory_jax import memory_strategies
from tests.helpers import load_config


def test_variants_are_config_changes_of_one_base():
  base = load_config("demo")
  rows = {v.name: ablation.variant_config(base, v, 10, 4, "INIT") for v in ablation.TABLES["2a"]}
  assert {r.num_train_steps for r in rows.values()} == {10} and {r.init_params for r in rows.values()} == {"INIT"}
  assert rows["last_frame"].selection.strategy == "last_frame" and rows["ac"].selection.strategy == "recent"
  assert rows["fs"].selection.strategy == "onestory" and rows["fs"].selection.k_sel == 1
  assert tuple(rows["fs"].conditioner.kernels) == ((1, 1, 1),)
  assert {r.conditioner.budget_frames for r in rows.values()} == {base.conditioner.budget_frames}
  plain = ablation.variant_config(base, ablation.TABLES["2b"][0], 10, 4, "INIT")
  assert plain.data.p_inflate == 0.0 and plain.warmup_fraction_dc == 0.0
  with pytest.raises(ValueError, match="has no field 'selection.nope'"):
    ablation.variant_config(base, ablation.Variant("x", "x", {"selection.nope": 1}), 1, 1, "")


def test_training_choices_are_positional():
  idx, valid = memory_strategies.training_choice("last_frame", 2, 4, 4)
  assert idx[valid].tolist() == [7]
  idx, valid = memory_strategies.training_choice("recent", 2, 4, 4)
  assert idx[valid].tolist() == [7, 6, 5, 4]
  assert memory_strategies.training_choice("onestory", 2, 4, 4) is None
  with pytest.raises(ValueError, match="'keyframes' chooses by the frames' content"):
    memory_strategies.training_choice("keyframes", 2, 4, 4)


def test_two_variants_train_score_and_table_then_resume(tmp_path, monkeypatch):
  base = load_config("tiny", **{"data.worker_count": 0, "log_every_steps": 1, "checkpoint_every_steps": 2})
  # The tiny model starts from scratch here (no export of its size ships).
  variants = [ablation.TABLES["fig6"][1], ablation.TABLES["fig6"][2]]  # most recent, Frame Selection
  scores = {}
  for v in variants:
    config = ablation.variant_config(base, v, 2, 8, "")
    scores[v.name] = ablation.train_and_score(v, config, str(tmp_path), ["recall"], 2, 100, sample_steps=1)
  rec = scores["recent"]["recall"]
  assert rec["memory"] == ["recent"] and scores["onestory"]["recall"]["memory"] == ["onestory"]
  assert len(rec["per_story"]["recent"]["character_consistency"]) == 2
  assert os.path.exists(tmp_path / "recent" / "export" / "step.txt")
  text = ablation.table(variants, scores, ["recall"])
  assert "| most recent | " in text and "| Frame Selection | " in text and "±" in text
  # A rerun reuses the training, the export and the scores.
  calls = []
  monkeypatch.setattr(checkpoints, "export_params", lambda *a, **k: calls.append(a))
  again = ablation.train_and_score(
      variants[0],
      ablation.variant_config(base, variants[0], 2, 8, ""),
      str(tmp_path),
      ["recall"],
      2,
      100,
      sample_steps=1,
  )
  assert calls == [] and again["recall"]["per_story"] == rec["per_story"]
  assert np.isfinite(rec["recent"]["character_consistency"])
