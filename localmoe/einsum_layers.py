"""Einsum layers seen as linear maps: y = einsum(eq, x, W) through its flattened contracted and output widths.

An einsum layer (`nn.Einsum`, `nnx.Einsum`; Gemma-style q/k/v/out projections) computes, for an equation
"<x letters>,<kernel letters>-><output letters>",

  y[rest, features] = sum_contracted x[rest, contracted] W[contracted, features]

where `contracted` are the letters of both x and W that the output drops, `features` the letters of W that
the output keeps, and `rest` the letters of x that the output keeps (batch, tokens). Flattening the contracted
axes (in kernel order) to d_in and the features (in kernel order) to d_out makes it the layer
y = x W0 of the paper (Eq. 9 with W0 = W.reshape(d_in, d_out).T), so every grid adapter applies to it as to a
DenseGeneral layer: "btd,dnh->btnh" (a query projection) is d_model -> heads * head_dim, "btnh,nhd->btd"
(the output projection) is heads * head_dim -> d_model.

Equations the grid cannot be mapped onto are refused, naming the layer and the equation: a kernel axis that
is also a kept axis of x (a kernel per batch index, like DenseGeneral's batch_dims), an axis summed over one
operand only, a repeated letter (a diagonal), no contracted axis, or an ellipsis in the kernel. An ellipsis
in x and the output ("...d,dnh->...nh") stands for the leading axes of x.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class EinsumMap:
  """One einsum layer's equation split into the three letter groups (ellipsis already expanded)."""

  lhs: str  # letters of x
  rhs: str  # letters of the kernel
  out: str  # letters of the output
  rest: str  # kept axes of x, in x's order (batch, tokens, ...)
  contracted: str  # summed axes, in kernel order: flattened to d_in
  features: str  # kernel axes kept in the output, in kernel order: flattened to d_out


def parse(equation: str, x_ndim: int, path: str) -> EinsumMap:
  """Splits `equation` for an input of x_ndim axes, or raises a ValueError naming the layer and the equation."""
  eq = equation.replace(" ", "")

  def refuse(why: str):
    raise ValueError(
      f"layer {path!r} is an einsum layer with equation {equation!r}: {why}, so a grid adapter "
      "cannot see it as one d_in -> d_out map; leave it out of target_modules."
    )

  if eq.count(",") != 1 or eq.count("->") != 1:
    refuse("it needs exactly two operands (input, kernel) and an explicit '->'")
  operands, out = eq.split("->")
  lhs, rhs = operands.split(",")
  if "..." in rhs:
    refuse("the kernel has an ellipsis")
  if ("..." in lhs) != ("..." in out):
    refuse("the ellipsis must appear in both the input and the output")
  if "..." in lhs:
    named = len(lhs) - 3
    free = [c for c in string.ascii_letters if c not in eq][: max(x_ndim - named, 0)]
    lhs, out = lhs.replace("...", "".join(free)), out.replace("...", "".join(free))
  if len(lhs) != x_ndim:
    refuse(f"the input has {x_ndim} axes but the equation names {len(lhs)}")
  for name, letters in (("input", lhs), ("kernel", rhs), ("output", out)):
    if len(set(letters)) != len(letters):
      refuse(f"the {name} repeats a letter (a diagonal)")
  shared = [c for c in rhs if c in lhs and c in out]
  if shared:
    refuse(f"axis {shared[0]!r} is in the input, the kernel and the output (a kernel per batch index)")
  summed = [c for c in lhs + rhs if c not in out and not (c in lhs and c in rhs)]
  if summed:
    refuse(f"axis {summed[0]!r} is summed over one operand only")
  contracted = "".join(c for c in rhs if c in lhs)
  if not contracted:
    refuse("it contracts no axis of the input")
  return EinsumMap(
    lhs=lhs,
    rhs=rhs,
    out=out,
    rest="".join(c for c in lhs if c in out),
    contracted=contracted,
    features="".join(c for c in rhs if c in out),
  )


def widths(m: EinsumMap, kernel_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(in_shape, out_shape): the contracted and the feature axes' sizes, in kernel order."""
  size = dict(zip(m.rhs, kernel_shape))
  return tuple(int(size[c]) for c in m.contracted), tuple(int(size[c]) for c in m.features)


def flatten_input(x: jnp.ndarray, m: EinsumMap) -> jnp.ndarray:
  """x [lhs axes] -> [*rest, d_in], the contracted axes moved last in kernel order and flattened."""
  x = jnp.einsum(f"{m.lhs}->{m.rest}{m.contracted}", x)
  rest = x.shape[: len(m.rest)]
  return x.reshape(*rest, math.prod(x.shape[len(m.rest) :]))


def kernel_2d(kernel: jnp.ndarray, m: EinsumMap) -> jnp.ndarray:
  """W [rhs axes] -> [d_in, d_out] (contracted axes, then features, each in kernel order)."""
  w = jnp.einsum(f"{m.rhs}->{m.contracted}{m.features}", kernel)
  d_in = math.prod(w.shape[: len(m.contracted)])
  return w.reshape(d_in, -1)


def kernel_nd(w2: jnp.ndarray, m: EinsumMap, kernel_shape) -> jnp.ndarray:
  """Inverse of `kernel_2d`: [d_in, d_out] -> the kernel's own layout (for merging Delta W into W)."""
  in_shape, out_shape = widths(m, kernel_shape)
  return jnp.einsum(f"{m.contracted}{m.features}->{m.rhs}", w2.reshape(*in_shape, *out_shape))


def unflatten_output(delta: jnp.ndarray, m: EinsumMap, out_shape: tuple[int, ...]) -> jnp.ndarray:
  """Delta [*rest, d_out] -> the layer's output layout [out axes] (features unflattened, axes permuted)."""
  rest = delta.shape[:-1]
  return jnp.einsum(f"{m.rest}{m.features}->{m.out}", delta.reshape(*rest, *out_shape))
