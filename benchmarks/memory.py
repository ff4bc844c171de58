"""Peak device memory and speed of one train step per (model, sequence length, method).

  python -m benchmarks.memory --models 3b,8b,13b --seq_lens 512,1024,2048 \
      --methods adamw,adamw_bf16,poetx_fast,poetx_mem,poetx_xq,galore --steps 4 \
      --out benchmarks/results/memory_h100.json

Each cell (model, sequence length, method) runs in a process of its own: a
`configs/llama{MODEL}.py` config (MODEL `tiny`: `configs/tiny.py`) with the method's
overrides, one device, `--batch` sequences a step and no microbatches. A process
per cell because with `XLA_PYTHON_CLIENT_PREALLOCATE=false` (set for the children,
so `peak_bytes_in_use` is what the program used) the allocator keeps the regions a
smaller cell took, and a larger one after it can fail to find room (config_fit.py's
docstring); a crash or an OOM then costs only its own cell.

A child prints one `RECORD {json}` line (fields in `measure_cell`), and `NOTE {json}`
lines before it (the device, its limit, the compiled need) so a cell that dies at run
time still says what it needed. The parent merges the records into `--out`, replacing
those of the same (model, seq_len, method), so a grid split over several invocations
accumulates; it writes after every cell, then prints a table and plots peak GB by
model at one sequence length against the paper's numbers (`PAPER_PEAK_GB`).

The children let JAX use 0.95 of the GPU's memory (`XLA_PYTHON_CLIENT_MEM_FRACTION`,
unless already set; JAX's own default is 0.75), so "fits" means fits the card, as the
paper's numbers are of a whole 80 GB H100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# method -> config overrides (`field=value`, as compile_time.parse_overrides reads them)
METHODS = {
    # AdamW on every parameter, float32 weights and moments: the paper's full-training baseline
    "adamw": ["optimizer.name=adamw", "model.param_dtype=float32", "model.remat=full"],
    # AdamW with bfloat16 weights and first moments: the cheapest plain-AdamW baseline
    "adamw_bf16": ["optimizer.name=adamw", "model.param_dtype=bfloat16", "optimizer.mu_dtype=bfloat16", "model.remat=full"],
    # GaLore (optax.contrib): Adam moments in a low-rank projection of each gradient, bfloat16
    # weights; optax's GaLore projects 2-D kernels only, so the blocks are not scanned
    "galore": ["optimizer.name=galore", "model.param_dtype=bfloat16", "model.remat=full", "model.scan_layers=False"],
    # POET-X fast variant (keeps h) under full remat; bfloat16 embeddings, norms, head and base
    # kernels, float32 generators and their moments
    "poetx_fast": ["optimizer.name=poetx", "poet.variant=fast", "model.remat=full", "model.param_dtype=bfloat16",
                   "poet.base_dtype=bfloat16"],
    # POET-X mem variant (recomputes h in the backward) instead of remat
    "poetx_mem": ["optimizer.name=poetx", "poet.variant=mem", "model.remat=none", "model.param_dtype=bfloat16",
                  "poet.base_dtype=bfloat16"],
    # POET-XQ: the fast variant with int8-quantized frozen base kernels
    "poetx_xq": ["optimizer.name=poetx", "poet.variant=fast", "model.remat=full", "model.param_dtype=bfloat16",
                 "poet.base_dtype=int8"],
}

# The POET-X paper's peak memory on one H100 (GB), batch 1: {(model, seq_len): {method: GB}}.
PAPER_PEAK_GB = {
    ("8b", 1024): {"adamw": 76.34, "poetx_fast": 33.14, "poetx_mem": 27.87, "poetx_xq": 23.59, "galore": 45.62},
    ("8b", 2048): {"adamw": 78.69, "poetx_mem": 31.74, "poetx_xq": 29.83, "galore": 54.71},
    ("13b", 2048): {"poetx_mem": 47.21, "poetx_xq": 43.59},
    ("3b", 1024): {"adamw": 28.78, "poetx_mem": 13.28},
}

GB = 1e9
VOCAB = 32000  # the T5 tokenizer's (SPEC §9), as train.py pads it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ERROR_LINES = 6  # lines of a failed child's stderr kept in its record
ERROR_CHARS = 600


def cell_config(model: str, seq_len: int, method: str, batch: int):
  """The `TrainConfig` of one cell: the model's config file, the method's overrides,
  `seq_len`, `batch` sequences a step in one microbatch, the Cayley map per microbatch.

  Raises:
    ValueError: from `train_config.from_config_dict`, on a field or value it does not know.
  """
  import importlib

  from benchmarks import compile_time
  from poetx_jax import train_config

  raw = importlib.import_module("configs.tiny" if model == "tiny" else f"configs.llama{model}").get_config()
  settings = METHODS[method] + [f"data.seq_len={seq_len}", f"train.global_batch_size={batch}", "train.grad_accum_steps=1",
                                "train.cayley_once=False"]
  compile_time.apply_overrides(raw, compile_time.parse_overrides(settings))
  return train_config.from_config_dict(raw, vocab_size=raw.data.vocab_size if model == "tiny" else VOCAB)


def _note(**fields) -> None:
  print("NOTE " + json.dumps(fields), flush=True)


def measure_cell(model: str, seq_len: int, method: str, batch: int, steps: int, compile_only: bool = False) -> dict:
  """One cell on the first device: the record the child prints.

  `compile_only`: compile the step on abstract state (nothing allocated, so any machine can
  say what a cell needs, a CPU included: there XLA:CPU's buffer assignment, which widens
  bf16 matmuls to float32, so only a rough guide to a GPU's) and record the need alone
  (`compile_only: true`; `fits` against the device's limit, None where it has none).

  `need_gb` is XLA's buffer assignment of the compiled step (`trainer.memory_need_bytes`);
  where it exceeds the device's limit the step does not run (`fits` false, no peak).
  Otherwise `peak_gb` is the device's `peak_bytes_in_use` after `steps` steps (None where
  the backend keeps no statistics, as on the CPU) and `tokens_per_s` the median over the
  steps after the first.
  """
  import jax

  from benchmarks import compile_time, synthetic
  from poetx_jax import trainer

  config = cell_config(model, seq_len, method, batch)
  device = jax.local_devices()[0]
  limit = trainer.device_memory_limit()
  _note(device=device.device_kind, limit_gb=limit / GB if limit else None)
  run = trainer.build(config, devices=[device])  # one device, as the paper measures
  if compile_only:
    state = jax.eval_shape(run.init_fn)
    data = {k: jax.ShapeDtypeStruct((batch, seq_len), jax.numpy.int32) for k in ("inputs", "targets", "weights")}
  else:
    state = run.init_fn()
    data = synthetic.token_batch(run, batch, seq_len, config.model.vocab_size)
  compiled = run.train_step.lower(state, data).compile()
  need = trainer.memory_need_bytes(compiled.memory_analysis())
  _note(need_gb=need / GB)
  record = {"model": model, "seq_len": seq_len, "method": method, "batch": batch, "peak_gb": None, "need_gb": need / GB,
            "tokens_per_s": None, "fits": False, "device": device.device_kind}
  if compile_only:
    return {**record, "fits": need <= limit if limit is not None else None, "compile_only": True}
  if limit is not None and need > limit:
    return record
  times, state = compile_time.step_seconds(compiled, state, data, steps)
  stats = device.memory_stats()
  record.update(peak_gb=stats["peak_bytes_in_use"] / GB if stats is not None else None,
                tokens_per_s=batch * seq_len / statistics.median(times[1:] or times), fits=True)
  return record


def _launch(argv: list[str], timeout_s: float) -> tuple[int | None, str, str]:
  """`(exit status or None on timeout, stdout, stderr)` of `python -m benchmarks.memory argv`."""
  env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", **os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  try:
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    return done.returncode, done.stdout, done.stderr
  except subprocess.TimeoutExpired as late:  # the child is killed; keep what it had said
    text = lambda b: (b.decode(errors="replace") if isinstance(b, bytes) else b) or ""
    return None, text(late.stdout), text(late.stderr) + f"\ntimed out after {timeout_s:.0f} s"


def _tagged(stdout: str, tag: str) -> list[dict]:
  return [json.loads(line[len(tag) + 1:]) for line in stdout.splitlines() if line.startswith(tag + " ")]


def record_from_child(model: str, seq_len: int, method: str, batch: int, status: int | None, stdout: str,
                      stderr: str) -> tuple[dict, dict]:
  """`(record, notes)` from a child's output: its RECORD, or for a crash or timeout a
  record with `fits` false, what the notes knew (need, device) and the end of its stderr."""
  notes = {k: v for note in _tagged(stdout, "NOTE") for k, v in note.items()}
  records = _tagged(stdout, "RECORD")
  if status == 0 and records:
    return records[-1], notes
  lines = [line for line in stderr.splitlines() if line.strip()][-ERROR_LINES:]
  error = "\n".join(lines)[-ERROR_CHARS:] or f"exit status {status}, no record"
  return {"model": model, "seq_len": seq_len, "method": method, "batch": batch, "peak_gb": None,
          "need_gb": notes.get("need_gb"), "tokens_per_s": None, "fits": False, "device": notes.get("device"),
          "error": error}, notes


def _load(path: str) -> dict:
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {"device": None, "jax": None, "command": None, "records": []}


def _key(record: dict) -> tuple:
  return record["model"], record["seq_len"], record["method"]


def merge(results: dict, record: dict) -> None:
  """Puts `record` into `results["records"]`, replacing one of the same (model, seq_len, method)."""
  results["records"] = [r for r in results["records"] if _key(r) != _key(record)] + [record]


def _write(path: str, results: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=1)
  os.replace(path + ".tmp", path)  # a killed parent never leaves half a file


def _gb(value) -> str:
  return f"{value:8.2f}" if value is not None else f"{'-':>8}"


def table(records: list[dict]) -> str:
  """One line per record: model, seq, method, need GB, peak GB, tokens/s, fits."""
  lines = [f"{'model':>6} {'seq':>5} {'method':<11} {'need GB':>8} {'peak GB':>8} {'tokens/s':>9} fits"]
  for r in records:
    speed = f"{r['tokens_per_s']:9.0f}" if r.get("tokens_per_s") is not None else f"{'-':>9}"
    fits = "yes" if r["fits"] else "OOM" + (" (crashed)" if "error" in r else "")
    lines.append(f"{r['model']:>6} {r['seq_len']:>5} {r['method']:<11} {_gb(r.get('need_gb'))} {_gb(r.get('peak_gb'))} {speed} {fits}")
  return "\n".join(lines)


def _size(model: str) -> float:
  """Sort key: `8b` -> 8e9, `350m` -> 3.5e8, others last."""
  scale = {"m": 1e6, "b": 1e9}.get(model[-1:])
  try:
    return float(model[:-1]) * scale if scale else float("inf")
  except ValueError:
    return float("inf")


def plot(results: dict, seq_len: int, path: str) -> None:
  """Peak GB by model at `seq_len`: a bar group per model, a bar per method, the paper's
  numbers as black markers, a cell that did not fit as a hatched bar at the device limit.
  A cell that ran with no peak (CPU) shows its compiled need instead."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cells = {(r["model"], r["method"]): r for r in results["records"] if r["seq_len"] == seq_len}
  models = sorted({m for m, _ in cells} | {m for m, s in PAPER_PEAK_GB if s == seq_len}, key=lambda m: (_size(m), m))
  present = {m for _, m in cells} | {m for (_, s), d in PAPER_PEAK_GB.items() if s == seq_len for m in d}
  methods = [m for m in METHODS if m in present] + sorted(present - set(METHODS))
  limit = results.get("device_limit_gb")
  heights = [r.get("peak_gb") or r.get("need_gb") or 0 for r in cells.values()]
  oom_height = limit or max(heights + [1.0])
  width = 0.8 / max(len(methods), 1)
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(models) * max(len(methods), 1) ** 0.5 + 1.5), 4.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  paper_labelled = oom_labelled = False
  for j, method in enumerate(methods):
    color = colors[j % len(colors)]
    for i, model in enumerate(models):
      x = i - 0.4 + width * (j + 0.5)
      label = method if i == 0 else None
      r = cells.get((model, method))
      if r is not None and r["fits"]:
        ax.bar(x, r.get("peak_gb") or r.get("need_gb") or 0, width, color=color, label=label)
      elif r is not None:
        ax.bar(x, oom_height, width, color="none", edgecolor=color, hatch="//", label=label)
        ax.text(x, oom_height, "OOM", ha="center", va="bottom", fontsize=7, rotation=90)
        oom_labelled = True
      elif label:
        ax.bar(x, 0, width, color=color, label=label)  # keeps the legend whole
      paper = PAPER_PEAK_GB.get((model, seq_len), {}).get(method)
      if paper is not None:
        ax.plot(x, paper, "k_", markersize=max(6, 300 * width / max(len(models), 1)), markeredgewidth=2,
                label=None if paper_labelled else "paper (H100)")
        paper_labelled = True
  if limit:
    ax.axhline(limit, color="grey", linestyle=":", linewidth=1, label="device limit")
  ax.set_xticks(range(len(models)), models)
  ax.set_ylabel("peak memory (GB)")
  ax.set_title(f"one train step, sequence {seq_len}, batch {results['records'][0]['batch'] if results['records'] else 1}"
               f" ({results.get('device') or 'device unknown'}){'; hatched: did not fit' if oom_labelled else ''}",
               fontsize=9)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def run_grid(args, argv: list[str]) -> dict:
  """The parent: each cell in a child process, merged into `args.out` after each."""
  import jax  # the version only: the parent never starts a backend (it would hold device memory)

  results = _load(args.out)
  results.update(jax=jax.__version__, command="python -m benchmarks.memory " + " ".join(argv))
  for model in args.models.split(","):
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
      for method in args.methods.split(","):
        cell = f"{model}:{seq_len}:{method}"
        print(f"cell {cell} ...", flush=True)
        status, stdout, stderr = _launch(["--cell", cell, "--steps", str(args.steps), "--batch", str(args.batch)]
                                         + (["--compile_only"] if args.compile_only else []), args.cell_timeout)
        record, notes = record_from_child(model, seq_len, method, args.batch, status, stdout, stderr)
        if record.get("device") is None:
          record["device"] = results.get("device")
        results["device"] = notes.get("device") or record.get("device") or results.get("device")
        if notes.get("limit_gb"):
          results["device_limit_gb"] = notes["limit_gb"]
        merge(results, record)
        _write(args.out, results)
        print(table([record]).splitlines()[1] + (f"\n    {record['error'].splitlines()[-1]}" if "error" in record else ""),
              flush=True)
  results["records"].sort(key=lambda r: (_size(r["model"]), r["model"], r["seq_len"], list(METHODS).index(r["method"])
                                         if r["method"] in METHODS else len(METHODS)))
  _write(args.out, results)
  print(table(results["records"]), flush=True)
  plot(results, args.plot_seq_len, args.plot or os.path.splitext(args.out)[0] + ".png")
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="3b,8b,13b", help="comma-separated: configs/llama{MODEL}.py (or tiny)")
  parser.add_argument("--seq_lens", default="1024", help="comma-separated sequence lengths")
  parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
  parser.add_argument("--steps", type=int, default=4, help="steps a cell runs (the first is not timed)")
  parser.add_argument("--batch", type=int, default=1, help="sequences a step")
  parser.add_argument("--out", default="benchmarks/results/memory.json", help="JSON the records merge into")
  parser.add_argument("--plot", default=None, help="the figure (default: --out with .png)")
  parser.add_argument("--plot_seq_len", type=int, default=1024, help="the sequence length the figure shows")
  parser.add_argument("--cell_timeout", type=float, default=900, help="seconds before a cell's process is killed")
  parser.add_argument("--cell", default=None, help="MODEL:SEQ:METHOD: measure one cell here and print its RECORD (the child)")
  parser.add_argument("--compile_only", action="store_true",
                      help="compile on abstract state and record XLA's need only (any machine, a CPU included)")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  for method in args.methods.split(",") + ([args.cell.split(":")[-1]] if args.cell else []):
    if method not in METHODS:
      parser.error(f"unknown method {method!r}; known: {', '.join(METHODS)}")
  if args.cell:
    model, seq_len, method = args.cell.split(":")
    record = measure_cell(model, int(seq_len), method, args.batch, args.steps, args.compile_only)
    print("RECORD " + json.dumps(record), flush=True)
    return None
  return run_grid(args, argv)


if __name__ == "__main__":
  main()
