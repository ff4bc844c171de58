"""Under a mesh, POET-X layers run on each device's own tokens, on either implementation.

XLA cannot partition a Pallas kernel; without `shard_map` every device would gather
and rotate the whole global batch. The XLA path, left to XLA's partitioner, aborted
the process in a scanned model on a 2-D mesh. These run on the 8 fake CPU devices of
conftest, with the kernels interpreted.
"""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_8_devices, relative_error
from jax.sharding import NamedSharding, PartitionSpec as P

from poetx_jax import ops, skew

pytestmark = needs_8_devices

BLOCK, D_IN, D_OUT = 16, 32, 48


@pytest.fixture(name="layer_inputs")
def _layer_inputs(rng):
  return dict(
      x=jnp.asarray(rng.standard_normal((16, 3, D_IN)), jnp.float32),
      base=jnp.asarray(rng.standard_normal((D_IN, D_OUT)) / 6, jnp.float32),
      q_in=jnp.asarray(0.1 * rng.standard_normal((D_IN // BLOCK, skew.packed_size(BLOCK))), jnp.float32),
      q_out=jnp.asarray(0.1 * rng.standard_normal((D_OUT // BLOCK, skew.packed_size(BLOCK))), jnp.float32),
      perm_in=jnp.asarray(rng.permutation(D_IN), jnp.int32),
      perm_out=jnp.asarray(rng.permutation(D_OUT), jnp.int32),
  )


def _loss_and_grads(a, implementation="pallas", batch_axes=None, x=None):
  def loss(x, q_in, q_out):
    y = ops.poet_linear(
        x, a["base"], q_in, q_out, a["perm_in"], a["perm_out"], block_size=BLOCK,
        implementation=implementation, interpret=True, batch_axes=batch_axes,
    )
    # Terms of one sign: a sum that can cancel to near zero makes its relative error
    # depend on summation order, not on the kernels (sum(sin(y)) once read 1.0057e-5).
    return jnp.sum(jnp.sin(y) ** 2)

  return jax.value_and_grad(loss, argnums=(0, 1, 2))(a["x"] if x is None else x, a["q_in"], a["q_out"])


def _primitives(jaxpr, inside=None, found=None):
  """Names of the primitives of a jaxpr, each paired with whether it sits inside a shard_map."""
  found = set() if found is None else found
  for eqn in jaxpr.eqns:
    found.add((eqn.primitive.name, bool(inside)))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _primitives(sub, inside or eqn.primitive.name == "shard_map", found)
  return found


def _mesh():
  return jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_sharded_pallas_layer_equals_the_unsharded_one(layer_inputs):
  mesh = _mesh()
  x = jax.device_put(layer_inputs["x"], NamedSharding(mesh, P(("data", "fsdp"))))

  def step(x):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return _loss_and_grads(layer_inputs, x=x)

  (loss, grads), (loss_ref, grads_ref) = jax.jit(step)(x), _loss_and_grads(layer_inputs)
  assert relative_error(loss, loss_ref) < 1e-5
  for got, want in zip(grads, grads_ref):  # q cotangents are summed over all 8 devices' tokens
    assert relative_error(got, want) < 1e-5
  found = _primitives(jax.make_jaxpr(step)(x).jaxpr)
  assert ("pallas_call", True) in found and ("pallas_call", False) not in found


def test_under_a_mesh_layers_reading_one_input_save_it_once(layer_inputs, capsys):
  """The devices split x's own leading axis, so x reaches the layer as the caller's array
  and is saved by reference: q/k/v-like layers share it (a flattened copy would be saved,
  and stacked under `nn.scan`, once per layer)."""
  import jax.ad_checkpoint

  a = layer_inputs
  mesh = _mesh()
  weights = jnp.ones(a["x"].shape[:-1] + (D_OUT,), jnp.float32)

  def loss(x):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      ys = [
          ops.poet_linear(x, a["base"], a["q_in"], a["q_out"], a["perm_in"], a["perm_out"], block_size=BLOCK,
                          implementation="pallas", interpret=True)
          for _ in range(3)
      ]
    return sum(jnp.sum(y * weights) for y in ys)

  jax.ad_checkpoint.print_saved_residuals(loss, a["x"])
  lines = capsys.readouterr().out.strip().splitlines()
  x_shape = "f32[" + ",".join(map(str, a["x"].shape)) + "]"
  assert [line for line in lines if "from the argument x" in line] == [f"{x_shape} from the argument x"], lines
  assert not any("reshape" in line for line in lines), lines  # no flattened copy saved per layer


def test_no_mesh_and_empty_batch_axes_leave_partitioning_to_xla(layer_inputs):
  assert "shard_map" not in str(jax.make_jaxpr(lambda: _loss_and_grads(layer_inputs))())
  mesh = _mesh()

  def step():
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return _loss_and_grads(layer_inputs, batch_axes=())

  assert "shard_map" not in str(jax.make_jaxpr(step)())


def test_sharded_xla_layer_equals_the_unsharded_one(layer_inputs):
  mesh = _mesh()
  x = jax.device_put(layer_inputs["x"], NamedSharding(mesh, P(("data", "fsdp"))))

  def step(x):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return _loss_and_grads(layer_inputs, implementation="xla", x=x)

  (loss, grads), (loss_ref, grads_ref) = jax.jit(step)(x), _loss_and_grads(layer_inputs, implementation="xla")
  assert relative_error(loss, loss_ref) < 1e-5
  for got, want in zip(grads, grads_ref):
    assert relative_error(got, want) < 1e-5
  assert "shard_map" in str(jax.make_jaxpr(step)(x))


def _small_runs(cayley_once, *, model, poet):
  """`(run, state, batch)` of a small LLaMA trainer, on one device and then on a
  data 2 × fsdp 4 mesh; `model` and `poet` update the base config's sections."""
  from benchmarks import synthetic
  from configs import base
  from poetx_jax import train_config, trainer

  for data, fsdp in ((1, 1), (2, 4)):
    c = base.get_config()
    c.model.size = None
    c.model.update(hidden=64, ffn=128, heads=2, vocab_size=128, **model)
    c.data.seq_len = 8
    c.poet.update(block_size=16, **poet)
    c.train.update(steps=10, global_batch_size=16, grad_accum_steps=2, cayley_once=cayley_once)
    c.optimizer.warmup_steps = 2
    c.mesh.update(data=data, fsdp=fsdp)
    run = trainer.build(train_config.from_config_dict(c), devices=jax.devices()[: data * fsdp])
    yield run, run.init_fn(), synthetic.token_batch(run, 16, 8, 128)


def scanned_xla_model_results(cayley_once: bool) -> list[tuple[float, float]]:
  """(loss, grad norm) after three steps of two scanned blocks on the XLA path, on one
  device and on a data 2 × fsdp 4 mesh (a merge at step 2, and a step after it)."""
  results = []
  for run, state, batch in _small_runs(
      cayley_once, model=dict(layers=2, scan_layers=True, remat="dots"), poet=dict(merge_interval=2, implementation="xla")
  ):
    for _ in range(3):
      state, metrics = run.train_step(state, batch)
    results.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return results


@pytest.mark.parametrize("cayley_once", [False, True])
def test_a_scanned_xla_model_trains_on_a_2x4_mesh_as_on_one_device(cayley_once):
  """Left to XLA's partitioner, this step (two scanned blocks, data 2 × fsdp 4, the XLA
  path) aborted the process with a failed check in the SPMD partitioner (jax 0.11.2), so
  it runs in a subprocess: an abort fails this test instead of ending the session."""
  import json
  import os
  import subprocess
  import sys

  tests = os.path.dirname(os.path.abspath(__file__))
  root = os.path.dirname(tests)
  code = f"import json, sharded_layer_test as t; print(json.dumps(t.scanned_xla_model_results({cayley_once})))"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([root, tests, os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  one, many = json.loads(result.stdout.strip().splitlines()[-1])
  for a, b in zip(one, many):
    assert abs(a - b) < 1e-5 * abs(a), (one, many)


def test_indivisible_rows_and_unknown_axes_say_what_to_change(layer_inputs):
  mesh = _mesh()
  odd = dict(layer_inputs, x=layer_inputs["x"][:5])  # 15 rows over 8 devices

  def step(a, batch_axes=None):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return _loss_and_grads(a, batch_axes=batch_axes)

  with pytest.raises(ValueError, match=r"15 token rows.*do not split.*batch_axes"):
    jax.make_jaxpr(step)(odd)
  with pytest.raises(ValueError, match=r"\['model'\] are not axes"):
    jax.make_jaxpr(lambda a: step(a, ("data", "model")))(layer_inputs)
  # Splitting over only the `data` axis (4 devices) needs 4 | rows: 48 rows do.
  data_only = jax.make_jaxpr(lambda a: step(a, ("data",)))(layer_inputs)
  assert "shard_map" in str(data_only)


def _kernels(jaxpr, inside=False, found=None):
  """(Pallas kernel name, whether it sits inside a shard_map) of every kernel of a jaxpr."""
  found = set() if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      name = eqn.params.get("name") or getattr(eqn.params.get("name_and_src_info"), "name", None)
      found.add((name, inside))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _kernels(sub, inside or eqn.primitive.name == "shard_map", found)
  return found


@pytest.mark.parametrize("cayley_once", [False, True])
def test_trainer_step_runs_kernels_per_device_and_matches_one_device(cayley_once):
  """The trainer traces its step under its mesh: Pallas calls land inside shard_map, same loss.
  With `train.cayley_once` the Cayley–Neumann kernels run once, outside (on generators XLA
  gathers for them, as for any operand of a kernel it cannot partition), and the rotations
  inside; the gradient norm matches too."""
  losses = []
  for run, state, batch in _small_runs(
      cayley_once, model=dict(layers=1), poet=dict(merge_interval=50, implementation="pallas", pallas_interpret=True)
  ):
    if run.mesh.devices.size > 1:
      found = _kernels(run.train_step.trace(state, batch).jaxpr.jaxpr)
      outside = {name for name, inside in found if not inside}
      assert {name for name, inside in found if inside} >= {"poetx_block_rotate", "poetx_rotate_outer_sum"}, found
      assert all(name.startswith("poetx_cayley") for name in outside) and bool(outside) == cayley_once, found
    _, metrics = run.train_step(state, batch)
    losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  for one, many in zip(*losses):
    assert abs(one - many) < 1e-5 * abs(one), losses


def test_inside_a_callers_shard_map_manual_axes_are_left_alone(layer_inputs):
  """Under the caller's own shard_map over `data`, the layer splits only over `fsdp`."""
  mesh = _mesh()
  x = jax.device_put(layer_inputs["x"], NamedSharding(mesh, P("data")))

  def per_data_shard(x):  # 4 rows x 3 tokens here; 2-way over fsdp inside the layer
    return _loss_and_grads(layer_inputs, x=x)[0][None]

  def step(x):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return jax.shard_map(per_data_shard, mesh=mesh.abstract_mesh, in_specs=P("data"), out_specs=P("data"),
                           axis_names={"data"}, check_vma=False)(x)

  losses = jax.jit(step)(x)
  want = [_loss_and_grads(layer_inputs, x=layer_inputs["x"][4 * i : 4 * i + 4])[0] for i in range(4)]
  assert relative_error(losses, jnp.stack(want)) < 1e-5
