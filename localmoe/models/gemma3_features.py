"""Gemma 3 split at a layer, for training adapters on the upper layers only (the multi-task LM experiment).

    hidden = gemma3_features.lower_hidden(model, tokens, mask, layers=16)      # numpy [N, T, W], computed once
    upper = gemma3_features.Upper(model, start=16, answer_ids=ids)             # blocks 16.. (copies), final norm
    logits = upper(jnp.asarray(hidden[:8]), jnp.asarray(mask[:8]))            # [8, len(ids)] at the last token

The lower `layers` blocks carry no adapter in any method, so their output is the same in every step and every
method: `lower_hidden` computes it once per example (embedding times sqrt(width), then blocks 0..layers-1,
exactly as `gemma3.Gemma3.__call__` without a cache). `Upper` holds copies of the remaining blocks, the final
RMSNorm and the embedding rows of a restricted answer vocabulary (the tied output projection restricted to those
tokens), and returns the logits of those tokens at the last position, the only one a classification-by-
next-token needs: the 262,144-row output projection, two thirds of a forward at 128 tokens, is never computed.
Prompts are left-padded, so the last position is every prompt's last real token. `localmoe.nnx_inject` adapts
Upper's projections as it adapts the whole model's (paths "layers/<i - start>/attn/q_proj"); `swapped_in` puts
the adapted blocks back into the whole model for generation (`gemma3_generate.generate`).

`few_shot_logits`: the same answer logits of the whole frozen model for prompts that follow a per-task prefix
of demonstrations, the prefix run once per task into a KV cache (`gemma3.Cache`) that every prompt extends.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from localmoe.models import gemma3
from localmoe.models import gemma3_generate


def attention_masks(config: gemma3.Config, mask):
  """positions [B, T] (real tokens counted), global and local `allowed` [B, T, T] (causal; local within the
  sliding window), as `gemma3.Gemma3.__call__` builds them for a call without a cache."""
  mask = jnp.asarray(mask).astype(bool)
  t = mask.shape[1]
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [B, T]
  causal = mask[:, None, :] & (jnp.arange(t)[None, None, :] <= jnp.arange(t)[None, :, None])
  near = (positions[:, :, None] - positions[:, None, :]) < config.sliding_window
  return positions, causal, causal & near


def run_blocks(blocks, first: int, config: gemma3.Config, x, mask):
  """x [B, T, W] through `blocks`, the first of which is block number `first` of the model."""
  positions, causal, local = attention_masks(config, mask)
  for i, block in enumerate(blocks):
    x, _ = block(x, positions, causal if config.is_global(first + i) else local)
  return x


def embed(model: gemma3.Gemma3, tokens):
  """The scaled token embedding [B, T, W] (Gemma multiplies by sqrt(width) in the compute dtype)."""
  return model.embed(tokens) * jnp.asarray(math.sqrt(model.config.width), model.dtype)


def chunked(fn, arrays, chunk: int) -> np.ndarray:
  """fn over rows in chunks of `chunk` (the last one padded with repeated rows: one compiled shape)."""
  n = len(arrays[0])
  out = []
  for s in range(0, n, chunk):
    index = np.minimum(np.arange(s, s + chunk), n - 1)
    out.append(np.asarray(fn(*(a[index] for a in arrays)))[: min(chunk, n - s)])
  return np.concatenate(out)


def lower_hidden(model: gemma3.Gemma3, tokens, mask, layers: int, chunk: int = 32) -> np.ndarray:
  """Hidden states after blocks 0..layers-1: numpy [N, T, W] in the model's compute dtype (weights passed
  to the compiled function as arguments, never as constants)."""
  graphdef, state = nnx.split(model)
  fn = functools.partial(_lower_hidden, graphdef, layers, state)
  return chunked(fn, (np.asarray(tokens), np.asarray(mask)), chunk)


# One program per model structure and shape, shared by the splits and by later runs in the process.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _lower_hidden(graphdef, layers: int, state, tokens, mask):
  m = nnx.merge(graphdef, state)
  return run_blocks(list(m.layers)[:layers], 0, m.config, embed(m, tokens), mask)  # [B, T, W]


class Upper(nnx.Module):
  """Blocks start.. of a Gemma 3 (copies), its final norm and the answer rows of the tied embedding.

  __call__(hidden [B, T, W] after block start-1, mask [B, T]) -> logits [B, A] float32 of the answer tokens at
  the last position; `features` -> the final-normed hidden state there [B, W] (a linear probe's input).
  """

  def __init__(self, model: gemma3.Gemma3, start: int, answer_ids):
    config = model.config
    if not 0 <= start < config.num_layers:
      raise ValueError(f"start={start} must lie in 0..{config.num_layers - 1} (at least one upper block).")
    self.config = config
    self.start = start
    self.layers = nnx.List([nnx.clone(block) for block in list(model.layers)[start:]])
    self.final_norm = nnx.clone(model.final_norm)
    rows = model.embed.embedding.get_value()[jnp.asarray(np.asarray(answer_ids, np.int32))]
    self.answers = nnx.Param(rows)  # [A, W]

  def features(self, hidden, mask):
    x = run_blocks(list(self.layers), self.start, self.config, hidden, mask)
    return self.final_norm(x[:, -1]).astype(jnp.float32)  # [B, W]

  def __call__(self, hidden, mask):
    return self.features(hidden, mask) @ self.answers.get_value().astype(jnp.float32).T  # [B, A]


@contextlib.contextmanager
def swapped_in(model: gemma3.Gemma3, upper: Upper) -> Iterator[gemma3.Gemma3]:
  """Within the block, `model`'s blocks start.. are `upper`'s (e.g. adapted and trained): the whole model
  computes with them (generation); the original blocks are put back on exit."""
  originals = list(model.layers)[upper.start :]
  try:
    for i, block in enumerate(upper.layers):
      model.layers[upper.start + i] = block
    yield model
  finally:
    for i, block in enumerate(originals):
      model.layers[upper.start + i] = block


def exact_match(
  model: gemma3.Gemma3, tokenizer, tokens, mask, context, answers, max_new_tokens: int, upper: Upper | None = None
) -> np.ndarray:
  """Greedy generation (`gemma3_generate.generate`, routing on `context`) from left-padded prompts: [N] bool,
  whether the first line of each output, stripped and lower-cased, equals answers[n]. With `upper`, the
  model's upper blocks are upper's (e.g. adapted and trained) during the generation."""
  ids = [row[m > 0].tolist() for row, m in zip(np.asarray(tokens), np.asarray(mask))]
  with contextlib.ExitStack() as stack:
    host = model if upper is None else stack.enter_context(swapped_in(model, upper))
    out, lengths = gemma3_generate.generate(host, ids, max_new_tokens, context=np.asarray(context))
  texts = gemma3_generate.decode_texts(tokenizer, out, lengths)
  return np.asarray([t.split("\n")[0].strip().lower() == a.lower() for t, a in zip(texts, answers)])


def few_shot_logits(
  model: gemma3.Gemma3, prefixes, prefix_mask, tokens, mask, task, answer_ids, chunk: int = 16
) -> np.ndarray:
  """Answer logits [N, A] of the frozen model at the last token of prefixes[task[n]] + tokens[n].

  prefixes [P, S] (left-padded, prefix_mask [P, S]): one demonstration prefix per task, run once into a KV
  cache; tokens [N, T] left-padded prompts with mask; task [N] which prefix each prompt follows.
  """
  graphdef, state = nnx.split(model)
  prefixes, prefix_mask = jnp.asarray(prefixes), jnp.asarray(prefix_mask)
  slots = prefixes.shape[1] + np.asarray(tokens).shape[1]
  rows = jnp.asarray(np.asarray(answer_ids, np.int32))

  @jax.jit
  def prefill(state):
    m = nnx.merge(graphdef, state)
    cache = gemma3.Cache.empty(m.config, prefixes.shape[0], slots, m.dtype)
    return m(prefixes, prefix_mask, cache=cache, return_hidden=True)[1]

  @jax.jit
  def extend(state, cache, tokens, mask, task):
    m = nnx.merge(graphdef, state)
    mine = gemma3.Cache(
      k=tuple(k[task] for k in cache.k),
      v=tuple(v[task] for v in cache.v),
      valid=cache.valid[task],
      positions=cache.positions[task],
      index=cache.index,
    )
    hidden, _ = m(tokens, mask, cache=mine, return_hidden=True)  # [B, T, W]
    answers = m.embed.embedding.get_value()[rows].astype(jnp.float32)  # [A, W]
    return hidden[:, -1].astype(jnp.float32) @ answers.T

  cache = prefill(state)
  return chunked(
    lambda t, k, s: extend(state, cache, t, k, s),
    (np.asarray(tokens), np.asarray(mask), np.asarray(task, np.int32)),
    chunk,
  )
