"""POET-X against AdamW on real text: same model, same tokens, same data order.

  python -m benchmarks.quality --config configs/llama60m.py --out benchmarks/results \
      --steps 300 --batch 64 --parallel 3 --cache_dir .corpus

Launches one `train.py` run per (method, learning rate) of a small grid, at most
`--parallel` at a time on the one GPU, then collects every run's metrics.jsonl into
`quality.json`, a plot of validation perplexity against tokens for the best run of
each method, and a plot of the largest singular value of a few kernels against steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (base lr, poet lr) pairs for POET-X; lrs for AdamW. POET-X's rule poet_lr × b ≈ 0.256
# gives 1e-3 at b = 256; the grid brackets it and moves the base rate along.
POETX_GRID = ((1e-3, 5e-4), (3e-3, 1e-3), (1e-2, 2e-3))
ADAMW_GRID = (1e-3, 3e-3, 1e-2)


def run_specs(args) -> list[dict]:
  specs = []
  for lr, poet_lr in _pairs(args.poetx_grid) if args.poetx_grid else POETX_GRID:
    specs.append({"method": "poetx", "lr": lr, "poet_lr": poet_lr, "name": f"poetx_lr{lr:g}_poet{poet_lr:g}"})
  for lr in _floats(args.adamw_grid) if args.adamw_grid else ADAMW_GRID:
    specs.append({"method": "adamw", "lr": lr, "name": f"adamw_lr{lr:g}"})
  return specs


def _floats(text):
  return tuple(float(v) for v in text.split(",") if v)


def _pairs(text):
  return tuple(tuple(float(v) for v in pair.split(":")) for pair in text.split(",") if pair)


def command(spec: dict, args) -> list[str]:
  workdir = os.path.join(args.workdir, spec["name"])
  cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--config={args.config}", f"--workdir={workdir}",
         f"--config.optimizer.name={spec['method']}", f"--config.optimizer.lr={spec['lr']}",
         f"--config.train.steps={args.steps}", f"--config.train.global_batch_size={args.batch}",
         f"--config.train.eval_every={args.eval_every}", f"--config.train.eval_batches={args.eval_batches}",
         f"--config.train.spectrum_every={args.spectrum_every}", f"--config.train.checkpoint_every={args.steps}",
         f"--config.train.log_every={args.log_every}", f"--config.optimizer.warmup_steps={args.warmup}",
         f"--config.poet.merge_interval={args.merge_interval}", f"--config.seed={args.seed}",
         f"--config.data.seq_len={args.seq_len}"]
  if "poet_lr" in spec:
    cmd.append(f"--config.optimizer.poet_lr={spec['poet_lr']}")
  if args.cache_dir:
    cmd.append(f"--config.data.cache_dir={os.path.abspath(args.cache_dir)}")
  cmd += [f"--config.{o}" for o in args.override]
  return cmd


def _records(workdir: str) -> list[dict]:
  """The run's records, the newest per (kind, step): a resumed or restarted run re-logs steps."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  newest = {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      newest[(record["kind"], record["step"])] = record
  return sorted(newest.values(), key=lambda r: r["step"])


def collect(spec: dict, args, wall_s: float) -> dict:
  records = _records(os.path.join(args.workdir, spec["name"]))
  tokens_per_step = args.batch * args.seq_len
  evals = [r for r in records if r["kind"] == "eval"]
  train = [r for r in records if r["kind"] == "train"]
  spectra = [r for r in records if r["kind"] == "spectrum"]
  final = evals[-1] if evals else {}
  speeds = sorted(r["tokens_per_sec"] for r in train[1:] if r.get("tokens_per_sec") is not None) or [float("nan")]
  return {
      **spec,
      "final_val_loss": final.get("val_loss"),
      "final_val_ppl": final.get("val_ppl"),
      "final_train_loss": train[-1]["loss"] if train else None,
      "tokens": args.steps * tokens_per_step,
      "wall_s": wall_s,
      "tokens_per_sec_median": speeds[len(speeds) // 2],
      "val_curve": [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "val_ppl": r["val_ppl"]} for r in evals],
      "spectrum": [{k: v for k, v in r.items() if k == "step" or k.startswith("sigma_max/")} for r in spectra],
      "diverged": not evals or not math.isfinite(final.get("val_loss", float("nan"))),
  }


def run_all(specs, args, on_result=None) -> list[dict]:
  pending, running, results = list(specs), {}, []
  os.makedirs(args.workdir, exist_ok=True)
  while pending or running:
    while pending and len(running) < args.parallel:
      spec = pending.pop(0)
      log = open(os.path.join(args.workdir, spec["name"] + ".log"), "w")
      proc = subprocess.Popen(command(spec, args), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
      running[proc] = (spec, time.time(), log)
      print(f"started {spec['name']}", flush=True)
    time.sleep(1.0)
    for proc in [p for p in running if p.poll() is not None]:
      spec, start, log = running.pop(proc)
      log.close()
      result = collect(spec, args, time.time() - start)
      result["returncode"] = proc.returncode
      results.append(result)
      print(f"finished {spec['name']}: rc {proc.returncode}, val ppl {result['final_val_ppl']}", flush=True)
      if proc.returncode:  # say why here: the log stays behind in --workdir, often on another machine
        with open(log.name, errors="replace") as f:
          print("".join(f.readlines()[-12:]), end="", flush=True)
      if on_result is not None:  # a long grid must not lose finished runs to a time limit
        on_result(sorted(results, key=lambda r: r["name"]))
  return sorted(results, key=lambda r: r["name"])


def summarize(results: list[dict], args) -> dict:
  summary = {"config": args.config, "tokens": args.steps * args.batch * args.seq_len, "steps": args.steps,
             "batch": args.batch, "seq_len": args.seq_len, "merge_interval": args.merge_interval,
             "parallel_runs": args.parallel, "command": "python -m benchmarks.quality " + " ".join(args.argv), "runs": results}
  for method in ("poetx", "adamw"):
    done = [r for r in results if r["method"] == method and not r["diverged"]]
    if done:
      best = min(done, key=lambda r: r["final_val_loss"])
      summary[method] = {"best_val_ppl": best["final_val_ppl"], "best_val_loss": best["final_val_loss"],
                         "best_lr": best["lr"], **({"best_poet_lr": best["poet_lr"]} if method == "poetx" else {}),
                         "run": best["name"]}
    else:
      summary[method] = {"best_val_ppl": None, "best_lr": None}
  return summary


def plot(summary: dict, out_dir: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  runs = {r["name"]: r for r in summary["runs"]}
  best = {m: runs[summary[m]["run"]] for m in ("poetx", "adamw") if summary[m].get("run")}
  fig, ax = plt.subplots(figsize=(6, 4))
  for method, run in best.items():
    curve = run["val_curve"]
    ax.plot([c["tokens"] / 1e6 for c in curve], [c["val_ppl"] for c in curve], marker="o", label=f"{method} ({run['name']})")
  ax.set(xlabel="training tokens (M)", ylabel="validation perplexity", yscale="log", title="Validation perplexity, best run of each method")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "quality_val_ppl.png"), dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  for method, run in best.items():
    keys = sorted({k for row in run["spectrum"] for k in row if k.startswith("sigma_max/")})
    for key in keys:
      rows = [row for row in run["spectrum"] if key in row]
      ax.plot([row["step"] for row in rows], [row[key] for row in rows], linestyle="-" if method == "poetx" else "--",
              label=f"{method}: {key.split('/', 1)[1]}")
  ax.set(xlabel="step", ylabel="largest singular value", title="Spectrum of weight matrices")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "quality_spectrum.png"), dpi=120)
  plt.close(fig)


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "llama60m.py"))
  parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "quality"))
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--warmup", type=int, default=30)
  parser.add_argument("--merge_interval", type=int, default=100)
  parser.add_argument("--eval_every", type=int, default=50)
  parser.add_argument("--eval_batches", type=int, default=8)
  parser.add_argument("--spectrum_every", type=int, default=25)
  parser.add_argument("--log_every", type=int, default=25)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--parallel", type=int, default=1, help="runs at a time (they share the device)")
  parser.add_argument("--cache_dir", default=None, help="data cache (a prebuilt corpus for offline machines)")
  parser.add_argument("--poetx_grid", default=None, help="base:poet pairs, e.g. 3e-3:1e-3,1e-2:2e-3")
  parser.add_argument("--adamw_grid", default=None, help="e.g. 1e-3,3e-3")
  parser.add_argument("--override", action="append", default=[], help="extra config override a.b=v (repeatable)")
  parser.add_argument("--collect_only", action="store_true", help="summarize runs already in --workdir, train nothing")
  args = parser.parse_args(argv)
  args.argv = argv
  os.makedirs(args.out, exist_ok=True)

  def write(results):
    summary = summarize(results, args)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
      json.dump(summary, f, indent=1)
    return summary

  if args.collect_only:
    results = [collect(spec, args, wall_s=None) for spec in run_specs(args)]
  else:
    results = run_all(run_specs(args), args, on_result=write)
  summary = write(results)
  plot(summary, args.out)
  print(json.dumps({m: summary[m] for m in ("poetx", "adamw")}, indent=1))
  print(f"{'run':<34} {'val ppl':>9} {'tokens':>10} {'wall s':>7} {'tok/s':>9}")
  for r in results:
    wall = f"{r['wall_s']:7.1f}" if r["wall_s"] is not None else "      -"
    print(f"{r['name']:<34} {r['final_val_ppl'] or float('nan'):9.2f} {r['tokens']:10d} {wall} {r['tokens_per_sec_median']:9.0f}")
  return summary


if __name__ == "__main__":
  main()
