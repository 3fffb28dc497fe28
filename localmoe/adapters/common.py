"""Pieces shared by every adapter: initialisers, argument checks, scaling."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

Initializer = Callable[..., jnp.ndarray]


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
    raise ValueError(f"{field}={init!r} is not a known initialiser; use one of {sorted(INITIALIZERS)} "
                     "or pass a callable (key, shape, dtype) -> array.")
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
        "(the paper's California Housing budgets do this).")


def scaling(alpha: float | None, rank: int) -> float:
  """LoRA's alpha / r (Eq. 1). alpha=None means alpha = r, i.e. a scale of 1."""
  return 1.0 if alpha is None else float(alpha) / rank
