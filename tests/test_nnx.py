"""Adapters on Flax NNX models and on einsum layers (localmoe.nnx_inject, localmoe.einsum_layers): outputs equal
hand-written models, context routing, nnx.Optimizer over the adapter variable type, merge, adapter files shared
with linen, stacked layers, the NNX adapter modules, dtype."""

import os
import re

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from localmoe import adapter_io, adapters, inject, nnx_inject
from localmoe.adapters import common
from tests import oracles

D, HEADS, HD, T, B, TASKS = 16, 2, 8, 5, 6, 3

LORA = {"method": "lora", "rank": 2, "alpha": 4.0}
DORA = {"method": "dora", "rank": 2}
MELORA = {"method": "melora", "num_blocks": 2, "rank": 2}
LOCALIZED = {"method": "localized_lora", "k_y": 2, "k_x": 4, "rank": 2}
CELLWISE_CTX = {
  "method": "cellwise_moe",
  "k_y": 2,
  "k_x": 2,
  "rank": 2,
  "num_experts": 3,
  "router_input": "context",
  "context_dim": TASKS,
}
BLOCKWISE_CTX = dict(CELLWISE_CTX, method="blockwise_moe")
CELLWISE_ACT = dict(CELLWISE_CTX, router_input="activation", context_dim=None)
SPECS = [LORA, DORA, MELORA, LOCALIZED, BLOCKWISE_CTX, CELLWISE_CTX, CELLWISE_ACT]
ATTN = r"attn/(query|key|value|out)"


def _spec_id(spec):
  return spec["method"] + ("/" + spec["router_input"] if "router_input" in spec else "")


def _routes_on_context(spec):
  return spec.get("router_input") == "context"


def _normal(seed, shape, scale=1.0):
  """N(0, scale^2) from numpy: test data without compiling a JAX random kernel per shape (seconds each)."""
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _np_init(seed=0):
  """A kernel initializer for the test backbones, N(0, 1/D), drawn by numpy in call order."""
  rng = np.random.default_rng(seed)
  return lambda key, shape, dtype=jnp.float32: jnp.asarray(rng.normal(size=shape) / np.sqrt(D), dtype)


def _randomize_nnx(model, seed=0, scale=0.3):
  """Random adapter params (B != 0), DoRA magnitudes kept positive."""
  state = nnx.state(model, nnx.All(nnx_inject.AdapterParam, nnx.Not(nnx_inject.ExtraParam)))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  new = [
    jnp.abs(_normal((seed, i), l.shape, scale)) + 1.0
    if "magnitude" in jax.tree_util.keystr(p)
    else _normal((seed, i), l.shape, scale)
    for i, (p, l) in enumerate(leaves)
  ]
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))


def _randomize(tree, seed=0, scale=0.3):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return jax.tree_util.tree_unflatten(treedef, [_normal((seed, i), l.shape, scale) for i, l in enumerate(leaves)])


# ------------------------------------------------------------------------------------------- adapter math by hand


def _hand_delta(spec, params, x, kernel, context=None):
  """Delta(x) of one adapter from the paper's formulas (oracles.py; LoRA Eq. 1; DoRA's weight decomposition).

  x [batch, ..., d_in], kernel W0 [d_in, d_out], context labels [batch] broadcast over the middle axes.
  """
  d_in, d_out = kernel.shape
  module = adapters.make(spec, d_in=d_in, d_out=d_out)  # fields only; its forward is not used
  s = common.scaling(module.alpha, module.rank)
  if spec["method"] == "lora":
    return s * (x @ params["A"]) @ params["B"].T  # Eq. 1
  if spec["method"] == "dora":
    merged = kernel + s * params["A"] @ params["B"].T  # [d_in, d_out]
    return x @ (params["magnitude"] * merged / jnp.linalg.norm(merged, axis=0) - kernel)
  if _routes_on_context(spec):
    context = jnp.broadcast_to(context.reshape(context.shape + (1,) * (x.ndim - 2)), x.shape[:-1])
  return oracles.apply(module, params, x, context)  # Eq. 4, 6, 8; MELoRA's diagonal


# ------------------------------------------------------------------------------------------- NNX transformer block


class Block(nnx.Module):
  """A plain NNX transformer block: nnx.MultiHeadAttention, an nnx.Linear FFN and a head."""

  def __init__(self, rngs, param_dtype=jnp.float32):
    init = _np_init()  # the same weights for every Block
    self.attn = nnx.MultiHeadAttention(
      num_heads=HEADS, in_features=D, decode=False, param_dtype=param_dtype, kernel_init=init, rngs=rngs
    )
    self.ffn = nnx.Linear(D, D, param_dtype=param_dtype, kernel_init=init, rngs=rngs)
    self.head = nnx.Linear(D, 2, param_dtype=param_dtype, kernel_init=init, rngs=rngs)

  def __call__(self, x):  # x: [batch, tokens, D]
    h = x + self.attn(x)
    h = h + jax.nn.gelu(self.ffn(h))
    return self.head(h.mean(1))  # [batch, 2]


class HandBlock(nnx.Module):
  """`Block` with adapters on q/k/v/out and the FFN, written out: attention by einsums, Delta by the formulas."""

  def __init__(self, frozen, adapter_params, spec):
    self.frozen = nnx.data(frozen)  # plain arrays, never trained
    self.adapter_params = nnx.data(adapter_params)
    self.spec = spec

  def __call__(self, x, context=None):
    p, a = self.frozen, self.adapter_params

    def delta(name, inp, kernel):
      return _hand_delta(self.spec, a[name], inp, kernel.reshape(inp.shape[-1], -1), context)

    def proj(name, inp):
      kernel, bias = p["attn"][name]["kernel"], p["attn"][name]["bias"]  # [D, heads, head_dim]
      y = jnp.einsum("btd,dhk->bthk", inp, kernel) + bias
      return y + delta(f"attn/{name}", inp, kernel).reshape(y.shape)

    q, k, v = proj("query", x), proj("key", x), proj("value", x)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q / np.sqrt(HD), k), axis=-1)
    heads = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, T, D)  # [B, T, heads * head_dim]
    out = p["attn"]["out"]
    attn = heads @ out["kernel"].reshape(D, D) + out["bias"] + delta("attn/out", heads, out["kernel"])
    h = x + attn
    f = h @ p["ffn"]["kernel"] + p["ffn"]["bias"] + delta("ffn", h, p["ffn"]["kernel"])
    h = h + jax.nn.gelu(f)
    return h.mean(1) @ p["head"]["kernel"] + p["head"]["bias"]


def _frozen_arrays(model):
  """The backbone's weights: plain nnx.Param, not the adapters' or the extras' (AdapterParam subclasses)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx_inject.AdapterParam))))


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_nnx_block_equals_a_hand_written_model(spec):
  x = _normal(0, (B, T, D))
  labels = jnp.arange(B) % TASKS
  model = Block(nnx.Rngs(1))
  frozen = _frozen_arrays(model)
  nnx_inject.inject(model, spec, x[:1], target_modules=ATTN + "|ffn", key=jax.random.PRNGKey(2))
  layers = nnx_inject.layers(model)
  assert [l.path for l in layers] == ["attn/query", "attn/key", "attn/value", "attn/out", "ffn"]
  assert [l.kind for l in layers] == ["LinearGeneral"] * 4 + ["Linear"]
  assert layers[0].out_shape == (HEADS, HD) and layers[3].in_shape == (HEADS, HD)
  _randomize_nnx(model)
  context = labels if _routes_on_context(spec) else None
  got = nnx_inject.call(model, x, context=context)
  want = HandBlock(frozen, nnx_inject.trainable(model)["adapter"], spec)(x, context)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert nnx_inject.num_params(model) == sum(adapters.make(spec, d_in=D, d_out=D).num_params() for _ in range(5))


# ------------------------------------------------------------------------------------------- einsum projections

# Gemma-style einsum projections: q with a [D, heads, head_dim] kernel, k with [heads, D, head_dim] and an output
# in [batch, heads, tokens, head_dim] order, v with an ellipsis, out contracting (heads, head_dim).
EQ = {
  "query": ("btd,dnh->btnh", (D, HEADS, HD)),
  "key": ("btd,ndh->bnth", (HEADS, D, HD)),
  "value": ("...d,dnh->...nh", (D, HEADS, HD)),
  "out": ("btnh,nhd->btd", (HEADS, HD, D)),
}


class LinenEinsumAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    q, k, v = (nn.Einsum(EQ[n][1], EQ[n][0], name=n)(x) for n in ("query", "key", "value"))
    w = jax.nn.softmax(jnp.einsum("bqnh,bnkh->bnqk", q / np.sqrt(HD), k), axis=-1)
    return nn.Einsum(EQ["out"][1], EQ["out"][0], name="out")(jnp.einsum("bnqk,bknh->bqnh", w, v))


class NNXEinsumAttention(nnx.Module):
  def __init__(self, rngs):
    for name, (eq, shape) in EQ.items():
      setattr(
        self,
        name,
        nnx.Einsum(
          eq,
          shape,
          bias_shape=shape[-1:] if name == "out" else shape[1:] if name != "key" else (HEADS, HD),
          kernel_init=_np_init(),
          rngs=rngs,
        ),
      )

  def __call__(self, x):
    q, k, v = self.query(x), self.key(x), self.value(x)
    w = jax.nn.softmax(jnp.einsum("bqnh,bnkh->bnqk", q / np.sqrt(HD), k), axis=-1)
    return self.out(jnp.einsum("bnqk,bknh->bqnh", w, v))


def _hand_einsum_attention(p, a, spec, x, context):
  """Einsum attention with Delta added to every projection: the kernels flattened by hand (contracted, features)."""
  flat = {
    "query": lambda w: w.reshape(D, D),
    "key": lambda w: w.transpose(1, 0, 2).reshape(D, D),
    "value": lambda w: w.reshape(D, D),
    "out": lambda w: w.reshape(D, D),
  }

  def proj(name, inp, flat_in):
    eq, _ = EQ[name]
    y = jnp.einsum(eq, inp, p[name]["kernel"]) + p[name]["bias"].reshape(
      (HEADS, 1, HD) if name == "key" else p[name]["bias"].shape
    )
    delta = _hand_delta(spec, a[name], flat_in, flat[name](p[name]["kernel"]), context)  # [B, T, d_out]
    if name == "key":
      return y + delta.reshape(B, T, HEADS, HD).transpose(0, 2, 1, 3)
    return y + delta.reshape(y.shape)

  q, k, v = (proj(n, x, x) for n in ("query", "key", "value"))
  w = jax.nn.softmax(jnp.einsum("bqnh,bnkh->bnqk", q / np.sqrt(HD), k), axis=-1)
  heads = jnp.einsum("bnqk,bknh->bqnh", w, v)
  return proj("out", heads, heads.reshape(B, T, D))


@pytest.mark.slow
@pytest.mark.parametrize("spec", [LORA, DORA, LOCALIZED, CELLWISE_CTX], ids=_spec_id)
def test_einsum_attention_equals_a_hand_written_model_in_linen_and_nnx(spec):
  x = _normal(0, (B, T, D))
  labels = jnp.arange(B) % TASKS
  context = labels if _routes_on_context(spec) else None
  names = ("query", "key", "value", "out")
  # linen
  model = LinenEinsumAttention()
  params = _randomize(jax.eval_shape(model.init, jax.random.PRNGKey(1), x)["params"], seed=3)  # no init compile
  adapted, trainable = inject.inject(
    model, params, spec, x[:1], target_modules=r"query|key|value|out", key=jax.random.PRNGKey(2)
  )
  assert [l.kind for l in adapted.layers] == ["Einsum"] * 4
  assert [(l.d_in, l.d_out) for l in adapted.layers] == [(D, D)] * 4
  assert adapted.layers[1].in_shape == (D,) and adapted.layers[1].out_shape == (HEADS, HD)
  assert adapted.layers[3].in_shape == (HEADS, HD) and adapted.layers[3].equation == "btnh,nhd->btd"
  if spec["method"] == "dora":
    trainable = {
      "adapter": {
        n: dict(_randomize(trainable["adapter"][n], 5), magnitude=trainable["adapter"][n]["magnitude"] + 0.5)
        for n in names
      },
      "extras": {},
    }
  else:
    trainable = _randomize(trainable, seed=5)
  got = adapted.apply(params, trainable, x, context=context)
  want = _hand_einsum_attention(params, trainable["adapter"], spec, x, context)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if spec["method"] != "dora":
    merged = adapted.merge(params, trainable, context=None if context is None else 1)
    np.testing.assert_allclose(
      model.apply({"params": merged}, x),
      adapted.apply(params, trainable, x, context=None if context is None else jnp.ones(B, int)),
      rtol=1e-5,
      atol=1e-5,
    )
  # NNX, same frozen weights, same adapter params
  nnx_model = NNXEinsumAttention(nnx.Rngs(0))
  for n in names:
    getattr(nnx_model, n).kernel.set_value(params[n]["kernel"])
    getattr(nnx_model, n).bias.set_value(params[n]["bias"])
  nnx_inject.inject(nnx_model, spec, x[:1], target_modules=r"query|key|value|out", key=jax.random.PRNGKey(2))
  assert [l.to_json() for l in nnx_inject.layers(nnx_model)] == [l.to_json() for l in adapted.layers]
  for n in names:
    nnx.update(getattr(nnx_model, n).adapter, {"params": trainable["adapter"][n]})
  np.testing.assert_allclose(nnx_inject.call(nnx_model, x, context=context), want, rtol=1e-5, atol=1e-5)


def test_einsum_equations_without_a_grid_view_are_refused_naming_layer_and_equation():
  class PerBatch(nn.Module):
    @nn.compact
    def __call__(self, x):  # a kernel per batch index
      return nn.Einsum((B, D, 4), "bd,bdf->bf", name="mix")(x)

  x = jnp.ones((B, D))
  params = _randomize(jax.eval_shape(PerBatch().init, jax.random.PRNGKey(0), x)["params"])
  with pytest.raises(
    ValueError,
    match=r"layer 'mix' is an einsum layer with equation 'bd,bdf->bf': axis 'b' is in "
    r"the input, the kernel and the output",
  ):
    inject.inject(PerBatch(), params, LORA, x, target_modules="mix", key=jax.random.PRNGKey(0))

  class Summed(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.Einsum("btd,dfk->bf", (D, 4, 3), kernel_init=_np_init(), rngs=rngs)  # sums a kernel-only axis

    def __call__(self, x):
      return self.proj(x)

  with pytest.raises(
    ValueError,
    match=r"layer 'proj' is an einsum layer with equation 'btd,dfk->bf': axis 't' is "
    r"summed over one operand only",
  ):
    nnx_inject.inject(Summed(nnx.Rngs(0)), LORA, jnp.ones((1, T, D)), target_modules="proj", key=jax.random.PRNGKey(0))


# ------------------------------------------------------------------------------------------- context routing


def test_context_as_labels_or_one_hot_agree_and_a_missing_context_names_the_layer():
  x = _normal(0, (B, T, D))
  labels = jnp.arange(B) % TASKS
  model = nnx_inject.inject(Block(nnx.Rngs(1)), CELLWISE_CTX, x[:1], target_modules=ATTN, key=jax.random.PRNGKey(2))
  _randomize_nnx(model)
  by_label = nnx_inject.call(model, x, context=labels)
  with nnx_inject.routing_context(model, jax.nn.one_hot(labels, TASKS)):
    by_one_hot = model(x)  # the model's own __call__
  np.testing.assert_allclose(by_label, by_one_hot, rtol=1e-6, atol=1e-6)
  other = nnx_inject.call(model, x, context=(labels + 1) % TASKS)
  assert float(jnp.abs(other - by_label).max()) > 1e-3
  with pytest.raises(
    ValueError,
    match=r"layer 'attn/query' has a context-routed adapter .* called without a "
    r"context: call it inside `with localmoe.nnx_inject.routing_context",
  ):
    model(x)
  # Under nnx.jit the context is model state: a new context is used, not the first one baked in.
  forward = nnx.jit(lambda m, x: m(x))
  with nnx_inject.routing_context(model, labels):
    first = forward(model, x)
  with nnx_inject.routing_context(model, (labels + 1) % TASKS):
    second = forward(model, x)
  np.testing.assert_allclose(first, by_label, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(second, other, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_router_traces_give_the_same_losses_and_diagnostics_as_linen():
  x = _normal(0, (B, T, D))
  labels = jnp.arange(B) % TASKS
  rules = [(ATTN, CELLWISE_CTX), ("ffn", CELLWISE_ACT)]
  model = nnx_inject.inject(Block(nnx.Rngs(1)), rules, x[:1], target_modules=ATTN + "|ffn", key=jax.random.PRNGKey(2))
  _randomize_nnx(model)
  _, traces = nnx_inject.call(model, x, context=labels, capture_routing=True)
  assert [t.path for t in traces] == ["attn/query", "attn/key", "attn/value", "attn/out", "ffn"]
  assert traces[0].gates.shape == (B, 4, 3) and traces[4].gates.shape == (B, T, 4, 3)
  losses = inject.router_losses(traces, load_balance=0.5, z_loss=0.1)
  gates = [t.gates.reshape(-1, 4, 3) for t in traces]  # a hand count, every row weighted 1
  balance = sum(3 * (jax.nn.one_hot(jnp.argmax(g, -1), 3).mean(0) * g.mean(0)).sum(-1).mean() for g in gates)
  np.testing.assert_allclose(losses["load_balance"], balance, rtol=1e-5)
  usage = inject.routing_diagnostics(traces[:4], groups=labels, num_groups=TASKS)["usage"]
  assert usage.shape == (4, TASKS, 4, 3)
  np.testing.assert_allclose(usage[0, 1], traces[0].gates[1], rtol=1e-6)  # one routing per task


# ------------------------------------------------------------------------------------------- training, merge


@pytest.mark.slow
def test_nnx_optimizer_over_the_adapter_type_trains_only_the_adapters_and_extras():
  x = _normal(0, (B, T, D))
  labels = jnp.arange(B) % TASKS
  y = (x[:, 0, 0] > 0).astype(jnp.int32)
  model = nnx_inject.inject(
    Block(nnx.Rngs(1)),
    CELLWISE_CTX,
    x[:1],
    target_modules=ATTN + "|ffn",
    key=jax.random.PRNGKey(2),
    trainable_extras="head",
  )
  assert nnx_inject.num_extra_params(model) == D * 2 + 2
  frozen_before = _frozen_arrays(model)
  head_before = np.asarray(model.head.kernel.get_value())
  optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx_inject.AdapterParam)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      with nnx_inject.routing_context(model, labels) as routing:
        logits = model(x)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + inject.router_losses(routing, load_balance=0.01)["aux_loss"]

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx_inject.AdapterParam))(model)
    optimizer.update(model, grads)
    return loss, grads

  losses = []
  for _ in range(8):
    loss, grads = step(model, optimizer)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses
  grad_types = {type(v) for v in jax.tree_util.tree_leaves(grads, is_leaf=lambda v: isinstance(v, nnx.Variable))}
  assert grad_types <= {nnx_inject.AdapterParam, nnx_inject.ExtraParam}, grad_types
  frozen_after = _frozen_arrays(model)  # plain nnx.Param: the backbone
  assert "head" not in frozen_after
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, {k: v for k, v in frozen_before.items() if k != "head"}, frozen_after
  )
  assert float(np.abs(np.asarray(model.head.kernel.get_value()) - head_before).max()) > 0  # extras trained


@pytest.mark.parametrize("spec", [LORA, DORA, MELORA, LOCALIZED, BLOCKWISE_CTX, CELLWISE_CTX], ids=_spec_id)
def test_merged_nnx_model_equals_the_adapted_model(spec):
  x = _normal(0, (B, T, D))
  model = nnx_inject.inject(
    Block(nnx.Rngs(1)), spec, x[:1], target_modules=ATTN + "|ffn", key=jax.random.PRNGKey(2), trainable_extras="head"
  )
  _randomize_nnx(model, scale=0.2)
  model.head.bias.set_value(model.head.bias.get_value() + 0.5)  # a trained extra goes into the merge
  context = 1 if _routes_on_context(spec) else None
  merged = nnx_inject.merge(model, context=context)
  assert type(merged.attn.query) is nnx.LinearGeneral and type(merged.ffn) is nnx.Linear
  assert not jax.tree_util.tree_leaves(nnx.state(merged, nnx_inject.AdapterParam))
  adapted = nnx_inject.call(model, x, context=None if context is None else jnp.ones(B, int))
  np.testing.assert_allclose(merged(x), adapted, rtol=1e-5, atol=1e-5)
  assert type(model.ffn) is nnx_inject.AdaptedLayer  # the adapted model is left as it was


def test_activation_routed_adapters_cannot_be_merged_and_the_error_names_the_layer():
  x = jnp.ones((1, T, D))
  model = nnx_inject.inject(Block(nnx.Rngs(1)), CELLWISE_ACT, x, target_modules="ffn", key=jax.random.PRNGKey(2))
  with pytest.raises(ValueError, match=r"layer 'ffn': CellWiseLoRAMoE routes on its input"):
    nnx_inject.merge(model)
  ctx = nnx_inject.inject(Block(nnx.Rngs(1)), CELLWISE_CTX, x, target_modules="ffn", key=jax.random.PRNGKey(2))
  with pytest.raises(ValueError, match=r"layer 'ffn' is context-routed: merge\(model, context="):
    nnx_inject.merge(ctx)


# ------------------------------------------------------------------------------------------- adapter files


class LinenBlock(nn.Module):
  """`Block` in linen, with the same module names (attn/query, ..., ffn, head)."""

  @nn.compact
  def __call__(self, x):
    h = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(x, x)
    h = h + jax.nn.gelu(nn.Dense(D, name="ffn")(h))
    return nn.Dense(2, name="head")(h.mean(1))


def _nnx_block_with(params):
  """The NNX `Block` holding the linen params (same paths, same kernel layouts)."""
  model = Block(nnx.Rngs(0))
  nnx.update(model, jax.tree_util.tree_map(jnp.asarray, params))
  return model


def test_adapter_files_round_trip_between_linen_and_nnx(tmp_path):
  x = _normal(0, (B, T, D))
  labels = jnp.arange(B) % TASKS
  linen_model = LinenBlock()
  params = _randomize(jax.eval_shape(linen_model.init, jax.random.PRNGKey(1), x)["params"], seed=1)
  rules = [(ATTN, CELLWISE_CTX), ("ffn", DORA)]
  adapted, trainable = inject.inject(
    linen_model, params, rules, x[:1], target_modules=ATTN + "|ffn", key=jax.random.PRNGKey(2), trainable_extras="head"
  )
  trainable = jax.tree_util.tree_map_with_path(
    lambda p, a: a + 0.5 if "magnitude" in jax.tree_util.keystr(p) else a, _randomize(trainable, seed=7)
  )
  want = adapted.apply(params, trainable, x, context=labels)
  np.testing.assert_allclose(
    _nnx_block_with(params)(x), linen_model.apply({"params": params}, x), rtol=1e-5, atol=1e-5
  )  # the two backbones agree
  adapter_io.save_adapter(str(tmp_path / "from_linen"), adapted, trainable)
  model = nnx_inject.load_adapter(str(tmp_path / "from_linen"), _nnx_block_with(params), x[:1])
  np.testing.assert_allclose(nnx_inject.call(model, x, context=labels), want, rtol=1e-5, atol=1e-5)
  assert nnx_inject.num_params(model) == adapted.num_params()
  assert nnx_inject.num_extra_params(model) == adapted.num_extra_params(params)
  # NNX -> file -> linen, after a change on the NNX side.
  model.head.bias.set_value(model.head.bias.get_value() + 1.0)
  nnx_inject.save_adapter(str(tmp_path / "from_nnx"), model)
  again, loaded = adapter_io.load_adapter(str(tmp_path / "from_nnx"), linen_model, params, x[:1])
  np.testing.assert_allclose(
    again.apply(params, loaded, x, context=labels), nnx_inject.call(model, x, context=labels), rtol=1e-5, atol=1e-5
  )

  # Another model: refused before it is changed, naming the layer.
  class Wider(Block):
    def __init__(self, rngs):
      super().__init__(rngs)
      self.ffn = nnx.Linear(D, 2 * D, kernel_init=_np_init(), rngs=rngs)

    def __call__(self, x):
      h = x + self.attn(x)
      return self.head((h + jax.nn.gelu(self.ffn(h))[..., :D]).mean(1))

  wider = Wider(nnx.Rngs(0))
  with pytest.raises(
    ValueError,
    match=r"layer 'ffn': the saved adapter was built for \[16\] -> \[16\] but this "
    r"model's layer is \[16\] -> \[32\]",
  ):
    nnx_inject.load_adapter(str(tmp_path / "from_nnx"), wider, x[:1])
  assert type(wider.ffn) is nnx.Linear


# ------------------------------------------------------------------------------------------- stacks, modules, dtype


def test_layers_of_nnx_vmap_and_scan_stacks_get_one_adapter_per_layer():
  class Stack(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return nnx.Linear(D, D, kernel_init=_np_init(), rngs=rngs)

      self.blocks = make(rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def body(layer, h):
        return jnp.tanh(layer(h))

      return body(self.blocks, x)

  model = Stack(nnx.Rngs(0))
  x = jnp.ones((2, D))
  assert model(x).shape == (2, D)
  kernels, biases = model.blocks.kernel.get_value(), model.blocks.bias.get_value()  # [3, D, D], [3, D]
  nnx_inject.inject(model, LORA, x, target_modules="blocks", key=jax.random.PRNGKey(0))
  assert [(l.path, l.stack) for l in nnx_inject.layers(model)] == [("blocks", (3,))]
  params = _randomize(model.blocks.adapter.linen_params())
  assert params["A"].shape[0] == 3  # [3, ...] per layer
  nnx.update(model.blocks.adapter, {"params": params})
  lora = adapters.make(LORA, d_in=D, d_out=D)
  h = x
  for l in range(3):  # unrolled by hand
    h = jnp.tanh(
      h @ kernels[l] + biases[l] + lora.apply({"params": jax.tree_util.tree_map(lambda a, l=l: a[l], params)}, h)
    )
  np.testing.assert_allclose(model(x), h, rtol=1e-5, atol=1e-5)

  class Unrolled(nnx.Module):  # the same layers as a list
    def __init__(self, rngs):
      self.blocks = nnx.List([nnx.Linear(D, D, kernel_init=_np_init(), rngs=rngs) for _ in range(3)])

    def __call__(self, x):
      for layer in self.blocks:
        x = jnp.tanh(layer(x))
      return x

  unrolled = nnx_inject.inject(Unrolled(nnx.Rngs(0)), LORA, x, target_modules=r"blocks/\d", key=jax.random.PRNGKey(0))
  assert [l.path for l in nnx_inject.layers(unrolled)] == ["blocks/0", "blocks/1", "blocks/2"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS + [{"method": "per_task_lora", "rank": 2, "context_dim": TASKS}], ids=_spec_id)
def test_nnx_adapter_modules_have_the_linen_params_and_outputs(spec):
  x = _normal(0, (B, D))
  kernel = _normal(1, (D, 8))
  labels = jnp.arange(B) % TASKS
  adapter = nnx_inject.Adapter(spec, d_in=D, d_out=8, rngs=nnx.Rngs(3), kernel=kernel)
  linen = adapters.make(spec, d_in=D, d_out=8)
  n_params = sum(np.size(v) for v in jax.tree_util.tree_leaves(nnx.state(adapter, nnx_inject.AdapterParam)))
  assert adapter.num_params() == linen.num_params() == n_params
  nnx.update(adapter, {"params": _randomize(adapter.linen_params(), seed=2)})
  extra = {"kernel": kernel} if spec["method"] == "dora" else {}
  context = labels if spec.get("router_input", "context" if "context_dim" in spec else None) == "context" else None
  np.testing.assert_allclose(
    adapter(x, context=context, **extra),
    linen.apply({"params": adapter.linen_params()}, x, context=context, **extra),
    rtol=1e-6,
  )
  if spec.get("router_input") != "activation":  # Delta W of one context (Eq. 9)
    one = None if context is None else jnp.ones(B, jnp.int32)
    dense = adapter.delta_weight(context=None if context is None else 1, **extra)  # [d_out, d_in]
    np.testing.assert_allclose(x @ dense.T, adapter(x, context=one, **extra), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bfloat16_nnx_backbone_trains_float32_adapters():
  x = _normal(0, (B, T, D)).astype(jnp.bfloat16)
  model = nnx_inject.inject(
    Block(nnx.Rngs(1), param_dtype=jnp.bfloat16),
    LOCALIZED,
    x[:1],
    target_modules="attn/out|ffn",
    key=jax.random.PRNGKey(2),
  )
  adapter_leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx_inject.AdapterParam))
  assert {v.dtype for v in adapter_leaves} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(lambda: model(x)).dtype == jnp.bfloat16
  grads = nnx.jit(
    nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2), argnums=nnx.DiffState(0, nnx_inject.AdapterParam))
  )(model)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(g.dtype == jnp.float32 and bool(jnp.isfinite(g).all()) for g in leaves)
  assert any(float(jnp.abs(g).max()) > 0 for g in leaves)  # B = 0 at init: its gradient is not


def test_queryable_lora_is_refused_on_nnx_models_by_name():
  with pytest.raises(ValueError, match="QueryableLoRA carries a state from layer to layer"):
    nnx_inject.inject(
      Block(nnx.Rngs(0)),
      {"method": "queryable_lora", "num_atoms": 4, "rank": 2, "top_k": 2},
      jnp.ones((1, T, D)),
      target_modules="ffn",
      key=jax.random.PRNGKey(0),
    )


# ------------------------------------------------------------------------------------------- from outside


@pytest.mark.slow
def test_public_api_context_routed_cellwise_moe_on_a_plain_nnx_attention_model():
  import localmoe
  from localmoe import nnx_inject as api

  class Classifier(nnx.Module):  # a plain NNX model, nothing localmoe
    def __init__(self, rngs):
      self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=D, decode=False, kernel_init=_np_init(), rngs=rngs)
      self.head = nnx.Linear(D, 2, kernel_init=_np_init(), rngs=rngs)

    def __call__(self, x):
      return self.head(self.attn(x).mean(1))

  x = _normal(0, (12, T, D))
  task = jnp.arange(12) % TASKS
  y = (x[:, 0, 0] > 0).astype(jnp.int32)
  model = api.inject(
    Classifier(nnx.Rngs(0)),
    dict(CELLWISE_CTX, b_init="normal_0.01"),
    x[:1],
    target_modules=ATTN,
    key=jax.random.PRNGKey(1),
  )
  with api.routing_context(model, task):
    a = model(x)
  with api.routing_context(model, (task + 1) % TASKS):
    b = model(x)
  assert float(jnp.abs(a - b).max()) > 1e-6
  optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=localmoe.AdapterParam)

  def loss_fn(model):
    with api.routing_context(model, task):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  step = nnx.jit(
    lambda m, o: (lambda l, g: (o.update(m, g), l)[1])(
      *nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, localmoe.AdapterParam))(m)
    )
  )
  losses = [float(step(model, optimizer)) for _ in range(8)]
  assert losses[-1] < losses[0], losses


def test_an_adapted_layer_is_not_adapted_twice():
  x = jnp.ones((1, T, D))
  model = nnx_inject.inject(Block(nnx.Rngs(0)), LORA, x, target_modules="ffn", key=jax.random.PRNGKey(0))
  for target in ("ffn", ".*"):
    with pytest.raises(ValueError, match="layer 'ffn' is already adapted"):
      nnx_inject.inject(model, LORA, x, target_modules=target, key=jax.random.PRNGKey(0))


# ------------------------------------------------------------------------------------------- strict files, bad calls


class Tiny(nnx.Module):
  """Two nnx.Linear layers and a branch the plain call never takes (`use_side`)."""

  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 8, kernel_init=_np_init(), rngs=rngs)
    self.head = nnx.Linear(8, 3, kernel_init=_np_init(1), rngs=rngs)
    self.side = nnx.Linear(4, 8, kernel_init=_np_init(2), rngs=rngs)

  def __call__(self, x, use_side=False):
    h = self.hidden(x) + (self.side(x) if use_side else 0.0)
    return self.head(jax.nn.relu(h))


TINY_X = _normal(3, (4, 4))
GUMBEL = dict(
  CELLWISE_CTX, k_y=2, k_x=2, rank=1, num_experts=2, router_hard="gumbel_soft", router_dropout=0.5, b_init="normal_0.01"
)


def _tiny_saved(tmp_path):
  model = nnx_inject.inject(
    Tiny(nnx.Rngs(0)), LORA, TINY_X[:1], target_modules="hidden", key=jax.random.PRNGKey(1), trainable_extras="head"
  )
  _randomize_nnx(model)
  directory = str(tmp_path / "adapter")
  nnx_inject.save_adapter(directory, model)
  return directory, os.path.join(directory, adapter_io.WEIGHTS_FILE)


@pytest.mark.parametrize(
  "edit, message",
  [
    (
      lambda a: a.update({"adapter/hidden/A": a["adapter/hidden/A"].astype(np.float16)}),
      r": tensor 'adapter/hidden/A' is float16 but this model needs float32: re-save",
    ),
    (
      lambda a: a.update({"adapter/hidden/B": a["adapter/hidden/B"].astype(np.int32)}),
      r": tensor 'adapter/hidden/B' is int32 but this model needs float32",
    ),
    (
      lambda a: a.update({"extras/other/kernel": np.zeros((2, 2), np.float32)}),
      r" holds tensor 'extras/other/kernel' \(1 such\) that the adapter of adapter_config.json does not have",
    ),
    (lambda a: a.pop("extras/head/bias"), r" lacks 'extras/head/bias': the file and adapter_config.json disagree"),
  ],
  ids=["float16", "int32", "unknown", "missing"],
)
def test_nnx_load_adapter_is_as_strict_as_linen_and_checks_before_changing_the_model(tmp_path, edit, message):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

  directory, path = _tiny_saved(tmp_path)
  arrays = load_file(path)
  edit(arrays)
  save_file(arrays, path, metadata={"format": adapter_io.FORMAT})
  model = Tiny(nnx.Rngs(0))
  with pytest.raises(ValueError, match=re.escape(path) + message) as error:
    nnx_inject.load_adapter(directory, model, TINY_X[:1])
  assert "\n" not in str(error.value)
  assert type(model.hidden) is nnx.Linear and type(model.head.kernel) is nnx.Param  # unchanged


def test_nnx_load_adapter_round_trip_and_adapter_io_agree(tmp_path):
  directory, _ = _tiny_saved(tmp_path)
  source = nnx_inject.inject(
    Tiny(nnx.Rngs(0)), LORA, TINY_X[:1], target_modules="hidden", key=jax.random.PRNGKey(1), trainable_extras="head"
  )
  _randomize_nnx(source)
  loaded = nnx_inject.load_adapter(directory, Tiny(nnx.Rngs(0)), TINY_X[:1])
  np.testing.assert_array_equal(loaded(TINY_X), source(TINY_X))


def test_a_second_inject_into_other_layers_is_refused_in_one_line():
  model = nnx_inject.inject(Tiny(nnx.Rngs(0)), LORA, TINY_X[:1], target_modules="hidden", key=jax.random.PRNGKey(1))
  with pytest.raises(
    ValueError,
    match=r"^Tiny already holds adapters on \['hidden'\] \(an earlier inject\): a "
    r"second inject into other layers is not supported; inject every layer in "
    r"one call .* or merge first \(nnx_inject.merge\(model\)\)",
  ) as error:
    nnx_inject.inject(model, LORA, TINY_X[:1], target_modules="head", key=jax.random.PRNGKey(1))
  assert "\n" not in str(error.value) and type(model.head) is nnx.Linear
  merged = nnx_inject.merge(model)  # the fix the message names works
  again = nnx_inject.inject(merged, LORA, TINY_X[:1], target_modules="head", key=jax.random.PRNGKey(1))
  assert [layer.path for layer in nnx_inject.layers(again)] == ["head"]


def test_a_layer_the_example_call_never_reaches_is_named_at_inject():
  model = Tiny(nnx.Rngs(0))
  with pytest.raises(
    ValueError,
    match=r"layer\(s\) \['side'\] match target_modules='hidden\|side' but the example "
    r"call never reached them.*example_kwargs",
  ):
    nnx_inject.inject(model, LORA, TINY_X[:1], target_modules="hidden|side", key=jax.random.PRNGKey(1))
  assert type(model.hidden) is nnx.Linear
  model = nnx_inject.inject(
    model, LORA, TINY_X[:1], target_modules="hidden|side", key=jax.random.PRNGKey(1), example_kwargs={"use_side": True}
  )
  assert [layer.path for layer in nnx_inject.layers(model)] == ["hidden", "side"]


@pytest.mark.parametrize(
  "bad, error, message",
  [
    (dict(key=None), TypeError, r"key=None is not a PRNG key: pass key=jax.random.PRNGKey\(seed\)"),
    (dict(key=0), TypeError, r"key=0 is not a PRNG key"),
  ],
)
def test_a_missing_key_is_refused_by_name_in_both_hosts(bad, error, message):
  with pytest.raises(error, match=message):
    nnx_inject.inject(Tiny(nnx.Rngs(0)), LORA, TINY_X[:1], target_modules="hidden", **bad)
  linen = nn.Dense(3)
  params = linen.init(jax.random.PRNGKey(0), TINY_X[:1])["params"]
  with pytest.raises(error, match=message):
    inject.inject(linen, params, LORA, TINY_X[:1], target_modules=".*", **bad)


@pytest.mark.parametrize(
  "context",
  [1.0, [1, 2], np.zeros((2, TASKS)), np.ones(TASKS + 1, np.float32), True, np.arange(20)],
  ids=["float", "list", "matrix", "wrong-dim", "bool", "long"],
)
def test_merge_takes_one_context_and_refuses_others_in_one_line(context):
  """The check both hosts' merge run per context-routed layer, before any Delta W is computed."""
  module = adapters.make(CELLWISE_CTX, d_in=4, d_out=8)
  with pytest.raises(
    ValueError,
    match=r"merge: context=.* \(layer 'hidden'\) is not one context: a merged model "
    r"stands for ONE context, an integer label \(context=1\) or one float "
    r"vector \[context_dim=3\]; merge once per context",
  ) as error:
    inject.merge_context(context, module, "hidden")
  assert "\n" not in str(error.value)


@pytest.mark.slow
def test_merge_takes_a_label_a_numpy_label_or_one_vector():
  model = nnx_inject.inject(
    Tiny(nnx.Rngs(0)), CELLWISE_CTX, TINY_X[:1], target_modules="hidden", key=jax.random.PRNGKey(1)
  )
  _randomize_nnx(model)
  merged = [nnx_inject.merge(model, context=c) for c in (1, np.int64(1), np.eye(TASKS, dtype=np.float32)[1])]
  for other in merged[1:]:
    np.testing.assert_allclose(other(TINY_X), merged[0](TINY_X), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"^merge: context=1.0 \(layer 'hidden'\) is not one context"):
    nnx_inject.merge(model, context=1.0)  # the NNX host runs the check
  linen = nn.Sequential([nn.Dense(8)])
  params = linen.init(jax.random.PRNGKey(0), TINY_X[:1])["params"]
  adapted, trainable = inject.inject(
    linen, params, CELLWISE_CTX, TINY_X[:1], target_modules=".*", key=jax.random.PRNGKey(1)
  )
  with pytest.raises(ValueError, match=r"^merge: context=\[1, 2\] \(layer 'layers_0'\) is not one context"):
    adapted.merge(params, trainable, context=[1, 2])  # and the linen host


def test_saving_under_proc_is_one_clear_line():
  model = nnx_inject.inject(Tiny(nnx.Rngs(0)), LORA, TINY_X[:1], target_modules="hidden", key=jax.random.PRNGKey(1))
  with pytest.raises(
    ValueError,
    match=r"^save_adapter: cannot create a directory in /proc/localmoe-test \(.*\): "
    r"pass a path on a writable file system",
  ):
    nnx_inject.save_adapter("/proc/localmoe-test/adapter", model)


@pytest.mark.slow
def test_routing_rngs_reach_the_nnx_adapters_and_evaluation_stays_deterministic():
  """routing_context(..., rngs=) draws Gumbel noise / expert dropout: other keys give other gates (also under
  nnx.jit, where the keys are state), no rngs gives the same gates every call."""
  model = nnx_inject.inject(Tiny(nnx.Rngs(0)), GUMBEL, TINY_X[:1], target_modules="hidden", key=jax.random.PRNGKey(1))
  labels = jnp.arange(4) % TASKS

  def gates(rngs=None):
    _, traces = nnx_inject.call(model, TINY_X, context=labels, capture_routing=True, rngs=rngs)
    return np.asarray(traces[0].gates)

  np.testing.assert_array_equal(gates(), gates())
  one, two = gates({"gumbel": jax.random.key(1)}), gates({"gumbel": jax.random.key(2)})
  assert not np.allclose(one, two) and not np.allclose(one, gates())
  np.testing.assert_array_equal(one, gates({"gumbel": jax.random.key(1)}))

  @nnx.jit
  def forward(model, key):
    with nnx_inject.routing_context(model, labels, rngs={"gumbel": key, "dropout": key}):
      return model(TINY_X)

  assert not np.allclose(forward(model, jax.random.key(1)), forward(model, jax.random.key(2)))
  with pytest.raises(
    ValueError,
    match=r"rngs has stream\(s\) \['params'\]: adapters draw from \['gumbel', "
    r"'dropout'\] only",
  ):
    gates({"params": jax.random.key(0)})
