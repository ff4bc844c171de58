"""Tile sizes per shape: a small heuristic, every choice commented.

Register budget: a float32 accumulator of `rows x cols` spread over `num_warps`
warps costs `rows·cols / (32·num_warps)` registers per thread; keeping that at or
under 64 leaves room for operands and pipelining on an H100 (255 regs/thread max).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def covers(block_size: int) -> bool:
  """Whether the kernels' tiles can cover `B x B` blocks: powers of two, 16 or more
  (Triton tiles are powers of two, and its dots need at least 16 along each side)."""
  return block_size >= 16 and block_size & (block_size - 1) == 0


@dataclasses.dataclass(frozen=True)
class RotationTiles:
  rows: int  # output rows per program (a slice of one block's B rows)
  tokens: int  # tokens per program
  depth: int  # reduction chunk over the block's B inputs
  num_warps: int
  num_stages: int = 2  # software-pipelined loads of the reduction loop


def rotation_tiles(block_size: int, tokens: int) -> RotationTiles:
  """Tiles of `gather_rotate` / `rotate_scatter`.

  Measured on the H100 (benchmarks/rotation_sweep.py, b = 256, N = 2048, bf16; see
  benchmarks/results/raw/run3_sweep.txt): 128 output rows x 128 tokens with a
  reduction depth of 64 and 8 warps ran 0.081 / 0.072 ms (gather / scatter form)
  at D = 14336, against 0.096 / 0.089 ms for 256 x 64 x 32, the first guess.
  128 x 128 float32 accumulators over 8 warps are 64 registers per thread. Short
  inputs use fewer tokens per program. A third pipeline stage, timed as device time
  (raw/run11_rotation_sweep.txt): scatter form 57.9 against 63.2 µs at b = 256, and
  102 / 86 against 111 / 99 µs (gather / scatter) at b = 512; a fourth stage lost.

  Not better: a G-stationary kernel (each program loads its `rows x B` slice of `G_r`
  once and walks several token tiles) ran 69–92 µs against 56.6 / 65.5 µs at D = 14336,
  b = 256, and its b = 512 tiles did not fit in shared memory (raw/run39_stationary_sweep.txt).
  Nor did programs walking several token tiles in one flattened loop, so the next tile's
  loads could be pipelined behind the last products: 76–90 µs at D = 14336, b = 256
  (raw/run44_persistent_sweep.txt). Nor did 64-row tiles over 4 warps, which won for the
  Cayley map's products (raw/run76_rotation_sweep.txt): 66.3 / 62.3 against 61.6 / 57.6 µs
  at D = 14336, b = 256; 113.2 / 98.3 against 93.0 / 83.3 at b = 512. Nor, tried again
  with the backward fused kernel's tilings (128 rows over 8 warps in 3 stages, or 64
  over 4 in 4; 64-token steps, as 128-token ones ran out of shared memory; 1, 2, 4 or
  8 times as many token ranges as fill one wave), the
  G-stationary form at the train steps' token counts (raw/run101_rotation_forms.txt,
  commit 8e2bb15, since removed): at D = 14336, N = 32768, 890.1 / 890.3 against
  848.5 / 808.1 µs (gather / scatter) for these tiles; at D = 2048, 123.7 / 123.6
  against 125.5 / 119.3 (the gather 1.4% faster, the scatter 3.6% slower); at N = 2048
  it won only the gather at D = 14336 (59.4 against 61.8 µs) and lost the other three.
  Nor seven more tilings at the train step's N = 32768 (D = 5632, 2048) and at D = 14336,
  N = 2048 (raw/run110_rotation_sweep.txt): whole 256-row blocks per program, 256-token
  tiles, 128-deep steps, 32-deep steps in four stages; 4 warps on these tiles came
  within 2% (327.0 / 316.4 against 330.4 / 315.0 µs at D = 5632).
  """
  token_tile = min(128, max(16, _next_pow2(tokens)))
  return RotationTiles(rows=min(block_size, 128), tokens=token_tile, depth=min(64, block_size), num_warps=8, num_stages=3)


@dataclasses.dataclass(frozen=True)
class OuterSumTiles:
  rows: int  # rows of a per program
  cols: int  # rows of g per program
  depth: int  # tokens per reduction step
  num_warps: int
  num_stages: int = 2
  splits: int = 1  # token ranges reduced by separate programs, their partial sums added after


H100_SMS = 132
SPLIT_MIN_TOKENS = 2048  # the fewest tokens a split reduces (32 steps of 64)


def outer_sum_tiles(block_size: int, tokens: int, num_blocks: int | None = None) -> OuterSumTiles:
  """Tiles of `gathered_block_outer_sum`: 128 x 128 float32 partials (64 regs/thread at 8 warps).

  Three pipeline stages over 64-token steps (raw/run11_rotation_sweep.txt, D = 14336,
  N = 2048): 53.7 against 58.0 µs with two stages at b = 256, 99.4 against 106 at
  b = 512; 128-token steps, a fourth stage and 64-row tiles were all slower.

  Each program streams over all tokens, so a narrow layer gets few programs: fewer
  than the H100's 132 multiprocessors at D = 2048…5632 (raw/run24_outer_sum_sweep.txt,
  N = 2048). With at most 64 programs of 128 x 128, 64 x 64 tiles over 128-token
  steps won: 11.7 against 18.4 µs at D = 2048, b = 256; 15.8 against 18.2 at b = 512;
  19.9 against 22.6 at D = 4096, b = 256. Between 64 and 132 programs a fourth stage
  won: 24.0 against 26.6 µs at D = 5632, b = 256; 22.0 against 24.7 at D = 4096,
  b = 512 (64 x 64 tiles lost there by 30% or more).
  """
  side = min(block_size, 128)
  depth = min(64, max(16, _next_pow2(tokens)))
  programs = (num_blocks or 1 << 30) * (block_size // side) ** 2
  if programs < H100_SMS and tokens >= 2 * SPLIT_MIN_TOKENS:
    # A train step's tokens (131072 in a llama60m step) would stream through a narrow
    # layer's few programs (32 at D = 512, b = 256: the outer sums took 52 of a 259 ms
    # step, more than the rotations, raw/run60_trace_gaps.txt), so the tokens are split over about two
    # waves of programs, each summing its own range: the llama60m step 0.262 -> 0.231 s,
    # llama1b's (32768 tokens a microbatch) 3.081 -> 3.090 s (raw/run65_fit_split_outer_sums.txt).
    # These tiles are the 128 x 128 ones of wide layers; not swept for this case.
    splits = min(math.ceil(2 * H100_SMS / programs), tokens // SPLIT_MIN_TOKENS)
    return OuterSumTiles(rows=side, cols=side, depth=depth, num_warps=8, num_stages=3, splits=splits)
  if side == 128 and programs <= 64:
    return OuterSumTiles(rows=64, cols=64, depth=min(128, max(16, _next_pow2(tokens))), num_warps=4, num_stages=3)
  if side == 128 and programs < H100_SMS:
    return OuterSumTiles(rows=side, cols=side, depth=depth, num_warps=8, num_stages=4)
  return OuterSumTiles(rows=side, cols=side, depth=depth, num_warps=8, num_stages=3)


@dataclasses.dataclass(frozen=True)
class CayleyTiles:
  side: int  # output tile rows (and columns unless `cols` is set)
  depth: int  # reduction chunk
  num_warps: int
  num_stages: int = 2  # software-pipelined loads of the reduction loop
  cols: int = 0  # output tile columns; 0: square tiles
  one_loop: bool = False  # a sum of two products in one loop (four operand tiles a stage), not two

  @property
  def width(self) -> int:
    return self.cols or self.side


def cayley_tiles(
    block_size: int, operand_dtype="float32", num_blocks: int | None = None, backward: bool = False
) -> CayleyTiles:
  """Tiles of the product kernels: unpack / square / Neumann (forward), ∇2 / dense dQ (`backward`).

  bfloat16 operands (what a bf16 layer uses), measured on the H100 with
  `benchmarks/cayley_sweep.py` (raw/run72_cayley_sweep.txt, device µs, forward /
  backward as the `fast` layer runs them): 64 x 64 tiles over 4 warps with three
  stages were the fastest forward at b = 256 x 72 and 320 blocks and b = 512 x 36 and
  160 blocks, or within 1% (60.6, 236.5, 134.7, 525.0 µs; 128 x 128 tiles: 75.1,
  275.2, 151.9, 577.1). The backward's kernels each sum two products (`dG·Q + Q·dG`,
  `L·Q2 + M·∇2`); run as two loops into one accumulator (`one_loop=False`), their
  stages hold two operand tiles instead of four, and 64 x 128 tiles won at every case
  or were within 1% (86.7, 357.2, 194.8, 796.5 µs, against 97.7, 371.7, 221.0, 846.4
  for the one-loop 64 x 64 / 128 x 128 tiles used before). Forward and backward
  together: 157.6 -> 147.3 µs at b = 256 x 72, 354.4 -> 329.5 at b = 512 x 36,
  646.6 -> 593.7 at b = 256 x 320, 1424.9 -> 1321.5 at b = 512 x 160. 128 x 256 tiles
  lost everywhere (forward 178.8 against 60.6 µs at b = 256 x 72). Earlier sweeps
  (run 10, 22) had 128 x 128 tiles winning beyond 640 such programs; that was before
  the product loops only loaded and multiplied, and before the split loops. Not
  measured: b = 128, and layers of fewer than 36 blocks (a llama60m layer has 4–7),
  where 64 x 128 backward tiles give half the programs of 64 x 64.

  float32 operands (TF32 products; raw/run77_cayley_sweep_f32.txt): 64 x 64 tiles over
  4 warps, depth 32, three stages, the backward in two loops, for both directions:
  forward + backward 300.9 against 435.3 µs at b = 256 x 72, 999.2 against 1235.9 at
  b = 512 x 36, 1244.1 against 1477.4 at b = 256 x 320 for the 128 x 128, depth-32,
  two-stage, one-loop tiles used since run 10. 64 x 128 float32 tiles lost by 41–57%.
  Depth stays 32: 128 x 64 float32 steps failed the compiled kernel tests at b = 128
  and 256 in run 13 (raw/run13_gpu_tests.txt; the cause was not established). Small
  blocks use one tile.
  """
  del num_blocks  # no longer decides: the same tiles won from 36 to 320 blocks
  side = min(block_size, 64)
  if np.dtype(operand_dtype).itemsize == 2:
    if backward and block_size >= 128:
      return CayleyTiles(side=side, depth=64, num_warps=4, num_stages=3, cols=128)
    return CayleyTiles(side=side, depth=side, num_warps=4, num_stages=3)
  return CayleyTiles(side=side, depth=min(32, block_size), num_warps=4, num_stages=3)


def cayley_skew_tiles(block_size: int, num_blocks: int | None = None) -> CayleyTiles:
  """Tiles of the unpacking kernel (packed `q` to `Q`), which only moves data.

  Measured alone on the H100 (`benchmarks/cayley_sweep.py --data_kernels`,
  raw/run45_data_kernels.txt): 32 x 32 tiles over 4 warps beat the product kernels'
  64 x 64 up to a few thousand programs (12.0 against 16.1 µs at b = 256 x 72 blocks,
  5.3 against 6.9 at 30, 3.4 against 3.9 at 16); beyond about 8192 such programs
  64 x 128 tiles won (48.5 against 52.7 µs at b = 256 x 320, 24.6 against 25.4 at
  b = 512 x 36; not measured at b = 128). 128 x 128 tiles lost everywhere.
  """
  side = min(block_size, 32)
  programs = (num_blocks or 1 << 30) * (block_size // side) ** 2  # unknown: assume many, as above
  if block_size >= 128 and programs > 8192:
    return CayleyTiles(side=64, depth=64, num_warps=4, cols=128)
  return CayleyTiles(side=side, depth=side, num_warps=4)


def cayley_pack_tiles(block_size: int) -> CayleyTiles:
  """Tiles of the packing kernel, which holds two mirrored float32 tiles at once: 32 x 32.

  A kernel of its own: packing inside the kernel that computes `dQ` (each program
  computing a pair of mirrored 64 x 64 `dQ` tiles, so the dense float32 `dQ` never
  reached memory; commit 70ccc89) was measured against it (raw/run81_pack_forms.txt,
  backward device µs): bf16 87.8 -> 85.2 at b = 256 x 72 and 358.9 -> 329.9 at
  b = 256 x 320, but 195.4 -> 201.5 at b = 512 x 36 and 798.5 -> 813.8 at b = 512 x 160;
  float32 slower at all four (189.0 -> 206.0 at b = 256 x 72). Mixed, and small where our
  layers sit, so it was not kept.

  raw/run45_data_kernels.txt: 16.1 against 17.0 µs for 64 x 64 at b = 256 x 72 blocks,
  6.3 against 7.2 at 30, 4.4 against 5.5 at 16, 74.6 against 76.5 at 320; at b = 512
  x 36 it lost by 3.5% (35.4 against 34.2 µs for 64 x 64 over 8 warps; 128 x 128: 37.1).
  """
  side = min(block_size, 32)
  return CayleyTiles(side=side, depth=side, num_warps=4)


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class RotateOuterSumTiles:
  rows: int  # rows of one block per program: rotated rows, and cotangent rows (`rows x B`)
  tokens: int  # tokens per step
  num_warps: int
  num_stages: int = 2
  splits: int = 1  # token ranges run by separate programs, their partial cotangents added after


FUSED_MIN_RANGE_TOKENS = 1024  # the fewest tokens one range of the fused backward kernel sums
FUSED_MAX_BLOCK_BYTES = 512  # the widest block row (B · operand bytes) the fused kernel's tiles fit


def rotate_outer_sum_tiles(
    block_size: int, tokens: int, num_blocks: int | None = None, itemsize: int = 2
) -> RotateOuterSumTiles | None:
  """Tiles of the fused backward kernel (`kernels/rotate_outer_sum.py`), or None where
  the separate rotation and outer-sum kernels are faster.

  Two tilings, both 64-token steps: 128-row slices over 8 warps and three stages, or
  64-row slices over 4 warps and four stages. Either holds one program per
  multiprocessor, and per row and token they ran equally fast once the GPU was full
  (H100, bf16, device time of one side: raw/run83_fused_backward_sweep.txt,
  raw/run84_fused_backward_sweep.txt, raw/run86_fused_backward_tokens.txt):

  * 128 rows: 81.1 µs at D = 14336, N = 2048 (112 programs, 0.040 µs per token of a
    program's range); 439.3 µs at D = 5632, N = 32768 in 3 token ranges (132
    programs, 0.040).
  * 64 rows: 158.6 µs at D = 512, N = 131072 in 16 ranges (128 programs, 0.019);
    161.4 µs at D = 2048, N = 32768 in 4 ranges (128 programs, 0.020).
  * What hurt was an almost empty last wave: D = 1280, N = 131072 took 620.2 µs in 7
    ranges (140 programs: two waves) against 469.4 in 28; and each token range costs a
    partial sum added afterwards: 43.2 µs at D = 5632, N = 2048 with 128 rows in two
    ranges against 38.1 with 64 rows in one.

  So each tiling gets as many token ranges as fit in one wave (at least 1024 tokens
  each), its cost is its number of waves × tokens per range × rows, and the cheaper
  wins; within 5% of the cheapest, fewer ranges win, then 128 rows (81.1 against 105.2
  µs at D = 14336, N = 2048, where both cost one full 2048-token pass). Checked on the
  two cases the model alone picked (raw/run87_fused_backward_check.txt, N = 131072):
  at D = 1280, 128 rows in 13 ranges took 397.0 µs, 64 rows in 6 ranges 392.9; at
  D = 512 the model's first pick, 128 rows in 33 ranges (3% cheaper by the model),
  took 172.9 µs against 158.0 for 64 rows in 16, hence the 5%. Where these picks were
  measured the fused kernel took 24–40% less time than the pair (30.6 against 40.3 µs
  at D = 4096, N = 2048; 161.4 against 271.0 at D = 2048, N = 32768; 158.0 against
  239.4 at D = 512, N = 131072).

  b = 512: no tiling won (best 198.9 against 197.8 µs at 14336, 88.2 against 49.5 at
  4096, N = 2048): a program's `512 x tokens` operand tile and `rows x 512` cotangent
  leave too little shared memory and too few registers for a pipeline. None: the
  separate kernels run there. Blocks under 256 use the same rule, not swept.

  `itemsize`: bytes per element of the operands a program loads (the shared `B x
  tokens` tile, the other factor's `rows x tokens` tile and its `rows x B` slice of
  `G`, cast to the shared operand's dtype); its shared memory grows with
  `B · itemsize`: float32 at b = 256 asked for 368 KB, more than the H100's 227 KB,
  and failed to compile, where bfloat16 at 256 and float32 at 128 ran (`python -m
  benchmarks.dtype_fit`, raw/run121_dtype_fit.txt). So the fused kernel runs up to `B · itemsize` = 512
  bytes (bfloat16 to b = 256, float32 to b = 128), the separate kernels beyond.
  """
  if block_size > 256 or block_size * itemsize > FUSED_MAX_BLOCK_BYTES:
    return None
  choices = []
  for rows, warps, stages in ((128, 8, 3), (64, 4, 4)):
    rows = min(rows, block_size)
    programs = (num_blocks or 1 << 30) * (block_size // rows)
    splits = max(1, min(H100_SMS // programs, tokens // FUSED_MIN_RANGE_TOKENS))
    waves = math.ceil(programs * splits / H100_SMS)
    cost = waves * math.ceil(tokens / splits) * rows
    choices.append((cost, splits, -rows, RotateOuterSumTiles(rows, 64, warps, stages, splits)))
  cheapest = min(cost for cost, *_ in choices)
  near = [c for c in choices if c[0] <= 1.05 * cheapest]  # within the model's error: fewer ranges
  return min(near, key=lambda c: c[1:3])[3]
