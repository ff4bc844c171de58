"""Which matrix instructions each Pallas (Triton) kernel compiles to on this GPU.

  python -m benchmarks.ptx_census --shapes 4096x14336 --blocks 256,512

Hopper's fast path for block products is `wgmma` (asynchronous, one warpgroup, B
from shared memory); `mma.sync` is the Ampere instruction, which Hopper runs at a
fraction of the rate. A timing cannot tell which one a kernel got, so this compiles a
POET-X layer's forward + backward and the Cayley–Neumann map with XLA's dump on,
splits the PTX into kernels and counts, per kernel, the matrix instructions and the
global loads by kind (plain `ld.global`, asynchronous `cp.async`, bulk tensor copies).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

if "jax" in sys.modules:
  raise RuntimeError("benchmarks.ptx_census must set XLA_FLAGS before jax is imported: run it as a script.")
DUMP_DIR = tempfile.mkdtemp(prefix="ptx_census_")
# With XLA's parallel compilation on, jax 0.11.2 on the H100 wrote no PTX at all (run 129).
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP_DIR} --xla_gpu_dump_llvmir=true --xla_dump_emitter_re=.* --xla_gpu_force_compilation_parallelism=1".strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402

from benchmarks import layer as layer_bench  # noqa: E402
from poetx_jax import skew  # noqa: E402
from poetx_jax.kernels import cayley_neumann as cn  # noqa: E402

COUNTED = {
    "wgmma": r"\bwgmma\.mma_async",
    "mma.sync": r"\bmma\.sync",
    "ld.global": r"\bld\.global",
    "cp.async": r"\bcp\.async\.(?:ca|cg)",
    "bulk copy": r"\bcp\.async\.bulk",
}
_ENTRY = re.compile(r"^\s*\.(?:visible\s+)?\.?entry\s+(\S+?)\s*\(", re.M)


def kernels_in_ptx(text: str) -> dict[str, collections.Counter]:
  """Per `.entry` of a PTX file, how often each `COUNTED` pattern occurs in its body."""
  starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(text)] + [(len(text), None)]
  out = {}
  for (begin, name), (end, _) in zip(starts, starts[1:]):
    body = text[begin:end]
    out[name] = collections.Counter({k: len(re.findall(p, body)) for k, p in COUNTED.items()})
  return out


def census(label: str, fn, *args) -> None:
  before = set(glob.glob(os.path.join(DUMP_DIR, "**", "*ptx*"), recursive=True))
  jax.jit(fn).lower(*args).compile()
  new = sorted(set(glob.glob(os.path.join(DUMP_DIR, "**", "*ptx*"), recursive=True)) - before)
  print(f"--- {label}: {len(new)} PTX file(s)")
  if not new:
    kinds = collections.Counter(f.split(".", 2)[-1] for f in os.listdir(DUMP_DIR))
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
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, dump {DUMP_DIR}", flush=True)
  for block in (int(b) for b in args.blocks.split(",")):
    for shape in args.shapes.split(","):
      d_in, d_out = (int(s) for s in shape.split("x"))
      (inputs,) = layer_bench._inputs(jax.random.key(0), args.tokens, d_in, d_out, block, 1, jnp.bfloat16)  # pylint: disable=protected-access
      _, fwd_bwd = layer_bench._poet_fns(block, *layer_bench.KNOWN_IMPLS["pallas_fast"])  # pylint: disable=protected-access
      census(f"layer {shape} b={block} pallas_fast fwd+bwd", fwd_bwd, inputs)
    q = jnp.zeros((8, skew.packed_size(block)), jnp.float32)

    def cayley_fwd_bwd(q, block=block):
      g, vjp = jax.vjp(lambda q: cn.cayley_neumann(q, block, operand_dtype=jnp.bfloat16), q)
      return g, vjp(g)
    census(f"cayley b={block} fwd+bwd", cayley_fwd_bwd, q)


if __name__ == "__main__":
  main()
