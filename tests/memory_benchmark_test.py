"""benchmarks/memory.py: the child's record, the parent's merging, crashes and timeouts.

The child runs in this process on a tiny config (the CPU keeps no memory statistics, so
its peak is None); the parent runs with fake children where the output is what is
tested, and with real ones where the failure is.
"""

import json
import os

import pytest

from benchmarks import memory

KEYS = {"model": str, "seq_len": int, "method": str, "batch": int, "peak_gb": type(None), "need_gb": float,
        "tokens_per_s": float, "fits": bool, "device": str}


# What tiny (widths 128 and 256) needs beyond a method's LLaMA settings.
TINY_EXTRA = {"poetx_xq": ["poet.quant_group_size=64"]}  # the default group, 256, does not divide 128


def _records(stdout: str) -> list[dict]:
  return [json.loads(line[len("RECORD "):]) for line in stdout.splitlines() if line.startswith("RECORD ")]


@pytest.mark.parametrize("method", list(memory.METHODS))
def test_child_prints_one_record_with_the_documented_fields(method, capsys, monkeypatch):
  monkeypatch.setitem(memory.METHODS, method, memory.METHODS[method] + TINY_EXTRA.get(method, []))
  memory.main(["--cell", f"tiny:64:{method}", "--steps", "2"])
  (record,) = _records(capsys.readouterr().out)
  assert set(record) == set(KEYS)
  for key, kind in KEYS.items():
    assert type(record[key]) is kind, (key, record[key])
  assert (record["model"], record["seq_len"], record["method"], record["batch"]) == ("tiny", 64, method, 1)
  assert record["need_gb"] > 0 and record["tokens_per_s"] > 0 and record["fits"]


def test_compile_only_records_the_need_of_the_same_step_without_running_it(capsys, monkeypatch):
  monkeypatch.setitem(memory.METHODS, "poetx_xq", memory.METHODS["poetx_xq"] + TINY_EXTRA["poetx_xq"])
  memory.main(["--cell", "tiny:64:poetx_xq", "--compile_only"])
  memory.main(["--cell", "tiny:64:poetx_xq", "--steps", "2"])
  abstract, ran = _records(capsys.readouterr().out)
  assert abstract["compile_only"] is True and abstract["peak_gb"] is None and abstract["tokens_per_s"] is None
  assert abstract["fits"] is None  # a CPU has no memory limit to fit
  assert abstract["need_gb"] == ran["need_gb"] > 0  # the same compiled program


def _fake_child(need_gb: float, peak_gb: float):
  """A `_launch` whose child measured `need_gb` and `peak_gb` for whatever cell it was given."""

  def launch(argv, timeout_s):
    model, seq_len, method = argv[argv.index("--cell") + 1].split(":")
    record = {"model": model, "seq_len": int(seq_len), "method": method, "batch": 1, "peak_gb": peak_gb,
              "need_gb": need_gb, "tokens_per_s": 1000.0, "fits": True, "device": "Fake H100"}
    notes = 'NOTE {"device": "Fake H100", "limit_gb": 80.0}\nNOTE {"need_gb": %s}\n' % need_gb
    return 0, "compiling\n" + notes + "RECORD " + json.dumps(record) + "\n", "a warning\n"

  return launch


def test_parent_merges_records_by_cell_and_writes_json_and_plot(tmp_path, monkeypatch):
  out = tmp_path / "memory.json"
  kept = {"model": "8b", "seq_len": 2048, "method": "adamw", "batch": 1, "peak_gb": 70.0, "need_gb": 71.0,
          "tokens_per_s": 5.0, "fits": True, "device": "Fake H100"}
  stale = dict(kept, seq_len=1024, method="poetx_mem", peak_gb=99.0)
  out.write_text(json.dumps({"device": "Fake H100", "jax": "0", "command": "old", "records": [kept, stale]}))
  monkeypatch.setattr(memory, "_launch", _fake_child(need_gb=30.0, peak_gb=28.0))
  argv = ["--models", "8b", "--seq_lens", "1024", "--methods", "poetx_mem,poetx_xq", "--out", str(out)]
  memory.main(argv)

  results = json.loads(out.read_text())
  assert {"device", "jax", "command", "records"} <= set(results)
  assert results["device"] == "Fake H100" and results["device_limit_gb"] == 80.0
  assert results["command"].endswith(" ".join(argv))
  cells = {(r["model"], r["seq_len"], r["method"]): r for r in results["records"]}
  assert len(results["records"]) == len(cells) == 3
  assert cells[("8b", 2048, "adamw")] == kept
  assert cells[("8b", 1024, "poetx_mem")]["peak_gb"] == 28.0  # replaced, not duplicated
  assert cells[("8b", 1024, "poetx_xq")]["fits"]
  assert (tmp_path / "memory.png").stat().st_size > 0

  monkeypatch.setattr(memory, "_launch", _fake_child(need_gb=31.0, peak_gb=29.0))  # a second invocation
  memory.main(["--models", "8b", "--seq_lens", "1024", "--methods", "poetx_xq", "--out", str(out)])
  cells = {(r["model"], r["seq_len"], r["method"]): r for r in json.loads(out.read_text())["records"]}
  assert len(cells) == 3 and cells[("8b", 1024, "poetx_xq")]["peak_gb"] == 29.0


def test_a_crashing_child_becomes_a_record_that_does_not_fit(tmp_path):
  """A real child for a config that does not exist dies; its cell is kept, with the error."""
  out = tmp_path / "crash.json"
  memory.main(["--models", "nosuch", "--seq_lens", "64", "--methods", "adamw", "--out", str(out), "--plot_seq_len", "64"])
  (record,) = json.loads(out.read_text())["records"]
  assert (record["model"], record["seq_len"], record["method"], record["fits"]) == ("nosuch", 64, "adamw", False)
  assert record["peak_gb"] is None and record["tokens_per_s"] is None
  assert "ModuleNotFoundError" in record["error"] and len(record["error"]) <= memory.ERROR_CHARS


def test_a_child_past_its_timeout_is_killed_and_recorded(tmp_path):
  out = tmp_path / "late.json"
  memory.main(["--models", "tiny", "--seq_lens", "64", "--methods", "adamw", "--out", str(out), "--cell_timeout", "0.5",
               "--plot", str(tmp_path / "late.png")])
  (record,) = json.loads(out.read_text())["records"]
  assert not record["fits"] and "timed out after" in record["error"]
  assert os.path.exists(tmp_path / "late.png")


def test_a_child_that_dies_after_compiling_keeps_its_need():
  """An OOM at run time: the NOTE printed after compiling still gives the need."""
  stdout = 'NOTE {"device": "NVIDIA H100 80GB HBM3", "limit_gb": 63.8}\nNOTE {"need_gb": 61.5}\n'
  stderr = "Traceback (most recent call last):\n" + "  frame\n" * 50 + "RESOURCE_EXHAUSTED: Out of memory while trying to allocate\n"
  record, notes = memory.record_from_child("8b", 2048, "adamw", 1, -6, stdout, stderr)
  assert notes["limit_gb"] == 63.8
  assert record["need_gb"] == 61.5 and record["device"] == "NVIDIA H100 80GB HBM3" and not record["fits"]
  assert record["error"].endswith("Out of memory while trying to allocate")
  assert record["error"].count("\n") < memory.ERROR_LINES
