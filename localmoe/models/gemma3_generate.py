"""Generation with Gemma 3: a batch of prompts of different lengths, one jit-compiled decode with the KV cache.

    tokens, lengths = gemma3_generate.generate(model, tokenizer.encode(texts), max_new_tokens=16)
    tokens, lengths = gemma3_generate.generate(model, ids, 16, context=task_ids)          # routed adapters
    tokens, lengths = gemma3_generate.generate(model, ids, 16, temperature=0.8, top_p=0.95, seed=1)

Prompts are left-padded to one width (positions count real tokens only, so padding changes nothing), run
through the model once (prefill), then each new token is fed back with the cache (`gemma3.Cache`) inside one
`lax.while_loop`. The weights are arguments of the compiled function (never closed-over constants). A sequence
stops at any of `eos_ids` (kept in its output) or after `max_new_tokens`; later slots hold `pad_id`.

The routing context (labels [batch] or [batch, D] of `localmoe.nnx_inject`'s context-routed adapters) is set
once for the whole decode, so every step of sequence i routes on context[i]. Plain, adapted and merged models
(`nnx_inject.merge`) generate through this same function; a model without adapters ignores the context.

Sampling: temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted to the smallest
set of tokens whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020), drawn with
`jax.random.PRNGKey(seed)` folded with the step.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from localmoe.models import gemma3

EOS_IDS = (1, 106)  # <eos>, <end_of_turn>
PAD_ID = 0


def _check_int(name: str, value, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
  return int(value)


def prompt_lists(prompts, mask=None) -> list[list[int]]:
  """Token-id lists from a list of id lists, or from a 2-D array (with its 0/1 `mask` for any padding side)."""
  if isinstance(prompts, (np.ndarray, jax.Array)):
    array = np.asarray(prompts)
    if array.ndim != 2:
      raise ValueError(
        f"prompts has shape {array.shape}: pass a 2-D [batch, T] array (with mask= when padded) "
        "or a list of token-id lists of any lengths."
      )
    keep = np.ones(array.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if keep.shape != array.shape:
      raise ValueError(f"mask has shape {keep.shape} but prompts has {array.shape}.")
    return [row[k].tolist() for row, k in zip(array, keep)]
  if mask is not None:
    raise ValueError("mask= goes with a 2-D prompts array; lists of token ids need no mask.")
  if isinstance(prompts, str) or not isinstance(prompts, Sequence):
    raise TypeError("prompts must be a list of token-id lists (tokenizer.encode(texts)) or a 2-D array.")
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      raise TypeError(f"prompts[{i}] is a str: encode the texts first (tokenizer.encode(texts)).")
    out.append([int(t) for t in np.asarray(p).reshape(-1)])
  return out


def left_pad(prompts: list[list[int]], width: int, pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
  """tokens [B, width] int32 and mask [B, width] int32 with each prompt at the right end."""
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p) :] = p
    mask[i, width - len(p) :] = 1
  return tokens, mask


def generate(
  model: gemma3.Gemma3,
  prompts,
  max_new_tokens: int,
  *,
  mask=None,
  context=None,
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  eos_ids: Sequence[int] = EOS_IDS,
  pad_id: int = PAD_ID,
  pad_to_multiple: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
  """New tokens [B, max_new_tokens] int32 (pad_id after a stop) and their counts [B] (EOS included).

  Args:
    model: a `gemma3.Gemma3`, plain, adapted by `nnx_inject.inject`, or merged.
    prompts: a list of token-id lists (different lengths welcome), or a 2-D array with `mask`.
    max_new_tokens: tokens to generate at most per prompt (>= 1).
    context: routing context, labels [B] or [B, D], for context-routed adapters (held through the decode).
    temperature: 0 = greedy; > 0 samples. top_p: nucleus mass in (0, 1]. seed: the sampling key.
    eos_ids: tokens that end a sequence. pad_to_multiple: prompt width rounded up (fewer compilations).
  """
  config = model.config
  prompts = prompt_lists(prompts, mask)
  max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
  pad_to_multiple = _check_int("pad_to_multiple", pad_to_multiple, 1)
  if not prompts:
    raise ValueError("prompts is empty: pass at least one prompt.")
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token (BOS).")
    bad = [t for t in p if not 0 <= t < config.vocab_size]
    if bad:
      raise ValueError(f"prompts[{i}] holds token id {bad[0]}, outside the vocabulary 0..{config.vocab_size - 1}.")
  longest = max(len(p) for p in prompts)
  if longest + max_new_tokens > config.max_context:
    raise ValueError(
      f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context "
      f"of {config.max_context} tokens: shorten the prompt or generate fewer tokens."
    )
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)) or not temperature >= 0:
    raise ValueError(f"temperature={temperature!r} must be a number >= 0 (0 = greedy).")
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.number)) or not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p!r} must be in (0, 1].")
  eos = tuple(_check_int("eos_ids[]", e, 0) for e in eos_ids)
  if context is not None:
    context = _checked_context(model, context, len(prompts))
  width = -(-longest // pad_to_multiple) * pad_to_multiple
  tokens, prompt_mask = left_pad(prompts, width, pad_id)
  graphdef, state = nnx.split(model)
  out, lengths = _decode(
    graphdef,
    state,
    jnp.asarray(tokens),
    jnp.asarray(prompt_mask),
    context,
    jax.random.PRNGKey(seed),
    jnp.float32(max(temperature, 1e-6)),
    jnp.float32(top_p),
    max_new=max_new_tokens,
    greedy=temperature == 0,
    eos=eos,
    pad_id=int(pad_id),
  )
  return np.asarray(out), np.asarray(lengths)


def _checked_context(model, context, batch: int):
  """The context as an array, refused (one line) unless one per prompt and, as labels, within context_dim."""
  from localmoe import nnx_inject  # pylint: disable=import-outside-toplevel

  context = jnp.asarray(context)
  if context.ndim == 0 or context.shape[0] != batch:
    raise ValueError(
      f"context has shape {tuple(context.shape)}: pass one context per prompt ({batch}: labels "
      "[batch] or vectors [batch, D])."
    )
  if jnp.issubdtype(context.dtype, jnp.integer) and context.ndim == 1:
    dims = {
      int(m.adapter.definition.context_dim)
      for _, m in nnx.iter_modules(model)
      if isinstance(m, nnx_inject.AdaptedLayer)
      and m.adapter is not None
      and getattr(m.adapter.definition, "context_dim", None)
    }
    bad = [int(c) for c in np.asarray(context) if not all(0 <= c < d for d in dims)]
    if bad:
      raise ValueError(f"context holds task id {bad[0]}, outside 0..{min(dims) - 1} (the adapters' context_dim).")
  return context


def _pick(logits, key, temperature, top_p, greedy: bool):
  """Next token [B] from logits [B, vocab] (float32): argmax, or a nucleus sample."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
  probs = jax.nn.softmax(ordered, axis=-1)
  inside = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass before < top_p
  cutoff = jnp.min(jnp.where(inside, ordered, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
  logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "greedy", "eos", "pad_id"))
def _decode(graphdef, state, tokens, mask, context, key, temperature, top_p, *, max_new, greedy, eos, pad_id):
  """Prefill, then max_new - 1 cached steps in a while_loop: (tokens [B, max_new], lengths [B])."""
  model = nnx.merge(graphdef, state)
  batch, width = tokens.shape
  eos_arr = jnp.asarray(eos, jnp.int32)

  def run():
    cache = gemma3.Cache.empty(model.config, batch, width + max_new, model.dtype)
    hidden, cache = model(tokens, mask, cache=cache, return_hidden=True)  # [B, P, W]
    first = _pick(model.logits(hidden[:, -1]), jax.random.fold_in(key, 0), temperature, top_p, greedy)
    out = jnp.full((batch, max_new), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_arr)

    def cond(carry):
      step, _, done, _, _ = carry
      return (step < max_new) & ~jnp.all(done)

    def body(carry):
      step, prev, done, cache, out = carry
      hidden, cache = model(prev[:, None], (~done)[:, None], cache=cache, return_hidden=True)  # [B, 1, W]
      nxt = _pick(model.logits(hidden[:, 0]), jax.random.fold_in(key, step), temperature, top_p, greedy)
      nxt = jnp.where(done, pad_id, nxt)
      out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
      return step + 1, nxt, done | jnp.isin(nxt, eos_arr), cache, out

    _, _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), first, done, cache, out))
    is_eos = jnp.isin(out, eos_arr)
    stop = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new)
    return out, stop

  if context is None:
    return run()
  from localmoe import nnx_inject  # pylint: disable=import-outside-toplevel

  with nnx_inject.routing_context(model, context, capture=False):  # generation needs no router traces
    return run()


def decode_texts(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
  """The generated texts (control tokens such as EOS dropped)."""
  return [tokenizer.decode(row[:n]) for row, n in zip(np.asarray(tokens), np.asarray(lengths))]


def jit_forward(model: gemma3.Gemma3):
  """A jitted `forward(tokens, mask=None, context=None) -> logits` taking the weights as arguments."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens, mask, context):
    m = nnx.merge(graphdef, state)
    return m(tokens, mask, context=context)

  def call(tokens, mask=None, context=None) -> Any:
    tokens = jnp.asarray(tokens)
    mask = jnp.ones(tokens.shape, jnp.int32) if mask is None else jnp.asarray(mask)
    return forward(state, tokens, mask, context)

  return call
