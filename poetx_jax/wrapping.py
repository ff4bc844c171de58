"""`wrap(model, config)`: an unmodified linen model whose Dense layers train by POET-X.

Like LoRA in gemma's `peft`, the targeted `nn.Dense` / `nn.DenseGeneral` calls are
intercepted (`nn.intercept_methods`); the wrapper shares the model's scope
(`nn.share_scope`), so every parameter keeps the path the model gives it.
"""

from __future__ import annotations

import functools

import flax.linen as nn

from poetx_jax import layers
from poetx_jax.config import POETConfig


def _intercept(next_fun, args, kwargs, context, *, config: POETConfig):
  module = context.module
  if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
    return next_fun(*args, **kwargs)
  if not config.is_target(layers.module_path(module)):
    return next_fun(*args, **kwargs)
  inputs = args[0] if args else kwargs.pop("inputs")
  return layers.poet_dense_call(module, inputs, config, lambda x: next_fun(x))


class POETWrapped(nn.Module):
  """A linen model whose targeted dense layers compute `x · P·K_s·R` (SPEC §1).

  `init` returns `{"params": ..., "poet": ...}`: the orthogonal generators (and every
  untouched parameter) are trainable; base kernels and permutations are frozen.
  """

  model: nn.Module
  config: POETConfig

  def setup(self):
    nn.share_scope(self, self.model)

  def __call__(self, *args, **kwargs):
    with nn.intercept_methods(functools.partial(_intercept, config=self.config)):
      return self.model(*args, **kwargs)

  def call_method(self, name: str, *args, **kwargs):
    """Calls another method of the wrapped model (e.g. `decode`) with POET-X layers."""
    with nn.intercept_methods(functools.partial(_intercept, config=self.config)):
      return getattr(self.model, name)(*args, **kwargs)


def wrap(model: nn.Module, config: POETConfig) -> POETWrapped:
  """Wraps a linen model so that its targeted dense layers train by POET-X.

  Args:
    model: any unbound `flax.linen.Module`; it is not modified.
    config: the `POETConfig`.

  Returns:
    A linen Module with the model's call signature. Its variables hold a `params`
    collection (trainable) and a `poet` collection (frozen); `effective_params`
    turns them back into plain parameters of `model`.

  Raises:
    TypeError: if `model` is not a linen Module.
  """
  if not isinstance(model, nn.Module):
    raise TypeError(f"wrap expects a flax.linen.Module, got {type(model).__name__}.")
  if not isinstance(config, POETConfig):
    raise TypeError(f"wrap expects a POETConfig, got {type(config).__name__}.")
  return POETWrapped(model=model, config=config)
