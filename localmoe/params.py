"""Parameter counting."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays (e.g. the `params` collection of an adapter)."""
  return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))


def trainable_params(variables: Any) -> int:
  """Counts the `params` collection only (router intermediates etc. are not parameters)."""
  if hasattr(variables, "get") and "params" in variables:
    variables = variables["params"]
  return count_params(variables)


def path_string(key_path) -> str:
  """A jax key path as the "/"-joined string every path rule matches, e.g. "adapter/encoder/layer_0/query/A"."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
  """("/"-joined key path, leaf) of every leaf, e.g. ("adapter/encoder/layer_0/query/A", array)."""
  return [(path_string(key_path), leaf) for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
