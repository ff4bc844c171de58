"""Every Pallas kernel against its plain-jnp reference, forward and VJP, fresh random inputs.

One base class per kernel; subclasses run it interpreted on the CPU (always) and
compiled on a GPU (when there is one). Tolerances by dtype and mode in one place.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from poetx_jax import cayley, ops, skew
from poetx_jax.kernels import block_outer_sum, block_rotation, block_sizes, rotate_outer_sum
from poetx_jax.kernels import cayley_neumann as cayley_kernel
from poetx_jax.kernels import triton_backend

ON_GPU = jax.default_backend() == "gpu"

# Relative L2 error allowed: the interpreter runs float32 exactly; the GPU's float32
# dots are TF32; bfloat16 inputs round each product operand.
TOLERANCE = {("interpret", "float32"): 2e-5, ("gpu", "float32"): 3e-3, ("interpret", "bfloat16"): 2e-2, ("gpu", "bfloat16"): 2e-2}


class KernelCase:
  mode = "interpret"

  @property
  def interpret(self):
    return self.mode == "interpret"

  def tol(self, dtype):
    return TOLERANCE[(self.mode, jnp.dtype(dtype).name)]


class BlockRotationBase(KernelCase):
  @pytest.mark.parametrize("block,rows_blocks,tokens", [(16, 3, 37), (32, 2, 64), (64, 2, 5), (128, 1, 130)])
  @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
  @pytest.mark.parametrize("gather,scatter", [(False, False), (True, False), (False, True), (True, True)])
  @pytest.mark.parametrize("transpose", [False, True])
  def test_forward_and_vjp(self, rng, block, rows_blocks, tokens, dtype, gather, scatter, transpose):
    d = block * rows_blocks
    a = jnp.asarray(rng.standard_normal((d, tokens)), dtype)
    g = jnp.asarray(rng.standard_normal((rows_blocks, block, block)) / np.sqrt(block), jnp.float32)
    perm_g = jnp.asarray(rng.permutation(d), jnp.int32) if gather else None
    perm_s = jnp.asarray(rng.permutation(d), jnp.int32) if scatter else None
    fn = lambda a, g: block_rotation.block_rotate(a, g, gather=perm_g, scatter=perm_s, transpose=transpose, interpret=self.interpret)
    ref = lambda a, g: block_rotation.block_rotate_reference(a, g, perm_g, perm_s, transpose)
    out, vjp = jax.vjp(fn, a, g)
    out_ref, vjp_ref = jax.vjp(ref, a, g)
    assert out.dtype == a.dtype and out.shape == a.shape
    assert relative_error(out, out_ref) < self.tol(dtype)
    cot = jnp.asarray(rng.standard_normal(out.shape), dtype)
    for got, want in zip(vjp(cot), vjp_ref(cot)):
      assert relative_error(got, want) < self.tol(dtype)


  @pytest.mark.parametrize("transpose", [False, True])
  def test_block_offset_reads_later_blocks_and_zeroes_the_rest_of_dg(self, rng, transpose):
    """With `block_offset` the rotation uses `G[offset:offset+R]`; the other blocks get zero cotangents."""
    block, rows_blocks, tokens, offset = 32, 2, 40, 1
    d = block * rows_blocks
    a = jnp.asarray(rng.standard_normal((d, tokens)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((rows_blocks + 2, block, block)) / np.sqrt(block), jnp.float32)
    perm = jnp.asarray(rng.permutation(d), jnp.int32)
    fn = lambda a, g: block_rotation.block_rotate(
        a, g, gather=perm, transpose=transpose, interpret=self.interpret, block_offset=offset
    )
    ref = lambda a, g: block_rotation.block_rotate_reference(a, g[offset : offset + rows_blocks], perm, None, transpose)
    out, vjp = jax.vjp(fn, a, g)
    out_ref, vjp_ref = jax.vjp(ref, a, g)
    assert relative_error(out, out_ref) < self.tol("float32")
    cot = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    (da, dg), (da_ref, dg_ref) = vjp(cot), vjp_ref(cot)
    assert relative_error(da, da_ref) < self.tol("float32")
    assert relative_error(dg, dg_ref) < self.tol("float32")
    assert not jnp.any(dg[0]) and not jnp.any(dg[offset + rows_blocks :])

  def test_block_offset_past_the_end_raises(self):
    with pytest.raises(ValueError, match="block_offset"):
      block_rotation.block_rotate(jnp.zeros((64, 8)), jnp.zeros((2, 32, 32)), block_offset=1, interpret=True)


class BlockOuterSumBase(KernelCase):
  @pytest.mark.parametrize("block,rows_blocks,tokens", [(16, 3, 37), (32, 2, 100), (128, 1, 17)])
  @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
  @pytest.mark.parametrize("gather_a,gather_g", [(False, False), (True, False), (True, True)])
  def test_forward_and_vjp(self, rng, block, rows_blocks, tokens, dtype, gather_a, gather_g):
    d = block * rows_blocks
    a = jnp.asarray(rng.standard_normal((d, tokens)), dtype)
    g = jnp.asarray(rng.standard_normal((d, tokens)), dtype)
    pa = jnp.asarray(rng.permutation(d), jnp.int32) if gather_a else None
    pg = jnp.asarray(rng.permutation(d), jnp.int32) if gather_g else None
    fn = lambda a, g: block_outer_sum.block_outer_sum(a, pa, g, pg, block, interpret=self.interpret)
    ref = lambda a, g: block_outer_sum.block_outer_sum_reference(a, pa, g, pg, block)
    out, vjp = jax.vjp(fn, a, g)
    out_ref, vjp_ref = jax.vjp(ref, a, g)
    assert out.dtype == jnp.float32
    assert relative_error(out, out_ref) < self.tol(dtype)
    cot = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    for got, want in zip(vjp(cot), vjp_ref(cot)):
      assert relative_error(got, want) < self.tol(dtype)


  def test_into_writes_its_blocks_in_place_and_keeps_the_others(self, rng):
    """Two sums fill one buffer (a layer's two sides); a third call overwrites only its blocks."""
    block, tokens = 16, 33
    a1, g1 = (jnp.asarray(rng.standard_normal((2 * block, tokens)), jnp.float32) for _ in range(2))
    a2, g2 = (jnp.asarray(rng.standard_normal((3 * block, tokens)), jnp.float32) for _ in range(2))
    perm = jnp.asarray(rng.permutation(3 * block), jnp.int32)
    fresh = jax.ShapeDtypeStruct((5, block, block), jnp.float32)
    out = block_outer_sum.block_outer_sum_into(fresh, a1, None, g1, None, 3, interpret=self.interpret)
    out = block_outer_sum.block_outer_sum_into(out, a2, None, g2, perm, 0, interpret=self.interpret)
    want = jnp.concatenate([
        block_outer_sum.block_outer_sum_reference(a2, None, g2, perm, block),
        block_outer_sum.block_outer_sum_reference(a1, None, g1, None, block),
    ])
    assert relative_error(out, want) < self.tol("float32")
    again = block_outer_sum.block_outer_sum_into(out, g1, None, a1, None, 1, interpret=self.interpret)
    np.testing.assert_array_equal(again[0], out[0])
    np.testing.assert_array_equal(again[3:], out[3:])
    assert relative_error(again[1:3], block_outer_sum.block_outer_sum_reference(g1, None, a1, None, block)) < self.tol("float32")

  def test_copy_into_gets_the_same_blocks_rounded(self, rng):
    """The layer's outer sums also write dG in bfloat16 for the Cayley backward, in place too."""
    block, tokens = 16, 21
    a, g = (jnp.asarray(rng.standard_normal((2 * block, tokens)), jnp.float32) for _ in range(2))
    fresh = jax.ShapeDtypeStruct((4, block, block), jnp.float32)
    copy = jax.ShapeDtypeStruct((4, block, block), jnp.bfloat16)
    out, out_copy = block_outer_sum.block_outer_sum_into(fresh, a, None, g, None, 2, interpret=self.interpret, copy_into=copy)
    out, out_copy = block_outer_sum.block_outer_sum_into(out, g, None, a, None, 0, interpret=self.interpret, copy_into=out_copy)
    assert out_copy.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out_copy, out.astype(jnp.bfloat16))
    want = jnp.concatenate([
        block_outer_sum.block_outer_sum_reference(g, None, a, None, block),
        block_outer_sum.block_outer_sum_reference(a, None, g, None, block),
    ])
    assert relative_error(out, want) < self.tol("float32")

  def test_many_tokens_are_split_over_programs_and_their_sums_added(self, rng):
    """A narrow layer over a train step's tokens: token ranges summed by separate programs."""
    block, tokens = 16, 4100  # 2 blocks of one tile each: too few programs for one H100 wave
    assert block_sizes.outer_sum_tiles(block, tokens, num_blocks=2).splits == 2
    assert block_sizes.outer_sum_tiles(block, 2048, num_blocks=2).splits == 1  # the layer benchmark's N
    a, g = (jnp.asarray(rng.standard_normal((2 * block, tokens)), jnp.float32) for _ in range(2))
    perm = jnp.asarray(rng.permutation(2 * block), jnp.int32)
    fn = lambda a, g: block_outer_sum.block_outer_sum(a, perm, g, None, block, interpret=self.interpret)
    ref = lambda a, g: block_outer_sum.block_outer_sum_reference(a, perm, g, None, block)
    out, vjp = jax.vjp(fn, a, g)
    out_ref, vjp_ref = jax.vjp(ref, a, g)
    assert relative_error(out, out_ref) < self.tol("float32")
    cot = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    for got, want in zip(vjp(cot), vjp_ref(cot)):
      assert relative_error(got, want) < self.tol("float32")
    # in place, with the bfloat16 copy, as a layer's backward calls it
    fresh = jax.ShapeDtypeStruct((3, block, block), jnp.float32)
    copy = jax.ShapeDtypeStruct((3, block, block), jnp.bfloat16)
    into, into_copy = block_outer_sum.block_outer_sum_into(fresh, a, perm, g, None, 1, interpret=self.interpret, copy_into=copy)
    assert relative_error(into[1:], out_ref) < self.tol("float32")
    np.testing.assert_array_equal(into_copy, into.astype(jnp.bfloat16))
    # into a buffer holding other blocks: those stay as they were
    held = jnp.asarray(rng.standard_normal((4, block, block)), jnp.float32)
    held_copy = held.astype(jnp.bfloat16)
    again, again_copy = block_outer_sum.block_outer_sum_into(held, a, perm, g, None, 2, interpret=self.interpret, copy_into=held_copy)
    np.testing.assert_array_equal(again[:2], held[:2])
    np.testing.assert_array_equal(again_copy[:2], held_copy[:2])
    assert relative_error(again[2:], out_ref) < self.tol("float32")
    np.testing.assert_array_equal(again_copy[2:], again[2:].astype(jnp.bfloat16))

  @pytest.mark.parametrize("tokens,splits", [(100, 3), (100, 4), (37, 2), (10, 2), (16, 2)])
  def test_uneven_token_ranges(self, rng, tokens, splits):
    """Ranges rounded up to whole reduction steps: the last is shorter, or fewer ranges
    cover the tokens (100 in 4 ranges of 32 tokens: 4; 16 in 2: one range, no split)."""
    block = 16
    a, g = (jnp.asarray(rng.standard_normal((2 * block, tokens)), jnp.float32) for _ in range(2))
    tiles = block_sizes.OuterSumTiles(rows=16, cols=16, depth=16, num_warps=4, splits=splits)
    got = block_outer_sum._launch(a, None, g, None, block, self.interpret, tiles=tiles)  # pylint: disable=protected-access
    assert relative_error(got, block_outer_sum.block_outer_sum_reference(a, None, g, None, block)) < self.tol("float32")

  def test_into_without_room_raises(self):
    with pytest.raises(ValueError, match="room for 2 blocks"):
      block_outer_sum.block_outer_sum_into(
          jnp.zeros((2, 16, 16)), jnp.zeros((32, 4)), None, jnp.zeros((32, 4)), None, 1, interpret=True
      )


class RotateOuterSumBase(KernelCase):
  """The backward's fused rotation + cotangents against the two references, as the
  layer calls it on each side: in place into a buffer holding the other side's blocks,
  with its bfloat16 copy, over one token range or several."""

  @pytest.mark.parametrize("block,rows_blocks,tokens", [(16, 3, 37), (32, 2, 100), (64, 2, 5), (128, 1, 130)])
  @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
  @pytest.mark.parametrize("side", ["output", "input", "both gathers and a scatter"])
  @pytest.mark.parametrize("splits", [1, 3])
  def test_matches_the_rotation_and_outer_sum_references(self, rng, block, rows_blocks, tokens, dtype, side, splits):
    d, offset = block * rows_blocks, 2
    s, a = (jnp.asarray(rng.standard_normal((d, tokens)), dtype) for _ in range(2))
    g = jnp.asarray(rng.standard_normal((rows_blocks + offset + 1, block, block)) / np.sqrt(block), jnp.float32)
    perm = lambda: jnp.asarray(rng.permutation(d), jnp.int32)
    gather_s, gather_a, scatter = {
        "output": (perm(), None, None),  # dh from dy gathered, dG from h
        "input": (None, perm(), perm()),  # dx scattered from dxr, dG from x gathered
        "both gathers and a scatter": (perm(), perm(), perm()),
    }[side]
    held = jnp.asarray(rng.standard_normal(g.shape), jnp.float32)
    held_copy = held.astype(jnp.bfloat16)
    tiles = dataclasses.replace(block_sizes.rotate_outer_sum_tiles(block, tokens, rows_blocks), tokens=16, splits=splits)
    rot, dg, dg_copy = rotate_outer_sum.rotate_outer_sum_into(
        held, s, gather_s, a, gather_a, g, scatter, offset, interpret=self.interpret, copy_into=held_copy, tiles=tiles
    )
    rot_ref, dg_ref = rotate_outer_sum.rotate_outer_sum_reference(s, gather_s, a, gather_a, g, scatter, offset)
    assert rot.dtype == s.dtype and rot.shape == s.shape
    assert relative_error(rot, rot_ref) < self.tol(dtype)
    end = offset + rows_blocks
    assert relative_error(dg[offset:end], dg_ref) < self.tol(dtype)
    np.testing.assert_array_equal(dg[:offset], held[:offset])  # the other blocks are kept
    np.testing.assert_array_equal(dg[end:], held[end:])
    np.testing.assert_array_equal(dg_copy[:offset], held_copy[:offset])
    np.testing.assert_array_equal(dg_copy[offset:end], dg[offset:end].astype(jnp.bfloat16))

  @pytest.mark.parametrize("side", ["output", "input"])
  def test_fresh_buffer_and_the_xla_composition_agree(self, rng, side):
    """Into a fresh buffer, without a copy; and `rotation.rotate_outer_sum_into` (the XLA
    backend's, gathering the output by the inverse of the kernel's scatter) gives the same
    blocks, at a block offset, on either side's permutation pattern."""
    from poetx_jax import rotation

    block, rows_blocks, tokens, offset = 16, 2, 40, 1
    d = block * rows_blocks
    s, a = (jnp.asarray(rng.standard_normal((d, tokens)), jnp.float32) for _ in range(2))
    g = jnp.asarray(rng.standard_normal((rows_blocks + offset, block, block)), jnp.float32)
    perm_1, perm_2 = (jnp.asarray(rng.permutation(d), jnp.int32) for _ in range(2))
    gather_s, gather_a, scatter = (perm_1, None, None) if side == "output" else (None, perm_1, perm_2)
    out_perm = None if scatter is None else jnp.argsort(scatter)
    fresh = jax.ShapeDtypeStruct(g.shape, jnp.float32)
    rot, dg = rotate_outer_sum.rotate_outer_sum_into(fresh, s, gather_s, a, gather_a, g, scatter, offset, interpret=self.interpret)
    rot_xla, dg_xla = rotation.rotate_outer_sum_into(fresh, s, gather_s, a, gather_a, g, offset, out_perm, scatter)
    assert relative_error(rot, rot_xla) < self.tol("float32")
    assert relative_error(dg[offset:], dg_xla[offset:]) < self.tol("float32")

  def test_the_rule_s_64_token_steps_over_several_ranges(self, rng):
    """The production step width (64 tokens) with ranges of uneven length, in bfloat16."""
    block, rows_blocks, tokens = 32, 2, 150  # ranges of 64, 64, 22 tokens
    d = block * rows_blocks
    s, a = (jnp.asarray(rng.standard_normal((d, tokens)), jnp.bfloat16) for _ in range(2))
    g = jnp.asarray(rng.standard_normal((rows_blocks, block, block)) / np.sqrt(block), jnp.float32)
    gather_s = jnp.asarray(rng.permutation(d), jnp.int32)
    tiles = dataclasses.replace(block_sizes.rotate_outer_sum_tiles(block, tokens, rows_blocks), splits=3)
    assert tiles.tokens == 64
    fresh = jax.ShapeDtypeStruct(g.shape, jnp.float32)
    rot, dg = rotate_outer_sum.rotate_outer_sum_into(fresh, s, gather_s, a, None, g, None, 0, interpret=self.interpret, tiles=tiles)
    rot_ref, dg_ref = rotate_outer_sum.rotate_outer_sum_reference(s, gather_s, a, None, g, None)
    assert relative_error(rot, rot_ref) < self.tol("bfloat16")
    assert relative_error(dg, dg_ref) < self.tol("bfloat16")

  def test_split_ranges_into_fresh_buffers(self, rng):
    """A layer's first side: fresh result buffers, several token ranges; its blocks are right."""
    block, rows_blocks, tokens, offset = 16, 2, 70, 1
    d = block * rows_blocks
    s, a = (jnp.asarray(rng.standard_normal((d, tokens)), jnp.float32) for _ in range(2))
    g = jnp.asarray(rng.standard_normal((4, block, block)) / np.sqrt(block), jnp.float32)
    gather_s = jnp.asarray(rng.permutation(d), jnp.int32)
    tiles = block_sizes.RotateOuterSumTiles(rows=16, tokens=16, num_warps=4, num_stages=2, splits=3)
    fresh, copy = jax.ShapeDtypeStruct(g.shape, jnp.float32), jax.ShapeDtypeStruct(g.shape, jnp.bfloat16)
    rot, dg, dg_copy = rotate_outer_sum.rotate_outer_sum_into(
        fresh, s, gather_s, a, None, g, None, offset, interpret=self.interpret, copy_into=copy, tiles=tiles
    )
    rot_ref, dg_ref = rotate_outer_sum.rotate_outer_sum_reference(s, gather_s, a, None, g, None, offset)
    assert dg.shape == g.shape and dg_copy.dtype == jnp.bfloat16
    assert relative_error(rot, rot_ref) < self.tol("float32")
    assert relative_error(dg[offset:offset + rows_blocks], dg_ref) < self.tol("float32")
    np.testing.assert_array_equal(dg_copy[offset:offset + rows_blocks], dg[offset:offset + rows_blocks].astype(jnp.bfloat16))

  def test_at_b512_the_separate_kernels_run_and_agree(self, rng):
    """b = 512 measured slower fused: the rule says so, and the pair gives the same results."""
    assert block_sizes.rotate_outer_sum_tiles(512, 2048, 28) is None
    assert block_sizes.rotate_outer_sum_tiles(256, 2048, 56).rows == 128
    block, tokens = 512, 20
    s, a = (jnp.asarray(rng.standard_normal((block, tokens)), jnp.float32) for _ in range(2))
    g = jnp.asarray(rng.standard_normal((2, block, block)) / np.sqrt(block), jnp.float32)
    gather_s = jnp.asarray(rng.permutation(block), jnp.int32)
    held = jnp.asarray(rng.standard_normal(g.shape), jnp.float32)
    rot, dg = rotate_outer_sum.rotate_outer_sum_into(held, s, gather_s, a, None, g, None, 1, interpret=self.interpret)
    rot_ref, dg_ref = rotate_outer_sum.rotate_outer_sum_reference(s, gather_s, a, None, g, None, 1)
    assert relative_error(rot, rot_ref) < self.tol("float32")
    assert relative_error(dg[1:], dg_ref) < self.tol("float32")
    np.testing.assert_array_equal(dg[0], held[0])

  @pytest.mark.parametrize("rows,tokens,want_rows,want_splits", [
      (14336, 2048, 128, 1), (5632, 2048, 64, 1), (4096, 2048, 64, 2),  # the layer benchmark's sides
      (5632, 32768, 128, 3), (2048, 32768, 64, 4),  # llama1b's microbatch
      (1280, 131072, 128, 13), (512, 131072, 64, 16),  # llama60m's step
  ])
  def test_tile_rule_picks_the_measured_winners(self, rows, tokens, want_rows, want_splits):
    """The rule's picks at the swept shapes, each at most 1.1% slower than the fastest measured
    there (raw/run83, run84, run86, run87; at D = 1280 it picks 397.0 µs, 392.9 measured)."""
    tiles = block_sizes.rotate_outer_sum_tiles(256, tokens, rows // 256)
    assert (tiles.rows, tiles.splits) == (want_rows, want_splits)
    programs = (rows // 256) * (256 // tiles.rows) * tiles.splits
    assert programs <= block_sizes.H100_SMS or tiles.splits == 1  # split ranges fill at most one wave

  def test_bad_buffers_raise(self):
    s = jnp.zeros((32, 4))
    with pytest.raises(ValueError, match="float32"):
      rotate_outer_sum.rotate_outer_sum_into(jnp.zeros((2, 16, 16), jnp.bfloat16), s, None, s, None, jnp.zeros((2, 16, 16)), None, 0, interpret=True)
    with pytest.raises(ValueError, match="same"):
      rotate_outer_sum.rotate_outer_sum_into(jnp.zeros((2, 16, 16)), s, None, jnp.zeros((32, 5)), None, jnp.zeros((2, 16, 16)), None, 0, interpret=True)


class CayleyNeumannBase(KernelCase):
  @pytest.mark.parametrize("block,blocks", [(16, 3), (32, 2), (64, 2), (128, 1), (256, 1)])
  @pytest.mark.parametrize("scale", [0.01, 0.2])
  @pytest.mark.parametrize("operand_dtype", ["float32", "bfloat16"])
  def test_forward_and_vjp(self, rng, block, blocks, scale, operand_dtype):
    if self.interpret and block == 256 and operand_dtype == "float32":
      pytest.skip("b = 256 covers the multi-tile bf16 path; float32 adds interpreter time only")
    q = jnp.asarray(scale * rng.standard_normal((blocks, skew.packed_size(block))), jnp.float32)
    fn = lambda v: cayley_kernel.cayley_neumann(v, block, operand_dtype=operand_dtype, interpret=self.interpret)
    ref = lambda v: cayley.cayley_neumann_reference(v, block, 3)
    out, vjp = jax.vjp(fn, q)
    out_ref, vjp_ref = jax.vjp(ref, q)
    assert out.dtype == jnp.float32
    # G = I + (small): compare the deviation from I, which is what rounding can touch.
    eye = jnp.eye(block)
    assert relative_error(out - eye, out_ref - eye) < self.tol(operand_dtype)
    cot = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    assert relative_error(vjp(cot)[0], vjp_ref(cot)[0]) < self.tol(operand_dtype)

  def test_bfloat16_operands_round_only_the_square_terms(self, rng):
    """With bf16 operands the error sits in the Q² terms: far below bf16 rounding of G itself."""
    block = 64
    q = jnp.asarray(0.02 * rng.standard_normal((2, skew.packed_size(block))), jnp.float32)
    got = cayley_kernel.cayley_neumann(q, block, operand_dtype=jnp.bfloat16, interpret=self.interpret)
    want = cayley.cayley_neumann_reference(q, block, 3)
    rounding_of_g = jnp.max(jnp.abs(want.astype(jnp.bfloat16).astype(jnp.float32) - want))
    assert jnp.max(jnp.abs(got - want)) < 0.25 * rounding_of_g
    # With Q ten times smaller the Q² terms shrink a hundredfold: what is left must be far
    # below what rounding 2Q itself to bf16 would cost, so 2Q really enters exactly.
    q_small = q / 10
    got = cayley_kernel.cayley_neumann(q_small, block, operand_dtype=jnp.bfloat16, interpret=self.interpret)
    want = cayley.cayley_neumann_reference(q_small, block, 3)
    two_q = 2 * skew.skew_from_packed(q_small, block)
    rounding_of_2q = jnp.max(jnp.abs(two_q.astype(jnp.bfloat16).astype(jnp.float32) - two_q))
    assert jnp.max(jnp.abs(got - want)) < 0.25 * rounding_of_2q

  @pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
  def test_split_forward_and_backward_match_the_differentiable_map(self, rng, out_dtype):
    """What a layer's own VJP uses: `G` stored in `out_dtype`, `dq` from a float32 `dG`."""
    block, blocks = 64, 3
    q = jnp.asarray(0.1 * rng.standard_normal((blocks, skew.packed_size(block))), jnp.float32)
    kw = dict(operand_dtype=jnp.bfloat16, interpret=self.interpret)
    g_full, vjp = jax.vjp(lambda v: cayley_kernel.cayley_neumann(v, block, **kw), q)
    g = cayley_kernel.cayley_neumann_forward(q, block, out_dtype=out_dtype, **kw)
    assert g.dtype == jnp.dtype(out_dtype)
    np.testing.assert_array_equal(g, g_full.astype(out_dtype))
    dg = jnp.asarray(rng.standard_normal(g.shape), jnp.float32)
    np.testing.assert_array_equal(cayley_kernel.cayley_neumann_backward(q, dg, block, **kw), vjp(dg)[0])
    # Kept state: the same G, and the same dq with the backward's first two kernels skipped.
    g_kept, state = cayley_kernel.cayley_neumann_forward(q, block, out_dtype=out_dtype, keep_state=True, **kw)
    np.testing.assert_array_equal(g_kept, g)
    q_dense = skew.skew_from_packed(q, block)
    assert relative_error(state[0].astype(jnp.float32), q_dense) < 1e-2
    assert relative_error(state[2].astype(jnp.float32), q_dense @ q_dense - 2 * q_dense) < 1e-2
    np.testing.assert_array_equal(cayley_kernel.cayley_neumann_backward(q, dg, block, state=state, **kw), vjp(dg)[0])
    given = cayley_kernel.cayley_neumann_backward(q, dg, block, state=state, dg_operand=dg.astype(jnp.bfloat16), **kw)
    np.testing.assert_array_equal(given, vjp(dg)[0])
    with pytest.raises(ValueError, match="dg_operand"):
      cayley_kernel.cayley_neumann_backward(q, dg, block, dg_operand=dg, **kw)

  @pytest.mark.parametrize("tiles", [
      block_sizes.CayleyTiles(side=16, depth=16, num_warps=4, one_loop=True),
      block_sizes.CayleyTiles(side=16, depth=16, num_warps=4),
      block_sizes.CayleyTiles(side=16, depth=16, num_warps=4, cols=32),
  ], ids=["one_loop", "two_loops", "16x32"])
  def test_every_backward_tiling_gives_the_reference_gradient(self, rng, tiles):
    """The two-product kernels summed in one loop or two, over square or wide tiles."""
    block, blocks = 32, 2
    q = jnp.asarray(0.2 * rng.standard_normal((blocks, skew.packed_size(block))), jnp.float32)
    dg = jnp.asarray(rng.standard_normal((blocks, block, block)), jnp.float32)
    highest = jax.lax.Precision.HIGHEST
    got = cayley_kernel._backward(q, dg, block, jnp.dtype(jnp.float32), highest, self.interpret, tiles)  # pylint: disable=protected-access
    with jax.default_matmul_precision("highest"):
      _, vjp_ref = jax.vjp(lambda v: cayley.cayley_neumann_reference(v, block, 3), q)
      want = vjp_ref(dg)[0]
    assert relative_error(got, want) < 2e-5

  def test_tiles_that_do_not_divide_the_block_raise(self, rng):
    q = jnp.zeros((1, skew.packed_size(64)), jnp.float32)
    wide = block_sizes.CayleyTiles(side=64, depth=32, num_warps=4, cols=128)
    with pytest.raises(ValueError, match="do not divide block size 64"):
      cayley_kernel._forward(q, 64, jnp.dtype(jnp.float32), None, self.interpret, wide)  # pylint: disable=protected-access

  def test_tiles_chosen_per_operand_dtype(self):
    """The measured rule (runs 72, 77): 64 x 64 tiles, the backward's two-product kernels in
    two loops; bfloat16 backward tiles 64 x 128 from b = 128 on; float32 depth 32."""
    assert block_sizes.cayley_tiles(512, "bfloat16", 36).width == 64
    backward = block_sizes.cayley_tiles(512, "bfloat16", 36, backward=True)
    assert (backward.side, backward.width, backward.one_loop) == (64, 128, False)
    assert block_sizes.cayley_tiles(64, "bfloat16", backward=True).width == 64
    f32 = block_sizes.cayley_tiles(256, "float32", backward=True)
    assert (f32.side, f32.width, f32.depth, f32.one_loop) == (64, 64, 32, False)
    assert block_sizes.cayley_tiles(16, "float32").side == 16

  @pytest.mark.parametrize("num_blocks", [1, 600])
  def test_unpacking_tiles_build_the_skew_blocks(self, rng, num_blocks):
    """Both tilings `cayley_skew_tiles` picks (32 x 32; 64 x 128 for many blocks) write exactly `Q`."""
    block = 128
    tiles = block_sizes.cayley_skew_tiles(block, num_blocks)
    assert tiles.width == (128 if num_blocks == 600 else 32)  # both tilings are covered
    q = jnp.asarray(rng.standard_normal((2, skew.packed_size(block))), jnp.float32)
    out = cayley_kernel._square_blocks(  # pylint: disable=protected-access
        cayley_kernel._skew_kernel, "skew", 2, block, tiles, self.interpret, (jnp.float32,), q  # pylint: disable=protected-access
    )
    np.testing.assert_array_equal(out, skew.skew_from_packed(q, block))

  def test_a_float32_layer_at_highest_precision_matches_the_reference(self, rng):
    """`precision=HIGHEST` reaches the Cayley kernels too: on a GPU the Pallas layer then
    matches the float32 reference as closely as the interpreter does, not to TF32."""
    block, d_in, d_out, tokens = 32, 64, 96, 50
    e = skew.packed_size(block)
    args = (
        jnp.asarray(rng.standard_normal((d_in, d_out)) / 8, jnp.float32),
        jnp.asarray(0.2 * rng.standard_normal((d_in // block, e)), jnp.float32),
        jnp.asarray(0.2 * rng.standard_normal((d_out // block, e)), jnp.float32),
        jnp.asarray(rng.permutation(d_in), jnp.int32),
        jnp.asarray(rng.permutation(d_out), jnp.int32),
    )
    x = jnp.asarray(rng.standard_normal((tokens, d_in)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((tokens, d_out)), jnp.float32)
    highest = jax.lax.Precision.HIGHEST
    layer = lambda x, qi, qo: ops.poet_linear(
        x, args[0], qi, qo, args[3], args[4], block_size=block, implementation="pallas", interpret=self.interpret,
        precision=highest,
    )
    with jax.default_matmul_precision("highest"):  # the reference's own products in IEEE float32
      reference = lambda x, qi, qo: ops.poet_linear_reference(x, args[0], qi, qo, args[3], args[4], block_size=block)
      want, want_vjp = jax.vjp(reference, x, args[1], args[2])
      want_grads = want_vjp(dy)
    got, got_vjp = jax.vjp(layer, x, args[1], args[2])
    assert relative_error(got, want) < 2e-5
    for g, w in zip(got_vjp(dy), want_grads):
      assert relative_error(g, w) < 2e-5

  def test_zero_is_identity(self):
    out = cayley_kernel.cayley_neumann(jnp.zeros((2, skew.packed_size(32))), 32, interpret=self.interpret)
    np.testing.assert_array_equal(out, jnp.broadcast_to(jnp.eye(32), (2, 32, 32)))

  def test_bad_block_size_raises(self):
    with pytest.raises(ValueError, match="power-of-two block size"):
      cayley_kernel.cayley_neumann(jnp.zeros((1, skew.packed_size(24))), 24, interpret=True)


class TestBlockRotationInterpret(BlockRotationBase):
  mode = "interpret"


class TestBlockOuterSumInterpret(BlockOuterSumBase):
  mode = "interpret"


class TestCayleyNeumannInterpret(CayleyNeumannBase):
  mode = "interpret"


class TestRotateOuterSumInterpret(RotateOuterSumBase):
  mode = "interpret"


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
class TestBlockRotationGPU(BlockRotationBase):
  mode = "gpu"


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
class TestBlockOuterSumGPU(BlockOuterSumBase):
  mode = "gpu"


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
class TestCayleyNeumannGPU(CayleyNeumannBase):
  mode = "gpu"


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
class TestRotateOuterSumGPU(RotateOuterSumBase):
  mode = "gpu"


@pytest.mark.parametrize("block", [32, 64, 128, 256, 512])
def test_every_kernel_lowers_to_triton_for_an_h100(block):
  """Catches Triton lowering errors (tile shapes, dtypes, indexing) on a CPU-only machine."""
  blocks, tokens = 2, 200
  a = jax.ShapeDtypeStruct((blocks * block, tokens), jnp.bfloat16)
  g = jax.ShapeDtypeStruct((blocks, block, block), jnp.float32)
  p = jax.ShapeDtypeStruct((blocks * block,), jnp.int32)
  q = jax.ShapeDtypeStruct((blocks, skew.packed_size(block)), jnp.float32)
  def forward_and_vjp(fn, primals, cotangent):
    out, vjp = jax.vjp(fn, *primals)
    return out, vjp(cotangent)

  rotate = lambda a, g, p: forward_and_vjp(lambda a, g: block_rotation.block_rotate(a, g, gather=p), (a, g), a)
  cayley_fb = lambda q, g: forward_and_vjp(
      lambda v: cayley_kernel.cayley_neumann(v, block, operand_dtype=jnp.bfloat16), (q,), g
  )
  cayley_fb_f32 = lambda q, g: forward_and_vjp(lambda v: cayley_kernel.cayley_neumann(v, block), (q,), g)
  def two_sided_sums(a, p):  # a layer's backward: float32 and bf16 buffers, filled in place by two calls
    fresh = jax.ShapeDtypeStruct((2 * blocks, block, block), jnp.float32)
    copy = jax.ShapeDtypeStruct((2 * blocks, block, block), jnp.bfloat16)
    out, copy = block_outer_sum.block_outer_sum_into(fresh, a, None, a, p, blocks, copy_into=copy)
    return block_outer_sum.block_outer_sum_into(out, a, p, a, None, 0, copy_into=copy)

  def fused_sides(a, g, p):  # the layer's backward: both sides fused, the first into a fresh buffer
    fresh = jax.ShapeDtypeStruct((2 * blocks, block, block), jnp.float32)
    copy = jax.ShapeDtypeStruct((2 * blocks, block, block), jnp.bfloat16)
    g2 = jnp.concatenate([g, g])
    dh, out, copy = rotate_outer_sum.rotate_outer_sum_into(fresh, a, p, a, None, g2, None, blocks, copy_into=copy)
    return dh, rotate_outer_sum.rotate_outer_sum_into(out, dh, None, a, p, g2, p, 0, copy_into=copy)

  # b = 512 runs the separate kernels (measured faster there)
  fused_names = ("poetx_rotate_outer_sum",) if block <= 256 else ("poetx_block_rotate", "poetx_block_outer_sum")
  bf16_blocks = lambda q: cayley_kernel.cayley_neumann_forward(q, block, operand_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16)
  many_tokens = jax.ShapeDtypeStruct((blocks * block, 5000), jnp.bfloat16)  # a train step's: split over programs
  assert block_sizes.outer_sum_tiles(block, 5000, blocks).splits > 1
  for fn, args, names in (
      (rotate, (a, g, p), ("poetx_block_rotate", "poetx_block_outer_sum")),
      (two_sided_sums, (a, p), ("poetx_block_outer_sum",)),
      (two_sided_sums, (many_tokens, p), ("poetx_block_outer_sum",)),
      (fused_sides, (a, g, p), fused_names),
      (fused_sides, (many_tokens, g, p), fused_names),
      (bf16_blocks, (q,), ("poetx_cayley_neumann",)),
      (cayley_fb, (q, g), ("poetx_cayley_square", "poetx_cayley_neumann", "poetx_cayley_grad2", "poetx_cayley_dq",
                           "poetx_cayley_pack")),
      (cayley_fb_f32, (q, g), ("poetx_cayley_grad2", "poetx_cayley_dq")),
  ):
    module = triton_backend.lower_for_h100(fn, *args)
    for name in names:
      assert f'name = "{name}"' in module, name


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_and_blocks"])
@pytest.mark.parametrize("variant,keep_cayley_state", [("fast", False), ("mem", False), ("fast", True), ("mem", True)])
def test_rematerialized_train_step_launches_each_kernel_the_expected_number_of_times(variant, keep_cayley_state, policy):
  """A wrapped two-layer model's jitted, rematerialized loss + gradient, lowered for an H100.

  Per wrapped layer: the forward runs 2 rotations (gather, scatter) and, for both sides
  at once, the 3 Cayley–Neumann forward kernels (unpack, square, Neumann); the backward
  runs, per side, its rotation fused with its outer sum, and 3 Cayley kernels (∇2, dense dQ, packing), plus
  unpack and square again unless `keep_cayley_state` kept their results.
  Rematerialization (`jax.checkpoint`) re-runs the forward inside the backward, keeping
  only what the backward needs; with nothing saved, all of it. A policy that saves dots
  and the blocks' checkpoint name keeps the large GEMM's output `h` and the blocks `G`,
  so only the output rotation runs again.
  """
  from poetx_jax import ops

  dots_and_blocks = jax.checkpoint_policies.save_from_both_policies(
      jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      jax.checkpoint_policies.save_only_these_names(ops.BLOCKS_CHECKPOINT_NAME),
  )

  import flax.linen as nn
  import poetx_jax

  class TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(64, use_bias=False, name="b")(jnp.tanh(nn.Dense(64, use_bias=False, name="a")(x)))

  config = poetx_jax.POETConfig(
      block_size=32, implementation="pallas", exclude=r"^$", variant=variant, keep_cayley_state=keep_cayley_state
  )
  model = poetx_jax.wrap(TwoLayers(), config)
  x = jnp.ones((40, 64), jnp.bfloat16)
  shapes_only = poetx_jax.wrap(TwoLayers(), dataclasses.replace(config, implementation="xla"))
  variables = jax.eval_shape(lambda: shapes_only.init(jax.random.key(0), x))

  def train_step(variables, x):
    loss = jax.checkpoint(lambda params: jnp.sum(model.apply({**variables, "params": params}, x).astype(jnp.float32) ** 2),
                          policy=None if policy == "nothing_saveable" else dots_and_blocks)
    return jax.value_and_grad(loss)(variables["params"])

  module = triton_backend.lower_for_h100(train_step, variables, jax.ShapeDtypeStruct(x.shape, x.dtype))
  layers = 2
  recomputed = 1 if variant == "mem" else 0
  cayley_again = 0 if keep_cayley_state else 1
  forward_again = 1 if policy == "nothing_saveable" else 0  # the Cayley forward and the input rotation
  expected = {
      # forward and forward again (remat); mem's backward rotates the input again to
      # recompute h. The backward's rotations are fused with its outer sums, so the first
      # layer's `dx`, which nothing reads, is still computed (apart, XLA dropped that one
      # rotation as dead code: one launch of 12 in this model, none in a LLaMA model,
      # whose first wrapped layers' inputs carry the embedding's gradient).
      "poetx_block_rotate": layers * (2 + 1 + forward_again + recomputed),
      "poetx_block_outer_sum": 0,  # fused with the backward's rotations:
      "poetx_rotate_outer_sum": layers * 2,  # one per side
      "poetx_cayley_skew": layers * (1 + forward_again + cayley_again),  # forward, (forward again), (backward)
      "poetx_cayley_square": layers * (1 + forward_again + cayley_again),
      "poetx_cayley_neumann": layers * (1 + forward_again),
      "poetx_cayley_grad2": layers,
      "poetx_cayley_dq": layers,
      "poetx_cayley_pack": layers,
  }
  counts = {name: module.count(f'name = "{name}"') for name in expected}
  assert counts == expected


@pytest.mark.parametrize("dtype,block,fused", [("bfloat16", 256, True), ("float32", 128, True), ("float32", 256, False),
                                                ("bfloat16", 512, False)])
def test_the_backward_fuses_its_sides_only_where_the_tiles_fit(dtype, block, fused):
  """The fused kernel's shared memory grows with `B · itemsize`: float32 at b = 256 asked
  the H100 for 368 KB of 227 and failed to compile (raw/run121_dtype_fit.txt), so there,
  as at b = 512, the layer lowered for an H100 runs the separate rotation and outer sum."""
  from poetx_jax import ops

  d, tokens = 2 * block, 64
  args = [jax.ShapeDtypeStruct((tokens, d), dtype), jax.ShapeDtypeStruct((d, d), dtype)]
  args += [jax.ShapeDtypeStruct((d // block, skew.packed_size(block)), jnp.float32)] * 2
  args += [jax.ShapeDtypeStruct((d,), jnp.int32)] * 2

  def loss(x, k, q_in, q_out, perm_in, perm_out):
    y = ops.poet_linear(x, k, q_in, q_out, perm_in, perm_out, block_size=block, implementation="pallas")
    return jnp.sum(y.astype(jnp.float32) ** 2)

  module = triton_backend.lower_for_h100(jax.grad(loss, argnums=(0, 2, 3)), *args)
  fused_sides, outer_sums = module.count('name = "poetx_rotate_outer_sum"'), module.count('name = "poetx_block_outer_sum"')
  assert (fused_sides, outer_sums) == ((2, 0) if fused else (0, 2))


def test_gemm_baseline_kernel_matches_xla_interpreted(rng):
  """The Pallas GEMM that benchmarks/gemm_baseline.py times against XLA computes `K_sᵀ·xrᵀ`."""
  from benchmarks import gemm_baseline

  k = jnp.asarray(rng.standard_normal((64, 96)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
  tiles = gemm_baseline.GemmTiles(rows=32, tokens=16, depth=16, num_warps=4, num_stages=2)
  got = gemm_baseline.pallas_kt_x(k, x, tiles, interpret=True)
  assert relative_error(got, jnp.matmul(k.T, x, precision="highest")) < 2e-5
  with pytest.raises(ValueError, match="not multiples"):
    gemm_baseline.pallas_kt_x(k[:, :90], x, tiles, interpret=True)
  for t in gemm_baseline.TILINGS:  # every timed tiling lowers for an H100
    args = (jax.ShapeDtypeStruct((512, 512), jnp.bfloat16), jax.ShapeDtypeStruct((512, 256), jnp.bfloat16))
    assert "poetx_gemm_baseline" in triton_backend.lower_for_h100(lambda a, b, t=t: gemm_baseline.pallas_kt_x(a, b, t), *args)
