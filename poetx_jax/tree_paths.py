"""Finding wrapped layers in a variables dict (plain nested dicts of arrays)."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax
from flax.core import meta

from poetx_jax import layers


def unboxed(x: Any) -> jax.Array:
  """The array inside a flax `AxisMetadata` box (e.g. `nn.Partitioned`), or `x` itself."""
  return x.unbox() if isinstance(x, meta.AxisMetadata) else x


def reboxed(like: Any, value: jax.Array) -> Any:
  """`value` in the same box as `like` (keeps partitioning metadata through a merge)."""
  return meta.replace_boxed(like, value) if isinstance(like, meta.AxisMetadata) else value


def poet_layers(poet: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Mapping[str, Any]]]:
  """Yields `(path, frozen state)` for every wrapped layer in the `poet` collection."""
  if layers.is_poet_layer(poet):
    yield prefix, poet
    return
  for name in sorted(poet):
    child = poet[name]
    if hasattr(child, "keys"):
      yield from poet_layers(child, prefix + (str(name),))


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  """`tree[p0][p1]...`, with a clear error naming the missing path."""
  node = tree
  for i, name in enumerate(path):
    if not hasattr(node, "keys") or name not in node:
      raise KeyError(f"no entry {'/'.join(path[: i + 1])!r} in the params tree: do params and poet state belong together?")
    node = node[name]
  return node


def with_path(tree: Mapping[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
  """A copy of nested dicts `tree` with `tree[path] = value` (shares untouched leaves)."""
  out = dict(tree)
  if len(path) == 1:
    out[path[0]] = value
  else:
    out[path[0]] = with_path(tree[path[0]], path[1:], value)
  return out
