"""The quality study's driver runs end to end on the tiny config (so it cannot rot)."""

import json
import os
import shutil

from benchmarks import quality

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_quality_driver_on_tiny(tmp_path):
  for name in ("harbour_town.txt", "village_days.jsonl"):
    shutil.copy(os.path.join(FIXTURES, name), tmp_path / name)
  out = tmp_path / "out"
  summary = quality.main([
      "--config", os.path.join(quality.REPO, "configs", "tiny.py"),
      "--workdir", str(tmp_path / "runs"), "--out", str(out),
      "--steps", "6", "--batch", "8", "--seq_len", "32", "--warmup", "2", "--merge_interval", "3",
      "--eval_every", "3", "--eval_batches", "2", "--spectrum_every", "3", "--log_every", "3",
      "--poetx_grid", "3e-3:8e-3", "--adamw_grid", "3e-3", "--parallel", "2",
      "--override", f"data.files={tmp_path}/*.txt,{tmp_path}/*.jsonl",
      "--override", f"data.cache_dir={tmp_path}/cache", "--override", "data.vocab_size=300",
      "--override", "data.eval_split=train", "--override", "poet.block_size=32",
      # Scanned, as the LLaMA configs are: the spectrum's default layer paths name unscanned blocks.
      "--override", "model.scan_layers=True",
  ])
  written = json.loads((out / "quality.json").read_text())
  assert written["tokens"] == 6 * 8 * 32
  for method in ("poetx", "adamw"):
    assert written[method]["best_val_ppl"] > 1, written[method]
  assert len(written["runs"]) == 2 and all(r["returncode"] == 0 for r in written["runs"])
  assert all(len(r["val_curve"]) == 2 and r["spectrum"] for r in written["runs"])
  for run in written["runs"]:  # every spectrum record holds the layers' values, not only its step
    assert all(sorted(k for k in record if k != "step") == ["sigma_max/blocks_0/attention/q_proj",
                                                            "sigma_max/blocks_0/mlp/down_proj"]
               for record in run["spectrum"]), run["spectrum"]
  assert (out / "quality_val_ppl.png").stat().st_size > 0 and (out / "quality_spectrum.png").stat().st_size > 0
  assert summary["poetx"]["run"] == "poetx_lr0.003_poet0.008"
