"""Random test values drawn by numpy: no JAX random kernel compiled per leaf shape (seconds each, op by op)."""

import jax
import jax.numpy as jnp
import numpy as np


def normal_like(tree, seed=0, scale=1.0, dtype=None):
  """scale * N(0, 1) for every leaf of `tree` (arrays or `jax.eval_shape` shapes), drawn in flattening order
  from numpy's default_rng(seed); dtype: of the result (None: each leaf's own)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
    lambda leaf: jnp.asarray(scale * rng.standard_normal(leaf.shape), dtype or leaf.dtype), tree
  )
