"""Backbones of the nonconvex regression benchmark (Queryable LoRA paper, Sec. 4.1 and App. B.3).

`DeepNarrowMLP` is App. B.3's stress-test regressor: a GELU MLP with 32 hidden layers of width 32 and a
scalar head. `SmallTransformer` is Sec. 4.1's 8-layer, width-256 Transformer on a 2-D input.

Every linear map is a plain `nn.Dense` with a stable name, so `localmoe.inject` can target them by
module path ("hidden_3", "block_5/attn/query", ...).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

KERNEL_INITS = ("torch", "lecun", "he")


def kernel_init(name: str):
  """Dense kernel initialisers, variance per fan-in:

  "torch": PyTorch nn.Linear's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (variance 1/(3 fan_in));
           the setting a PyTorch reference implementation of App. B.3 would have used.
  "lecun": Flax's default, truncated normal with variance 1/fan_in.
  "he":    He/Kaiming normal, variance 2/fan_in, which keeps GELU activations from shrinking with depth.
  """
  if name == "torch":
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
  if name == "lecun":
    return nn.initializers.lecun_normal()
  if name == "he":
    return nn.initializers.variance_scaling(2.0, "fan_in", "normal")
  raise ValueError(f"init={name!r} is not a known kernel initialiser; use one of {KERNEL_INITS}.")


def bias_init(name: str):
  """PyTorch initialises biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the others use zeros."""
  if name != "torch":
    return nn.initializers.zeros

  def init(key, shape, dtype=jnp.float32, fan_in: int = 1):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class _Dense(nn.Dense):
  """nn.Dense whose bias init can depend on the fan-in (PyTorch's default); still an nn.Dense, so
  `localmoe.inject` sees it."""

  init_name: str = "lecun"

  @nn.compact
  def __call__(self, inputs):
    fan_in = inputs.shape[-1]
    kernel = self.param("kernel", kernel_init(self.init_name), (fan_in, self.features))
    y = jnp.einsum("...d,df->...f", inputs, kernel)
    if self.use_bias:
      binit = bias_init(self.init_name)
      if self.init_name == "torch":
        bias = self.param("bias", lambda k, s: binit(k, s, fan_in=fan_in), (self.features,))
      else:
        bias = self.param("bias", binit, (self.features,))
      y = y + bias
    return y


class DeepNarrowMLP(nn.Module):
  """App. B.3: x [..., 2] -> embed (linear, 2 -> width) -> depth x [Dense(width, width) + GELU] -> head.

  The input lift `embed` is linear (no activation), so the 32 hidden layers are all width x width and
  each can carry the same adapter; `head` maps width -> 1. Output: [...] (scalar per input).
  """

  depth: int = 32  # hidden layers ("hidden_0" ... "hidden_{depth-1}")
  width: int = 32  # hidden width
  init_scheme: str = "torch"  # kernel init, see `kernel_init`

  def __post_init__(self):
    if self.depth < 1 or self.width < 1:
      raise ValueError(f"depth={self.depth}, width={self.width}: both must be >= 1.")
    if self.init_scheme not in KERNEL_INITS:
      raise ValueError(f"init_scheme={self.init_scheme!r} is not one of {KERNEL_INITS}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = _Dense(self.width, init_name=self.init_scheme, name="embed")(x)  # [..., width]
    for i in range(self.depth):
      h = nn.gelu(_Dense(self.width, init_name=self.init_scheme, name=f"hidden_{i}")(h), approximate=False)
    return _Dense(1, init_name=self.init_scheme, name="head")(h)[..., 0]  # [...]


class _Attention(nn.Module):
  """Multi-head self-attention with four named nn.Dense projections (query, key, value, out)."""

  width: int
  heads: int
  init_scheme: str

  @nn.compact
  def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
    dense = lambda name: _Dense(self.width, init_name=self.init_scheme, name=name)
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.width // self.heads)  # [..., T, H, dh]
    q, k, v = split(dense("query")(h)), split(dense("key")(h)), split(dense("value")(h))
    logits = jnp.einsum("...thd,...shd->...hts", q, k) / math.sqrt(self.width // self.heads)
    att = jnp.einsum("...hts,...shd->...thd", jax.nn.softmax(logits, axis=-1), v)  # [..., T, H, dh]
    return dense("out")(att.reshape(*att.shape[:-2], self.width))


class SmallTransformer(nn.Module):
  """Sec. 4.1's backbone: a pre-LN Transformer encoder, `depth` blocks of width `width`.

  Tokens from a 2-D input (our choice; the paper does not say): one token per coordinate, token i =
  x_i * w_i + p_i (a learned value direction and position embedding per coordinate, [2, width]), plus a
  learned [CLS] token whose final state feeds the scalar head. So T = 3 tokens.
  """

  depth: int = 8  # Transformer blocks ("block_0" ... )
  width: int = 256  # model width
  heads: int = 4  # attention heads (our choice)
  mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * width
  init_scheme: str = "lecun"  # kernel init, see `kernel_init`

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f"width={self.width} is not divisible by heads={self.heads}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    d = x.shape[-1]
    value_dir = self.param("value_embed", nn.initializers.normal(1.0), (d, self.width))
    position = self.param("position_embed", nn.initializers.normal(0.02), (d, self.width))
    cls = self.param("cls", nn.initializers.normal(0.02), (self.width,))
    tokens = x[..., :, None] * value_dir + position  # [..., 2, width]
    cls = jnp.broadcast_to(cls, (*x.shape[:-1], 1, self.width))
    h = jnp.concatenate([cls, tokens], axis=-2)  # [..., 3, width]
    for i in range(self.depth):
      with_block = f"block_{i}"
      a = nn.LayerNorm(name=f"{with_block}_ln1")(h)
      h = h + _Attention(self.width, self.heads, self.init_scheme, name=f"{with_block}_attn")(a)
      m = nn.LayerNorm(name=f"{with_block}_ln2")(h)
      m = nn.gelu(_Dense(self.mlp_ratio * self.width, init_name=self.init_scheme, name=f"{with_block}_mlp_in")(m))
      h = h + _Dense(self.width, init_name=self.init_scheme, name=f"{with_block}_mlp_out")(m)
    h = nn.LayerNorm(name="final_ln")(h[..., 0, :])  # [..., width]
    return _Dense(1, init_name=self.init_scheme, name="head")(h)[..., 0]  # [...]


BACKBONES = {"mlp": DeepNarrowMLP, "transformer": SmallTransformer}
