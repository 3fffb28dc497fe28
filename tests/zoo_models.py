"""Minimal replicas of projection classes that real model code brings (for tests/test_zoo.py).

Each class is written from reading the cited source file and keeps what matters to adapters: the param names
and layouts, how the weight reaches its contraction (jnp.einsum / jax.lax.dot_general, a dtype cast,
nn.share_scope, nn.jit on __call__). Everything else (sharding, RoPE, caches, quantisation) is left out.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

from localmoe.data import cache
from localmoe.data import registry

# ------------------------------------------------------------------------------------------- tunix (NNX)
# google-tunix 0.1.7's model files import only jax, flax, einops, jaxtyping and a few tunix modules; its
# package __init__ pulls in its heavy training stack. The files below are read out of the pinned wheel
# (`pip download --no-deps`, as localmoe.data fetches data wheels), checked by SHA-256, cached under the data
# directory, and imported under a stub top-level `tunix` package so that tunix/__init__.py never runs.

TUNIX_VERSION = "0.1.7"
TUNIX_WHEEL_SHA256 = "857b893b8ba71a61cce8cb9de2301218d311f72044de94aa2b826275968033b4"
TUNIX_FILES = {
  "tunix/models/gemma3/model.py": "aa5d15b9858d24502ca048dfabd01302468341f3127b4469a9a5f22f4fbd076f",
  "tunix/models/gemma3/merge_embeddings.py": "db79ec6b76d0170b92a256e2fa81d55c99a1074ec23e16ba688944406cd358e0",
  "tunix/models/gemma3/utils.py": "12cee5f10564a47a8a17902cc628f3599ac80d938d02e60e33083fe78307e1c9",
  "tunix/models/gemma3/vision.py": "1c221cc8db6971ccb4c0584d1bcc04447c6da52cad12ee8648861dd6a5b930c8",
  "tunix/models/llama3/model.py": "166d72dd198a9e8011d331a1776766f6685f616e4937ed14dc050c5ca92842c8",
  "tunix/models/qwen3/model.py": "a1a603a1b1683acb5a25e004165da3af63558fb26069aa24a845467784182f4f",
  "tunix/generate/mappings.py": "389a889d16ce9569f06a3f173fd5cad9f1a63d85f3f28c0ada3fdd0ed7924fd8",
  "tunix/utils/compat.py": "f2d4af060bcfee674abf34bae4d424de2ac472921061f41da773055f36e987f3",
  "tunix/utils/env_utils.py": "7444feba5ff40e204c516febd96b054dc5d7d08a93b2077068c41ad34cc9fc12",
  "tunix/utils/sharding_utils.py": "997a7f409633abc7c155ac2c7d48fc69c25f61ce9f411c569672feec085fbe03",
}


def tunix_models() -> dict[str, types.ModuleType]:
  """{"gemma3", "llama3", "qwen3"}: tunix 0.1.7's model modules, from the cached (or fetched) wheel files.

  Raises registry.RegistryError when the wheel cannot be downloaded, cache.ChecksumError on a changed file.
  """
  root = cache.data_dir() / f"google-tunix-{TUNIX_VERSION}"
  try:
    for member, sha in TUNIX_FILES.items():
      cache.read_verified(root / member, sha)
  except (FileNotFoundError, cache.ChecksumError):
    files = registry.fetch_files_from_wheel("google-tunix", TUNIX_VERSION, list(TUNIX_FILES), TUNIX_WHEEL_SHA256)
    for member, data in files.items():
      cache.verify_sha256(data, TUNIX_FILES[member], member, "from the google-tunix wheel")
    cache.store_in_cache(files, root)
  if "tunix" not in sys.modules:
    stub = types.ModuleType("tunix")
    stub.__path__ = [str(root / "tunix")]  # tunix/__init__.py is never read
    sys.modules["tunix"] = stub
  return {name: importlib.import_module(f"tunix.models.{name}.model") for name in ("gemma3", "llama3", "qwen3")}


# ------------------------------------------------------------------------------------------- gemma (linen)
# Source: google-deepmind/gemma, gemma/gm/nn/_layers.py (Einsum) and gemma/gm/nn/_modules.py (Attention,
# FeedForward, Block) and gemma/gm/nn/_transformer.py (Transformer, __call__ under nn.jit).


class Einsum(nn.Module):
  """gemma's `_layers.Einsum`: called as `module(eqn, x)`, its weight named by `weight_name`."""

  shape: tuple[int, ...]
  weight_name: str = "w"

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    w = self.param(self.weight_name, nn.initializers.normal(0.3), self.shape)
    return jnp.einsum(eqn, x, w)


class Embedder(nn.Module):
  """gemma's Embedder: a [vocab, d] table, looked up by `encode` and tied to the logits by `decode`."""

  vocab_size: int
  embed_dim: int

  def setup(self):
    self.input_embedding = self.param("input_embedding", nn.initializers.normal(), (self.vocab_size, self.embed_dim))

  def encode(self, tokens: jax.Array) -> jax.Array:
    return self.input_embedding[(tokens,)] * jnp.sqrt(self.embed_dim)  # [B, T, D]

  def decode(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x, self.input_embedding.T)  # [B, T, vocab]


class Attention(nn.Module):
  """gemma's Attention: fused `qkv_einsum` (num_heads == num_kv_heads) or `q_einsum` + `kv_einsum`."""

  num_heads: int
  num_kv_heads: int
  features: int
  head_dim: int

  @property
  def use_qkv_einsum(self) -> bool:
    return self.num_kv_heads == self.num_heads

  def setup(self):
    self.attn_vec_einsum = Einsum(shape=(self.num_heads, self.head_dim, self.features))
    if self.use_qkv_einsum:
      self.qkv_einsum = Einsum(shape=(3, self.num_heads, self.features, self.head_dim))
    else:
      self.q_einsum = Einsum(shape=(self.num_heads, self.features, self.head_dim))
      self.kv_einsum = Einsum(shape=(2, self.num_kv_heads, self.features, self.head_dim))

  def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, T, D]
    if self.use_qkv_einsum:
      q, k, v = self.qkv_einsum("BTD,SNDH->SBTNH", x)  # each [B, T, N, H]
    else:
      q = self.q_einsum("BTD,NDH->BTNH", x)
      k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
      reps = self.num_heads // self.num_kv_heads
      k, v = jnp.repeat(k, reps, axis=2), jnp.repeat(v, reps, axis=2)
    logits = jnp.einsum("BTNH,BSNH->BTNS", q * self.head_dim**-0.5, k)
    t = x.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, :, None, :], logits, -1e9)
    encoded = jnp.einsum("BTNS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), v)
    return self.attn_vec_einsum("BTNH,NHD->BTD", encoded)  # [B, T, D]


class FeedForward(nn.Module):
  """gemma's FeedForward: both Einsums share this module's scope (`nn.share_scope`)."""

  features: int
  hidden_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, T, F]
    gating = Einsum(shape=(2, self.hidden_dim, self.features), weight_name="gating_einsum")
    nn.share_scope(self, gating)
    gate = gating("...F,NHF->...NH", x)  # [B, T, 2, H]
    activations = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]  # [B, T, H]
    linear = Einsum(shape=(self.hidden_dim, self.features), weight_name="linear")
    nn.share_scope(self, linear)
    return linear("...H,HF->...F", activations)  # [B, T, F]


class Block(nn.Module):
  num_heads: int
  num_kv_heads: int
  embed_dim: int
  head_dim: int
  hidden_dim: int

  def setup(self):
    self.attn = Attention(self.num_heads, self.num_kv_heads, self.embed_dim, self.head_dim)
    self.mlp = FeedForward(self.embed_dim, self.hidden_dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(x)
    return x + self.mlp(x)


class Transformer(nn.Module):
  """gemma's Transformer: embedder, blocks `layer_<i>`, tied logits; `__call__` under `nn.jit`."""

  vocab_size: int = 11
  embed_dim: int = 8
  num_heads: int = 2
  num_kv_heads: int = 2
  head_dim: int = 4
  hidden_dim: int = 12
  num_layers: int = 2

  def setup(self):
    self.embedder = Embedder(self.vocab_size, self.embed_dim)
    self.blocks = [
      Block(self.num_heads, self.num_kv_heads, self.embed_dim, self.head_dim, self.hidden_dim, name=f"layer_{i}")
      for i in range(self.num_layers)
    ]

  @nn.jit
  def __call__(self, tokens: jax.Array) -> jax.Array:  # tokens: [B, T] -> logits [B, T, V]
    x = self.embedder.encode(tokens)
    for block in self.blocks:
      x = block(x)
    return self.embedder.decode(x)


# ------------------------------------------------------------------------------------------- MaxText (NNX)
# Source: AI-Hypercomputer/maxtext, MaxText/layers/linears.py (DenseGeneral, compute_dot_general_nnx).


def _canonical(x) -> tuple[int, ...]:
  return tuple(x) if isinstance(x, Sequence) else (x,)


class DenseGeneral(nnx.Module):
  """MaxText's DenseGeneral: kernel [*in, *out], inputs and kernel cast to `dtype`, then lax.dot_general."""

  def __init__(
    self,
    in_features_shape,
    out_features_shape,
    axis=-1,
    weight_dtype=jnp.float32,
    dtype=jnp.float32,
    use_bias: bool = False,
    *,
    rngs: nnx.Rngs,
  ):
    self.in_features_shape = _canonical(in_features_shape)
    self.out_features_shape = _canonical(out_features_shape)
    self.axis = _canonical(axis)
    self.dtype = dtype
    shape = self.in_features_shape + self.out_features_shape
    self.kernel = nnx.Param(nnx.initializers.normal(0.3)(rngs.params(), shape, weight_dtype))
    self.bias = nnx.Param(jnp.zeros(self.out_features_shape, weight_dtype)) if use_bias else None

  def __call__(self, inputs: jax.Array) -> jax.Array:
    inputs = jnp.asarray(inputs, self.dtype)
    axis = tuple(a % inputs.ndim for a in self.axis)
    kernel = jnp.asarray(self.kernel[...], self.dtype)
    contract = tuple(range(len(axis)))
    output = jax.lax.dot_general(inputs, kernel, ((axis, contract), ((), ())))
    if self.bias is not None:
      output = output + jnp.asarray(self.bias[...], self.dtype)
    return output


class MaxTextMlpAttention(nnx.Module):
  """A block built from MaxText DenseGenerals: q/k/v [B, T, D] -> [B, T, N, H], out [B, T, N, H] -> [B, T, D],
  an MLP wi [B, T, D] -> [B, T, F] and wo back."""

  def __init__(self, d: int = 8, heads: int = 2, head_dim: int = 4, hidden: int = 12, *, rngs: nnx.Rngs):
    self.query = DenseGeneral(d, (heads, head_dim), rngs=rngs)
    self.key = DenseGeneral(d, (heads, head_dim), rngs=rngs)
    self.value = DenseGeneral(d, (heads, head_dim), rngs=rngs)
    self.out = DenseGeneral((heads, head_dim), d, axis=(-2, -1), rngs=rngs)
    self.wi = DenseGeneral(d, hidden, use_bias=True, rngs=rngs)
    self.wo = DenseGeneral(hidden, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, T, D]
    q, k, v = self.query(x), self.key(x), self.value(x)  # [B, T, N, H]
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / 2.0
    h = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v)
    x = x + self.out(h)
    return x + self.wo(nnx.gelu(self.wi(x)))


# ------------------------------------------------------------------------------------------- refusals


_bound_dot_general = jax.lax.dot_general  # a module that imported dot_general by name


class BoundDotGeneral(nnx.Module):
  """A projection whose op is bound at import time, so no interception can see it."""

  def __init__(self, d: int, f: int, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.normal()(rngs.params(), (d, f)))

  def __call__(self, x):
    return _bound_dot_general(x, self.kernel[...], (((x.ndim - 1,), (0,)), ((), ())))


class BoundNet(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.proj = BoundDotGeneral(8, 8, rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


# ------------------------------------------------------------------------------------------- attribution


class LinenMixed(nn.Module):
  """A generic module with its own weight `w` [8, 8] and a child nn.Dense whose kernel has the same shape,
  called first on another input: the child's contraction must not be taken for the parent's."""

  @nn.compact
  def __call__(self, x):  # x: [B, 8]
    side = nn.Dense(8, use_bias=False, name="side")(2.0 * x)
    w = self.param("w", nn.initializers.normal(0.3), (8, 8))
    return jnp.dot(x, w) + side


class LinenMixedNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return LinenMixed(name="proj")(x)


class NnxMixed(nnx.Module):
  """The NNX sibling of LinenMixed (its child's call has no frame: its kernel is known by identity)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.side = nnx.Linear(8, 8, use_bias=False, rngs=rngs)
    self.w = nnx.Param(nnx.initializers.normal(0.3)(rngs.params(), (8, 8)))

  def __call__(self, x):
    side = self.side(2.0 * x)
    return jnp.dot(x, self.w[...]) + side


class NnxMixedNet(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.proj = NnxMixed(rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


class Switch(nnx.Module):
  """A projection whose op can be switched to one bound by name after inject (`mode = "bound"`)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.normal()(rngs.params(), (8, 8)))
    self.mode = "einsum"

  def __call__(self, x):
    if self.mode == "bound":
      return _bound_dot_general(x, self.kernel[...], (((x.ndim - 1,), (0,)), ((), ())))
    return jnp.einsum("bd,df->bf", x, self.kernel[...])


class SwitchNet(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.proj = Switch(rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


class LinenSwitch(nn.Module):
  """The linen sibling of Switch: `bound` chooses the op."""

  bound: bool = False

  @nn.compact
  def __call__(self, x):
    return LinenSwitchProj(self.bound, name="proj")(x)


class LinenSwitchProj(nn.Module):
  bound: bool

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(), (8, 8))
    if self.bound:
      return _bound_dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return jnp.einsum("bd,df->bf", x, kernel)


class MatmulOperator(nnx.Module):
  """A projection written with the `@` operator, its weight on the left (W [out, in] @ x^T, as torch-style
  code does) for the second one."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.up = nnx.Param(nnx.initializers.normal(0.3)(rngs.params(), (8, 12)))
    self.down = nnx.Param(nnx.initializers.normal(0.3)(rngs.params(), (8, 12)))  # [out, in]

  def __call__(self, x):  # x: [B, 8]
    h = jnp.tanh(x @ self.up[...])  # [B, 12]
    return (self.down[...] @ h.T).T  # [B, 8]


class MatmulNet(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.mlp = MatmulOperator(rngs=rngs)

  def __call__(self, x):
    return self.mlp(x)


class ScannedLayer(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.w = nnx.Param(nnx.initializers.normal()(rngs.params(), (8, 8)))

  def __call__(self, x):
    return jnp.einsum("bd,df->bf", x, self.w[...])


class ScannedStack(nnx.Module):
  """Three generic layers stacked by nnx.vmap (w [3, 8, 8]) and run by nnx.scan."""

  def __init__(self, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return ScannedLayer(rngs)

    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def step(x, layer):
      return layer(x)

    return step(x, self.layers)


class LinenScannedLayer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    w = self.param("w", nn.initializers.normal(), (8, 8))
    return jnp.einsum("bd,df->bf", x, w), None


class LinenScannedStack(nn.Module):
  """Three generic layers under nn.scan (w stored [3, 8, 8])."""

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(LinenScannedLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return scan(name="layers")(x, None)[0]
