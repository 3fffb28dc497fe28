"""Pieces shared by every adapter: initialisers, argument checks, scaling, dtypes.

Dtypes follow `flax.nnx.LoRA`: every adapter has `param_dtype` (the dtype its parameters are stored in,
float32 by default) and `dtype` (the dtype of the computation; None computes in the input's dtype).
Parameters are cast to the compute dtype where they are used, so a bfloat16 input with float32 parameters
gives a bfloat16 output and float32 gradients. Either field may be a dtype or its name ("bfloat16").
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jnp.ndarray]
Dtype = Any  # a jnp dtype, or its name ("float32", "bfloat16")


def lora_a_init(key, shape, dtype=jnp.float32):
  """Standard LoRA init of a down-projection A [..., d, r]: U(-1/sqrt(d), 1/sqrt(d)).

  This is PyTorch's kaiming_uniform(a=sqrt(5)) that the reference LoRA implementation applies to A,
  with fan-in d = shape[-2] (the leading expert/cell axes are batch axes, not fan-in).
  """
  bound = 1.0 / math.sqrt(shape[-2])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def gaussian_a_init(key, shape, dtype=jnp.float32):
  """A ~ N(0, 1/r) (PEFT's `init_lora_weights="gaussian"`), r = shape[-1]."""
  return jax.random.normal(key, shape, dtype) / math.sqrt(shape[-1])


def zeros_init(key, shape, dtype=jnp.float32):
  """B = 0, so that every adapter starts as the identity update (Delta = 0)."""
  del key
  return jnp.zeros(shape, dtype)


def small_normal_init(stddev: float = 0.01) -> Initializer:
  """N(0, stddev^2); useful for B when a nonzero start is wanted."""

  def init(key, shape, dtype=jnp.float32):
    return stddev * jax.random.normal(key, shape, dtype)

  return init


INITIALIZERS: dict[str, Initializer] = {
  "lora": lora_a_init,
  "gaussian": gaussian_a_init,
  "zeros": zeros_init,
  "normal_0.01": small_normal_init(0.01),
}


def resolve_init(init: str | Initializer, field: str) -> Initializer:
  """Looks an initialiser up by name, or returns a callable unchanged."""
  if callable(init):
    return init
  if init not in INITIALIZERS:
    raise ValueError(
      f"{field}={init!r} is not a known initialiser; use one of {sorted(INITIALIZERS)} "
      "or pass a callable (key, shape, dtype) -> array."
    )
  return INITIALIZERS[init]


def check_positive(value: int, field: str) -> None:
  if not isinstance(value, (int,)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{field}={value!r} must be a positive integer.")


def check_rank(rank: int, rows: int, cols: int, where: str, allow_overcomplete: bool) -> None:
  """A rank above min(rows, cols) of the block it factors buys no expressivity, only parameters."""
  check_positive(rank, "rank")
  limit = min(rows, cols)
  if rank > limit and not allow_overcomplete:
    raise ValueError(
      f"rank={rank} is larger than the {rows}x{cols} {where} it factors (max useful rank {limit}): "
      f"use rank <= {limit}, or set allow_overcomplete_rank=True to keep an over-complete factorisation "
      "(the paper's California Housing budgets do this)."
    )


def check_alpha(alpha: float | None) -> None:
  """alpha (the numerator of LoRA's alpha / r, Eq. 1): None (a scale of 1) or a finite number > 0."""
  number = isinstance(alpha, (int, float, np.integer, np.floating)) and not isinstance(alpha, bool)
  if alpha is not None and not (number and 0 < float(alpha) < math.inf):
    raise ValueError(
      f"alpha={alpha!r} must be a finite number > 0 (the update is scaled by alpha / rank): use "
      "e.g. alpha=2 * rank, or alpha=None for a scale of 1."
    )


def scaling(alpha: float | None, rank: int) -> float:
  """LoRA's alpha / r (Eq. 1). alpha=None means alpha = r, i.e. a scale of 1."""
  return 1.0 if alpha is None else float(alpha) / rank


def resolve_dtype(value: Dtype | None, field: str) -> jnp.dtype | None:
  """A dtype field as a jnp dtype (None stays None); names such as "bfloat16" are accepted."""
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"{field}={value!r} is not a floating-point dtype: use e.g. 'float32', 'bfloat16', "
      "'float16' or a jnp dtype such as jnp.bfloat16."
    )
  return dtype


def check_dtypes(module) -> None:
  """Constructor check of a module's `dtype` and `param_dtype` fields."""
  resolve_dtype(module.dtype, "dtype")
  if resolve_dtype(module.param_dtype, "param_dtype") is None:
    raise ValueError("param_dtype=None: parameters need a storage dtype; use jnp.float32 (the default).")


def compute_dtype(dtype: Dtype | None, x: jnp.ndarray | None, param_dtype: Dtype) -> jnp.dtype:
  """The dtype of the computation: the `dtype` field; else the input's (floating) dtype; else param_dtype."""
  if dtype is not None:
    return resolve_dtype(dtype, "dtype")
  if x is not None and jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    return jnp.asarray(x).dtype
  return resolve_dtype(param_dtype, "param_dtype")
