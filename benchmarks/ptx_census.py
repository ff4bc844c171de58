"""Which matrix instructions each Pallas (Triton) kernel compiles to on this GPU.

  python -m benchmarks.ptx_census --shapes 4096x14336 --blocks 256,512

Hopper's fast path for block products is `wgmma` (asynchronous, one warpgroup, B
from shared memory); `mma.sync` is the Ampere instruction, which Hopper runs at a
fraction of the rate. A timing cannot tell which one a kernel got, so this compiles a
POET-X layer's forward + backward with XLA's dump on, splits the PTX into kernels and
counts, per kernel, the instruction sites (static, not executed counts) of the matrix
instructions and of global loads by kind: plain `ld.global`, asynchronous `cp.async`,
and bulk tensor (TMA) loads. It prints every Pallas kernel (all are named `poetx_*`)
and any other kernel with matrix instructions, such as XLA's Triton GEMM fusions;
cuBLAS GEMMs leave no PTX in the dump and are not seen.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

# XLA reads its flags once, when jax starts. Imported after jax (a test reading the
# PTX parser) the module leaves the environment alone, since the flags would come too
# late here and would reach every subprocess started later (XLA:CPU with these dump
# flags crashed a multi-device test), and `main` refuses to run.
_FLAGS_BEFORE_JAX = "jax" not in sys.modules
DUMP_DIR = tempfile.mkdtemp(prefix="ptx_census_") if _FLAGS_BEFORE_JAX else None
if _FLAGS_BEFORE_JAX:
  # With XLA's parallel compilation on, jax 0.11.2 on the H100 wrote no PTX at all
  # (raw/run129_ptx_census.txt).
  os.environ["XLA_FLAGS"] = (
      f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP_DIR} --xla_gpu_dump_llvmir=true "
      "--xla_dump_emitter_re=.* --xla_gpu_force_compilation_parallelism=1"
  ).strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402

from benchmarks import layer as layer_bench  # noqa: E402

COUNTED = {
    "wgmma": r"\bwgmma\.mma_async",
    "mma.sync": r"\bmma\.sync",
    "ld.global": r"\bld\.global",
    "cp.async": r"\bcp\.async\.(?:ca|cg)\b",
    "TMA load": r"\bcp\.async\.bulk\.tensor\.\dd\.shared::cluster\.global",
}
_ENTRY = re.compile(r"^\s*(?:\.visible\s+)?\.entry\s+(\S+?)\s*\(", re.M)


def kernels_in_ptx(text: str) -> dict[str, collections.Counter]:
  """Per `.entry` of a PTX file, how often each `COUNTED` pattern occurs in its body."""
  starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(text)] + [(len(text), None)]
  out = {}
  for (begin, name), (end, _) in zip(starts, starts[1:]):
    body = text[begin:end]
    out[name] = collections.Counter({k: len(re.findall(p, body)) for k, p in COUNTED.items()})
  return out


def census(label: str, fn, *args) -> None:
  """Compiles `fn(*args)` and prints the counts of the kernels in the PTX files it added."""
  before = set(glob.glob(os.path.join(DUMP_DIR, "**", "*.ptx"), recursive=True))
  jax.jit(fn).lower(*args).compile()
  new = sorted(set(glob.glob(os.path.join(DUMP_DIR, "**", "*.ptx"), recursive=True)) - before)
  print(f"--- {label}: {len(new)} PTX file(s)")
  if not new:
    dumped = glob.glob(os.path.join(DUMP_DIR, "**", "*"), recursive=True)
    kinds = collections.Counter(os.path.basename(f).split(".", 2)[-1] for f in dumped)
    print("  none dumped; file kinds there:", sorted(kinds.items())[:40])
    return
  for path in new:
    with open(path) as f:
      for name, counts in kernels_in_ptx(f.read()).items():
        if counts["wgmma"] or counts["mma.sync"] or "poetx" in name:
          print(f"  {name[:48]:48s} " + "  ".join(f"{k} {counts[k]:5d}" for k in COUNTED))


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default="4096x14336")
  parser.add_argument("--blocks", default="256,512")
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--impls", default="pallas_fast", help="of benchmarks.layer.KNOWN_IMPLS, comma-separated")
  args = parser.parse_args(argv)
  if not _FLAGS_BEFORE_JAX:
    raise RuntimeError("benchmarks.ptx_census sets XLA_FLAGS before jax starts: run it as `python -m benchmarks.ptx_census`.")
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, dump {DUMP_DIR}", flush=True)
  for block in (int(b) for b in args.blocks.split(",")):
    for shape in args.shapes.split(","):
      d_in, d_out = (int(s) for s in shape.split("x"))
      (inputs,) = layer_bench._inputs(jax.random.key(0), args.tokens, d_in, d_out, block, 1, jnp.bfloat16)  # pylint: disable=protected-access
      for impl in args.impls.split(","):
        _, fwd_bwd = layer_bench._poet_fns(block, *layer_bench.KNOWN_IMPLS[impl])  # pylint: disable=protected-access
        census(f"layer {shape} b={block} {impl} fwd+bwd", fwd_bwd, inputs)


if __name__ == "__main__":
  main()
