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
