import flax.linen as nn, jax, jax.numpy as jnp, optax
import poetx_jax

class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(512, name="up")(x))
    x = nn.gelu(nn.Dense(512, name="mid")(x))
    return nn.Dense(10, name="head")(x)               # excluded by default: trains densely

cfg = poetx_jax.POETConfig(block_size=256, merge_interval=200)
model = poetx_jax.wrap(MLP(), cfg)                       # up and mid become POET-X layers
x, y = jnp.ones((32, 256)), jnp.zeros((32,), jnp.int32)
variables = model.init(jax.random.key(0), x)              # {"params": q's + head, "poet": frozen}
tx = poetx_jax.optimizer(cfg, learning_rate=1e-3, poet_learning_rate=1e-3, clip_norm=1.0)
opt_state = tx.init(variables["params"])

@jax.jit
def train_step(step, variables, opt_state):
  def loss_fn(params):
    logits = model.apply({**variables, "params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  loss, grads = jax.value_and_grad(loss_fn)(variables["params"])
  updates, opt_state = tx.update(grads, opt_state, variables["params"])
  variables = {**variables, "params": optax.apply_updates(variables["params"], updates)}
  variables, opt_state = poetx_jax.merge_if_needed(step + 1, variables, opt_state, cfg)
  return loss, variables, opt_state

for step in range(3):
  loss, variables, opt_state = train_step(step, variables, opt_state)
print("loss", float(loss), "| dense export:", jax.tree.map(jnp.shape, poetx_jax.effective_params(variables)["up"]))
