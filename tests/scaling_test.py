"""The scaling benchmark's step on 1–8 fake CPU devices: it runs, and merges keep replicas identical."""

from conftest import needs_8_devices

from benchmarks import scaling


@needs_8_devices
def test_scaling_runs_and_replicas_merge_identically(tmp_path):
  records = scaling.main([
      "--model", "tiny", "--methods", "poetx", "--gpus", "1,8", "--per_device_batch", "2", "--seq_len", "32",
      "--steps", "2", "--merge_interval", "2", "--block_size", "32", "--dtype", "float32",
      "--out", str(tmp_path / "scaling.json"),
  ])
  assert [r["gpus"] for r in records] == [1, 8]
  assert all(r["replicas_identical_after_merge"] for r in records)
  assert records[0]["efficiency"] == 1.0 and records[1]["tokens_per_sec_per_gpu"] > 0


@needs_8_devices
def test_replica_check_detects_a_difference():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  shards = [jax.device_put(np.full((4,), i == 3, np.float32), d) for i, d in enumerate(jax.devices())]
  broken = jax.make_array_from_single_device_arrays((4,), NamedSharding(mesh, PartitionSpec()), shards)
  same = jax.device_put(jnp.ones((4,)), NamedSharding(mesh, PartitionSpec()))
  assert scaling.replicas_identical({"a": same}) and not scaling.replicas_identical({"a": broken})


def test_profile_kinds_put_communication_apart():
  """`--profile` sorts NCCL kernels (named `ncclDevKernel_...` or `ncclKernel_...`) out of the other kinds."""
  assert scaling.kernel_kind("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevComm*, unsigned long, ncclWork*)") == "collective"
  assert scaling.kernel_kind("ncclKernel_AllGather_RING_LL_Sum_int8_t") == "collective"
  assert scaling.kernel_kind("nvjet_sm90_tst_128x128_64x6_1x2_h_bz_NTT") == "gemm"
  assert scaling.kernel_kind("poetx_cayley_dq") == "cayley"
  assert scaling.kernel_kind("loop_select_fusion_14") == "other fusions"
