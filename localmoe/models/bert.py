"""A BERT encoder in flax.linen, laid out like the Hugging Face checkpoint so its weights load by name.

    model = Bert(num_layers=6)                                  # MiniLM-L6 sizes are the defaults
    hidden = model.apply({"params": params}, input_ids, attention_mask)      # [B, T, 384]
    sentence = mean_pool(hidden, attention_mask)                             # [B, 384]

Module paths mirror the checkpoint's key names (`encoder.layer.3.attention.self.query.weight` is the param
`encoder/layer_3/attention/self/query/kernel`), so `params_from_checkpoint` is a short, visible key map:

    embeddings/word_embeddings        nn.Embed   [vocab, H]
    embeddings/position_embeddings    nn.Embed   [max_position, H]
    embeddings/token_type_embeddings  nn.Embed   [type_vocab, H]
    embeddings/LayerNorm
    encoder/layer_{i}/attention/self/query     nn.DenseGeneral  [..., H] -> [..., heads, head_dim]
    encoder/layer_{i}/attention/self/key       nn.DenseGeneral  [..., H] -> [..., heads, head_dim]
    encoder/layer_{i}/attention/self/value     nn.DenseGeneral  [..., H] -> [..., heads, head_dim]
    encoder/layer_{i}/attention/output/dense   nn.DenseGeneral  [..., heads, head_dim] -> [..., H]
    encoder/layer_{i}/attention/output/LayerNorm
    encoder/layer_{i}/intermediate/dense       nn.Dense         [..., H] -> [..., FFN]   (then GELU, erf form)
    encoder/layer_{i}/output/dense             nn.Dense         [..., FFN] -> [..., H]
    encoder/layer_{i}/output/LayerNorm

The attention projections are `nn.DenseGeneral` exactly as in linen's `MultiHeadDotProductAttention`
(q/k/v: `features=(heads, head_dim), axis=-1`; output: `features=H, axis=(-2, -1)`), so adapter injection
that handles linen's attention handles this model. `ADAPTER_TARGETS` is a regex (for `re.fullmatch` on the
"/"-joined module path) matching q, k, v, the attention output and both FFN projections of every layer:
6 per layer, 36 for MiniLM-L6. The checkpoint's pooler is not part of the model (sentence embeddings mean
pool the last hidden state). Dropout is left out: the backbone is used frozen, at inference settings.

Params are float32; `dtype` is the compute dtype (float32, or bfloat16 for speed). Softmax and LayerNorm
statistics are computed in float32 either way.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# q, k, v, attention output, FFN in and FFN out of every layer (fullmatch on the "/"-joined module path).
ADAPTER_TARGETS = (
  r"encoder/layer_\d+/(attention/self/(query|key|value)|attention/output/dense"
  r"|intermediate/dense|output/dense)"
)


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm (BertEmbeddings)."""

  vocab_size: int
  hidden_size: int
  max_position: int
  type_vocab_size: int
  layer_norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    seq_len = input_ids.shape[-1]
    embed = lambda n, name: nn.Embed(n, self.hidden_size, dtype=self.dtype, name=name)
    words = embed(self.vocab_size, "word_embeddings")(input_ids)  # [B, T, H]
    positions = embed(self.max_position, "position_embeddings")(jnp.arange(seq_len))  # [T, H]
    types = embed(self.type_vocab_size, "token_type_embeddings")(token_type_ids)  # [B, T, H]
    h = words + positions[None] + types  # [B, T, H]
    return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(h)


class SelfAttention(nn.Module):
  """Scaled dot-product attention over the unpadded keys (BertSelfAttention); returns per-head context."""

  num_heads: int
  head_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, h, attention_mask):
    proj = lambda name: nn.DenseGeneral((self.num_heads, self.head_dim), axis=-1, dtype=self.dtype, name=name)
    q = proj("query")(h)  # [B, T, heads, head_dim]
    k = proj("key")(h)  # [B, T, heads, head_dim]
    v = proj("value")(h)  # [B, T, heads, head_dim]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)  # [B, heads, T, T]
    scores = scores / np.sqrt(self.head_dim).astype(np.float32)
    keep = attention_mask[:, None, None, :].astype(bool)  # [B, 1, 1, T]
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    weights = nn.softmax(scores, axis=-1).astype(self.dtype)  # [B, heads, T, T]
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # [B, T, heads, head_dim]


class AttentionOutput(nn.Module):
  """Merge heads, project, residual, LayerNorm (BertSelfOutput)."""

  hidden_size: int
  layer_norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, context, residual):
    out = nn.DenseGeneral(self.hidden_size, axis=(-2, -1), dtype=self.dtype, name="dense")(context)  # [B, T, H]
    return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(out + residual)


class Attention(nn.Module):
  """BertAttention: `self` (q, k, v and the weighting) then `output` (projection, residual, LayerNorm)."""

  hidden_size: int
  num_heads: int
  layer_norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, h, attention_mask):
    context = SelfAttention(self.num_heads, self.hidden_size // self.num_heads, self.dtype, name="self")(
      h, attention_mask
    )  # [B, T, heads, head_dim]
    return AttentionOutput(self.hidden_size, self.layer_norm_eps, self.dtype, name="output")(context, h)


class Intermediate(nn.Module):
  """FFN up-projection and BERT's exact (erf) GELU."""

  intermediate_size: int
  dtype: Any

  @nn.compact
  def __call__(self, h):
    return nn.gelu(nn.Dense(self.intermediate_size, dtype=self.dtype, name="dense")(h), approximate=False)


class Output(nn.Module):
  """FFN down-projection, residual, LayerNorm (BertOutput)."""

  hidden_size: int
  layer_norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x, residual):
    out = nn.Dense(self.hidden_size, dtype=self.dtype, name="dense")(x)  # [B, T, H]
    return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(out + residual)


class Layer(nn.Module):
  """One post-LayerNorm transformer block (BertLayer)."""

  hidden_size: int
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, h, attention_mask):
    h = Attention(self.hidden_size, self.num_heads, self.layer_norm_eps, self.dtype, name="attention")(
      h, attention_mask
    )  # [B, T, H]
    ffn = Intermediate(self.intermediate_size, self.dtype, name="intermediate")(h)  # [B, T, FFN]
    return Output(self.hidden_size, self.layer_norm_eps, self.dtype, name="output")(ffn, h)


class Encoder(nn.Module):
  """The stack of layers, named `layer_0` ... `layer_{n-1}` (from `layer_{first_layer}` when set)."""

  num_layers: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  dtype: Any
  first_layer: int = 0  # run layers first_layer .. num_layers - 1 only (see `Upper`)

  @nn.compact
  def __call__(self, h, attention_mask):
    for i in range(self.first_layer, self.num_layers):
      h = Layer(
        self.hidden_size, self.num_heads, self.intermediate_size, self.layer_norm_eps, self.dtype, name=f"layer_{i}"
      )(h, attention_mask)  # [B, T, H]
    return h


class Bert(nn.Module):
  """BERT encoder: `(input_ids [B, T] int32, attention_mask [B, T]) -> last hidden state [B, T, H]`.

  Defaults are all-MiniLM-L6-v2's sizes. `num_layers` may be smaller than the checkpoint's (the first
  layers are loaded; see `params_from_checkpoint`).
  """

  num_layers: int = 6  # encoder layers
  hidden_size: int = 384  # H
  num_heads: int = 12  # attention heads; head_dim = H / heads
  intermediate_size: int = 1536  # FFN width
  vocab_size: int = 30522
  max_position: int = 512  # longest sequence the position table covers
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32  # compute dtype; params stay float32

  def __post_init__(self):
    if self.num_layers < 1:
      raise ValueError(f"num_layers={self.num_layers} must be at least 1.")
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
        "pick a head count that divides it."
      )
    if jnp.dtype(self.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
      raise ValueError(f"dtype={self.dtype} is not supported; use jnp.float32 (default) or jnp.bfloat16.")
    super().__post_init__()

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None):
    if input_ids.shape[-1] > self.max_position:
      raise ValueError(
        f"input_ids has {input_ids.shape[-1]} tokens, more than max_position="
        f"{self.max_position}; truncate the input (tokenize(..., max_length=...))."
      )
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    h = Embeddings(
      self.vocab_size,
      self.hidden_size,
      self.max_position,
      self.type_vocab_size,
      self.layer_norm_eps,
      self.dtype,
      name="embeddings",
    )(input_ids, token_type_ids)  # [B, T, H]
    return Encoder(
      self.num_layers,
      self.hidden_size,
      self.num_heads,
      self.intermediate_size,
      self.layer_norm_eps,
      self.dtype,
      name="encoder",
    )(h, attention_mask)  # [B, T, H]


class Upper(nn.Module):
  """Layers `first_layer` .. `num_layers - 1` of a `Bert` on the hidden states after layer `first_layer`:
  `(hidden [B, T, H], attention_mask [B, T]) -> last hidden state [B, T, H]`.

  With the lower layers frozen and unadapted, their output is a constant of each example: compute it once
  (`hidden_after`) and train adapters on the upper layers only. Module paths are the full model's
  (`encoder/layer_{i}/...`), so its params are `{"encoder": {f"layer_{i}": ...}}` of the checkpoint's
  (`upper_params`) and `ADAPTER_TARGETS` matches its layers.
  """

  model: Bert  # the full model's sizes
  first_layer: int  # 0 .. model.num_layers - 1

  def __post_init__(self):
    if not 0 <= self.first_layer < self.model.num_layers:
      raise ValueError(
        f"first_layer={self.first_layer} must lie in 0..{self.model.num_layers - 1} (the model has "
        f"{self.model.num_layers} layers)."
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, hidden, attention_mask):
    m = self.model
    return Encoder(
      m.num_layers,
      m.hidden_size,
      m.num_heads,
      m.intermediate_size,
      m.layer_norm_eps,
      m.dtype,
      first_layer=self.first_layer,
      name="encoder",
    )(hidden.astype(m.dtype), attention_mask)


def upper_params(params: Mapping[str, Any], first_layer: int, num_layers: int) -> dict:
  """The params of `Upper(model, first_layer)` taken from the full model's params."""
  return {"encoder": {f"layer_{i}": params["encoder"][f"layer_{i}"] for i in range(first_layer, num_layers)}}


def hidden_after(model: Bert, params, input_ids, attention_mask, layers: int):
  """Hidden states after the first `layers` encoder layers (0: the embeddings' output): [B, T, H]."""
  lower = Bert(
    **{
      **{f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ("parent", "name")},
      "num_layers": max(layers, 1),
    }
  )
  if layers == 0:
    embeddings = Embeddings(
      model.vocab_size, model.hidden_size, model.max_position, model.type_vocab_size, model.layer_norm_eps, model.dtype
    )
    return embeddings.apply({"params": params["embeddings"]}, input_ids, jnp.zeros_like(input_ids))
  lower_params = {
    "embeddings": params["embeddings"],
    "encoder": {f"layer_{i}": params["encoder"][f"layer_{i}"] for i in range(layers)},
  }
  return lower.apply({"params": lower_params}, input_ids, attention_mask)


def from_hf_config(config: Mapping[str, Any], num_layers: int | None = None, dtype: Any = jnp.float32) -> Bert:
  """A `Bert` with the sizes of a Hugging Face BERT `config.json` (first `num_layers` layers if given)."""
  if config.get("hidden_act", "gelu") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(
      f"config.json has hidden_act={config.get('hidden_act')!r}, position_embedding_type="
      f"{config.get('position_embedding_type')!r}; only 'gelu' and 'absolute' are supported."
    )
  total = int(config["num_hidden_layers"])
  num_layers = total if num_layers is None else num_layers
  if not 1 <= num_layers <= total:
    raise ValueError(f"num_layers={num_layers}: the checkpoint has {total} layers; use 1..{total} or None.")
  return Bert(
    num_layers=num_layers,
    hidden_size=int(config["hidden_size"]),
    num_heads=int(config["num_attention_heads"]),
    intermediate_size=int(config["intermediate_size"]),
    vocab_size=int(config["vocab_size"]),
    max_position=int(config["max_position_embeddings"]),
    type_vocab_size=int(config["type_vocab_size"]),
    layer_norm_eps=float(config["layer_norm_eps"]),
    dtype=dtype,
  )


# --- checkpoint (Hugging Face BertModel names) -> linen params --------------------------------------

_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_SKIPPED_PREFIXES = ("pooler.", "embeddings.position_ids")  # not part of the encoder's params


def params_from_checkpoint(tensors: Mapping[str, np.ndarray], model: Bert) -> dict:
  """Converts a BertModel state dict {key: array} to `model`'s params (float32 numpy), by name.

  The key map: "." separates modules, `layer.N` is `layer_N`; `weight` is `kernel` (transposed, since torch
  stores [out, in]) for linear maps, `embedding` for embeddings and `scale` for LayerNorm; `bias` stays
  `bias`. q/k/v kernels are reshaped to [H, heads, head_dim], the attention output kernel to
  [heads, head_dim, H]. Layers at or past `model.num_layers`, the pooler and `position_ids` are skipped.
  Raises ValueError naming any missing key or any shape that disagrees with the model.
  """
  heads, head_dim = model.num_heads, model.hidden_size // model.num_heads
  params: dict = {}
  for key, value in tensors.items():
    if key.startswith(_SKIPPED_PREFIXES):
      continue
    match = _LAYER_KEY.fullmatch(key)
    if match and int(match[1]) >= model.num_layers:
      continue
    *modules, leaf = (f"encoder.layer_{match[1]}.{match[2]}" if match else key).split(".")
    value = np.asarray(value, np.float32)
    name = modules[-1]
    if leaf == "weight" and name == "LayerNorm":
      leaf = "scale"
    elif leaf == "weight" and name.endswith("_embeddings"):
      leaf = "embedding"
    elif leaf == "weight":
      leaf, value = "kernel", value.T  # [in, out]
      if name in ("query", "key", "value"):
        value = value.reshape(-1, heads, head_dim)  # [H, heads, head_dim]
      elif modules[-2:] == ["output", "dense"] and modules[-3] == "attention":
        value = value.reshape(heads, head_dim, -1)  # [heads, head_dim, H]
    elif leaf == "bias" and name in ("query", "key", "value"):
      value = value.reshape(heads, head_dim)  # [heads, head_dim]
    elif leaf != "bias":
      raise ValueError(f"checkpoint key {key!r}: unknown parameter {leaf!r} (expected weight or bias).")
    node = params
    for module in modules:
      node = node.setdefault(module, {})
    node[leaf] = value
  _check_against_model(params, model)
  return params


def _check_against_model(params: dict, model: Bert) -> None:
  """Raises ValueError if `params` lacks a param of `model` or has one of another shape."""
  ids = jnp.zeros((1, 1), jnp.int32)
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids)))["params"]
  want = {
    "/".join(str(k.key) for k in path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]
  }
  got = {
    "/".join(str(k.key) for k in path): np.shape(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = [f"{p}: checkpoint {got[p]}, model {want[p]}" for p in sorted(set(want) & set(got)) if got[p] != want[p]]
  if missing or extra or wrong:
    raise ValueError(
      f"checkpoint does not fit Bert(num_layers={model.num_layers}, hidden_size="
      f"{model.hidden_size}, ...): missing {missing[:5]}, unexpected {extra[:5]}, "
      f"shape mismatches {wrong[:5]}. Check that config.json belongs to the weights."
    )


def num_params(model: Bert) -> int:
  """Parameter count of `model`, computed from its sizes (no weights needed)."""
  h, f = model.hidden_size, model.intermediate_size
  embeddings = (model.vocab_size + model.max_position + model.type_vocab_size) * h + 2 * h
  layer = 4 * (h * h + h) + 2 * 2 * h + (h * f + f) + (f * h + h)  # q, k, v, out; 2 LayerNorms; FFN
  return embeddings + model.num_layers * layer


def mean_pool(hidden, mask):
  """Mean of `hidden [B, T, H]` over the positions where `mask [B, T]` is nonzero -> [B, H] (float32).

  A row with no valid position returns zeros (the sum is divided by max(count, 1e-9), as in
  sentence-transformers).
  """
  mask = mask.astype(jnp.float32)[..., None]  # [B, T, 1]
  summed = jnp.sum(hidden.astype(jnp.float32) * mask, axis=-2)  # [B, H]
  return summed / jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)  # [B, H]
