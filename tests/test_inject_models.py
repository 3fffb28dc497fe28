"""Adapters on real models: DenseGeneral attention, a context through the model, trainable extras, router
losses in training, whole-model merge, dtype (localmoe.inject)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from localmoe import adapters, inject, train
from localmoe.models import bert
from tests import draws

D, HEADS, T, B, TASKS = 16, 2, 5, 6, 3

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
LORA = {"method": "lora", "rank": 2, "alpha": 4.0}


def _randomize(tree, seed=0, scale=0.3):
  """Every leaf replaced by scale * N(0, 1) float32 draws (numpy: no op-by-op dispatch per leaf shape)."""
  return draws.normal_like(tree, seed, scale, jnp.float32)


def _init(model, *args):
  """model.init(PRNGKey(1), *args)["params"] as one jitted program (not op by op)."""
  return jax.jit(model.init)(jax.random.PRNGKey(1), *args)["params"]


def _delta(spec, d_in, d_out, params, x, context=None):
  """Delta of one adapter built by hand: x [..., d_in] -> [..., d_out]; the context broadcast over tokens."""
  module = adapters.make(spec, d_in=d_in, d_out=d_out)
  if context is None or spec.get("router_input") != "context":
    return module.apply({"params": params}, x)
  ctx = jnp.broadcast_to(context.reshape(context.shape + (1,) * (x.ndim - 1 - context.ndim)), x.shape[:-1])
  return module.apply({"params": params}, x, ctx)


# ------------------------------------------------------------------------------------------- attention


class _Attn(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, name="attn")(x, x)


def _hand_attention(p, x, deltas):
  """linen's MultiHeadDotProductAttention written out, with deltas[name](flat input) added to each projection."""

  def proj(name, inp):
    kernel, bias = p[name]["kernel"], p[name]["bias"]
    y = jnp.einsum("btd,dhk->bthk", inp, kernel) + bias
    return y + deltas[name](inp).reshape(y.shape)

  q, k, v = proj("query", x), proj("key", x), proj("value", x)
  w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q / np.sqrt(D // HEADS), k), axis=-1)
  heads = jnp.einsum("bhqk,bkhd->bqhd", w, v)  # [B, T, heads, head_dim]
  out = jnp.einsum("bthd,hdo->bto", heads, p["out"]["kernel"]) + p["out"]["bias"]
  return out + deltas["out"](heads.reshape(*heads.shape[:2], -1))


@pytest.mark.slow
@pytest.mark.parametrize(
  "spec",
  [LORA, CELLWISE_CTX, CELLWISE_ACT, BLOCKWISE_CTX],
  ids=lambda s: s["method"] + "/" + str(s.get("router_input", "")),
)
def test_attention_projections_equal_a_hand_written_model(spec):
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  labels = jnp.arange(B) % TASKS
  model = _Attn()
  params = _init(model, x)
  adapted, trainable = inject.inject(
    model, params, spec, x[:1], target_modules=r"attn/(query|key|value|out)", key=jax.random.PRNGKey(2)
  )
  assert adapted.paths == ("attn/query", "attn/key", "attn/value", "attn/out")
  assert [l.kind for l in adapted.layers] == ["DenseGeneral"] * 4
  assert [(l.d_in, l.d_out) for l in adapted.layers] == [(D, D)] * 4
  assert adapted.layers[0].out_shape == (HEADS, D // HEADS) and adapted.layers[3].in_shape == (HEADS, D // HEADS)
  trainable = _randomize(trainable)
  context = labels if spec.get("router_input") == "context" else None
  got = jax.jit(adapted.apply)(params, trainable, x, context=context)
  deltas = {
    name: (lambda inp, name=name: _delta(spec, D, D, trainable["adapter"][f"attn/{name}"], inp, context))
    for name in ("query", "key", "value", "out")
  }
  want = _hand_attention(params["attn"], x, deltas)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- BERT-style encoder


TINY = dict(num_layers=2, hidden_size=D, num_heads=HEADS, intermediate_size=32, vocab_size=40, max_position=T)


def _layer_norm(p, h, eps=1e-12):
  mean = h.mean(-1, keepdims=True)
  var = ((h - mean) ** 2).mean(-1, keepdims=True)
  return (h - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _hand_bert(p, ids, mask, delta):
  """A 2-layer BERT encoder written out; delta(path, flat_input) is the adapter update of that layer."""
  e = p["embeddings"]
  h = (
    e["word_embeddings"]["embedding"][ids]
    + e["position_embeddings"]["embedding"][jnp.arange(ids.shape[1])]
    + e["token_type_embeddings"]["embedding"][jnp.zeros_like(ids)]
  )
  h = _layer_norm(e["LayerNorm"], h)
  for i in range(TINY["num_layers"]):
    name = f"encoder/layer_{i}"
    lp = p["encoder"][f"layer_{i}"]
    sa = lp["attention"]["self"]

    def proj(n):
      y = jnp.einsum("btd,dhk->bthk", h, sa[n]["kernel"]) + sa[n]["bias"]
      return y + delta(f"{name}/attention/self/{n}", h).reshape(y.shape)

    q, k, v = proj("query"), proj("key"), proj("value")
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // HEADS)
    s = jnp.where(mask[:, None, None, :] > 0, s, jnp.finfo(jnp.float32).min)
    heads = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
    ao = lp["attention"]["output"]
    flat = heads.reshape(*heads.shape[:2], -1)
    out = (
      jnp.einsum("bthd,hdo->bto", heads, ao["dense"]["kernel"])
      + ao["dense"]["bias"]
      + delta(f"{name}/attention/output/dense", flat)
    )
    h = _layer_norm(ao["LayerNorm"], out + h)
    up = h @ lp["intermediate"]["dense"]["kernel"] + lp["intermediate"]["dense"]["bias"]
    up = jax.nn.gelu(up + delta(f"{name}/intermediate/dense", h), approximate=False)
    down = up @ lp["output"]["dense"]["kernel"] + lp["output"]["dense"]["bias"] + delta(f"{name}/output/dense", up)
    h = _layer_norm(lp["output"]["LayerNorm"], down + h)
  return h


@pytest.fixture(scope="module")
def tiny_bert():
  model = bert.Bert(**TINY)
  ids = jax.random.randint(jax.random.PRNGKey(0), (B, T), 0, TINY["vocab_size"])
  mask = jnp.ones((B, T), jnp.int32).at[0, 3:].set(0)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(1), ids, mask)["params"]  # values drawn below
  params = _randomize(shapes, seed=5, scale=0.5)
  return model, params, ids, mask


@pytest.mark.slow
def test_bert_encoder_equals_a_hand_written_model_with_mixed_routers(tiny_bert):
  """Context routers on attention, activation routers on the FFN, in one model (PerLayer rules)."""
  model, params, ids, mask = tiny_bert
  rules = [(r".*attention/.*", CELLWISE_CTX), (r".*", dict(CELLWISE_ACT, k_x=2, k_y=4))]
  adapted, trainable = inject.inject(
    model, params, rules, ids[:1], mask[:1], target_modules=bert.ADAPTER_TARGETS, key=jax.random.PRNGKey(2)
  )
  assert len(adapted.paths) == 12
  assert adapted.context_routed_paths() == tuple(p for p in adapted.paths if "attention" in p)
  trainable = _randomize(trainable, seed=3)
  labels = jnp.arange(B) % TASKS
  by_path = {l.path: l for l in adapted.layers}

  def delta(path, inp):
    layer = by_path[path]
    spec = rules[0][1] if "attention" in path else rules[1][1]
    return _delta(spec, layer.d_in, layer.d_out, trainable["adapter"][path], inp, labels)

  want = jax.jit(_hand_bert, static_argnums=3)(params, ids, mask, delta)
  apply = jax.jit(adapted.apply)
  got = apply(params, trainable, ids, mask, context=labels)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
  # A context-routed model called without a context: one error naming the first such layer.
  with pytest.raises(ValueError, match=r"layer 'encoder/layer_0/attention/self/query' has a context-routed"):
    adapted.apply(params, trainable, ids, mask)


@pytest.mark.slow
def test_context_as_labels_one_hot_or_embedding_agree(tiny_bert):
  model, params, ids, mask = tiny_bert
  adapted, trainable = inject.inject(
    model, params, CELLWISE_CTX, ids[:1], mask[:1], target_modules=bert.ADAPTER_TARGETS, key=jax.random.PRNGKey(2)
  )
  trainable = _randomize(trainable, seed=3)
  labels = jnp.arange(B) % TASKS
  apply = jax.jit(adapted.apply)
  a = apply(params, trainable, ids, mask, context=labels)
  b = apply(params, trainable, ids, mask, context=jax.nn.one_hot(labels, TASKS))
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  c = apply(params, trainable, ids, mask, context=(labels + 1) % TASKS)
  assert float(jnp.abs(a - c).max()) > 1e-3  # the context changes the output
  with pytest.raises(ValueError, match="one context per example"):
    adapted.apply(params, trainable, ids, mask, context=labels[:2])


# ------------------------------------------------------------------------------------------- lifted transforms


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return nn.tanh(nn.Dense(D, name="dense")(h)), None

    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return stack(name="blocks")(x, None)[0]


class _Remat(nn.Module):
  @nn.compact
  def __call__(self, x):
    block = nn.remat(nn.Dense)
    return block(D, name="b1")(nn.tanh(block(D, name="b0")(x)))


@pytest.mark.slow
def test_scanned_layers_get_one_adapter_per_layer_and_remat_layers_adapted():
  x = jnp.ones((2, D))
  scanned = _Scanned()
  params = scanned.init(jax.random.PRNGKey(0), x)["params"]
  adapted, trainable = inject.inject(scanned, params, LORA, x, target_modules=r".*dense", key=jax.random.PRNGKey(0))
  assert adapted.paths == ("blocks/dense",) and adapted.layers[0].stack == (3,)  # kernel [3, D, D]
  trainable = _randomize(trainable)
  lora = adapters.make(LORA, d_in=D, d_out=D)
  h, dense, lora_params = x, params["blocks"]["dense"], trainable["adapter"]["blocks/dense"]
  for l in range(3):  # unrolled by hand
    h = nn.tanh(
      h @ dense["kernel"][l]
      + dense["bias"][l]
      + lora.apply({"params": jax.tree_util.tree_map(lambda a, l=l: a[l], lora_params)}, h)
    )
  np.testing.assert_allclose(adapted.apply(params, trainable, x), h, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"layer\(s\) \['blocks/dense'\] are layers of a scan / vmap stack"):
    inject.inject(
      scanned,
      params,
      {"method": "queryable_lora", "num_atoms": 2, "num_blocks": 1, "rank": 2},
      x,
      target_modules=r".*dense",
      key=jax.random.PRNGKey(0),
    )
  remat = _Remat()
  params = remat.init(jax.random.PRNGKey(0), x)["params"]
  adapted, trainable = inject.inject(remat, params, LORA, x, target_modules=r"b\d", key=jax.random.PRNGKey(0))
  assert adapted.paths == ("b0", "b1")
  trainable = _randomize(trainable)
  lora = adapters.make(LORA, d_in=D, d_out=D)
  h = nn.tanh(x @ params["b0"]["kernel"] + params["b0"]["bias"] + lora.apply({"params": trainable["adapter"]["b0"]}, x))
  want = h @ params["b1"]["kernel"] + params["b1"]["bias"] + lora.apply({"params": trainable["adapter"]["b1"]}, h)
  np.testing.assert_allclose(adapted.apply(params, trainable, x), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- trainable extras


class _WithHeads(nn.Module):
  @nn.compact
  def __call__(self, x, task):
    h = nn.Dense(D, name="body")(x)
    logits = jnp.stack([nn.Dense(4, name=f"head_{t}")(h) for t in range(TASKS)], 1)  # [B, tasks, 4]
    return jnp.take_along_axis(logits, task[:, None, None], 1)[:, 0]


@pytest.mark.slow
def test_trainable_extras_stay_trainable_and_are_counted_apart():
  x = jax.random.normal(jax.random.PRNGKey(0), (B, D))
  task = jnp.arange(B) % TASKS
  model = _WithHeads()
  params = _init(model, x, task)
  adapted, trainable = inject.inject(
    model, params, LORA, x, task, target_modules="body", key=jax.random.PRNGKey(2), trainable_extras=r"head_\d"
  )
  assert adapted.extra_paths == ("head_0", "head_1", "head_2")
  assert adapted.num_extra_params(params) == TASKS * (D * 4 + 4)
  assert adapted.num_params() == 2 * (D + D)
  np.testing.assert_array_equal(trainable["extras"]["head_1"]["kernel"], params["head_1"]["kernel"])
  loss = lambda frozen, t: jnp.sum(adapted.apply(frozen, t, x, task) ** 2)
  g_frozen, g_train = jax.grad(loss, argnums=(0, 1))(params, trainable)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(g_frozen))
  assert float(jnp.abs(g_train["extras"]["head_0"]["kernel"]).max()) > 0
  # Changed extras replace the frozen head in apply.
  trainable["extras"]["head_0"]["bias"] = trainable["extras"]["head_0"]["bias"] + 1.0
  moved = adapted.apply(params, trainable, x, task) - model.apply({"params": params}, x, task)
  np.testing.assert_allclose(moved[task == 0], 1.0, rtol=1e-6)
  np.testing.assert_allclose(moved[task != 0], 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="trainable_extras='nothing' matched no module"):
    inject.inject(
      model, params, LORA, x, task, target_modules="body", key=jax.random.PRNGKey(2), trainable_extras="nothing"
    )


# ------------------------------------------------------------------------------------------- merge


@pytest.mark.slow
@pytest.mark.parametrize(
  "spec",
  [
    LORA,
    {"method": "localized_lora", "k_y": 2, "k_x": 4, "rank": 2},
    {"method": "dora", "rank": 2},
    CELLWISE_CTX,
    BLOCKWISE_CTX,
  ],
  ids=lambda s: s["method"],
)
def test_merged_model_equals_the_adapted_model(tiny_bert, spec):
  model, params, ids, mask = tiny_bert
  adapted, trainable = inject.inject(
    model, params, spec, ids[:1], mask[:1], target_modules=bert.ADAPTER_TARGETS, key=jax.random.PRNGKey(2)
  )
  trainable = _randomize(trainable, seed=4, scale=0.2)
  if spec["method"] == "dora":  # keep DoRA's magnitudes positive and near ||W0||_c
    trainable = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.abs(a) + 1.0 if "magnitude" in str(p) else a, trainable
    )
  routed = spec.get("router_input") == "context"
  plain, adapted_apply = jax.jit(model.apply), jax.jit(adapted.apply)
  for task in [0, 2] if routed else [None]:
    merged = jax.jit(lambda p, t, task=task: adapted.merge(p, t, context=task))(params, trainable)
    labels = None if task is None else jnp.full((B,), task)
    np.testing.assert_allclose(
      plain({"params": merged}, ids, mask),
      adapted_apply(params, trainable, ids, mask, context=labels),
      rtol=1e-5,
      atol=1e-5,
    )
  # The frozen params are left untouched.
  kernel = params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
  assert not np.allclose(merged["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"], kernel)


def test_activation_routed_adapters_cannot_be_merged(tiny_bert):
  model, params, ids, mask = tiny_bert
  adapted, trainable = inject.inject(
    model, params, CELLWISE_ACT, ids[:1], mask[:1], target_modules=bert.ADAPTER_TARGETS, key=jax.random.PRNGKey(2)
  )
  with pytest.raises(ValueError, match=r"layer 'encoder/layer_0/attention/self/query'.*routes on its input"):
    adapted.merge(params, trainable)
  ctx, trainable = inject.inject(
    model, params, CELLWISE_CTX, ids[:1], mask[:1], target_modules=bert.ADAPTER_TARGETS, key=jax.random.PRNGKey(2)
  )
  with pytest.raises(ValueError, match="is context-routed: merge"):
    ctx.merge(params, trainable)


# ------------------------------------------------------------------------------------------- router losses


def _collapsed_router_problem():
  """A cell-wise activation-routed adapter on one Dense layer whose routers all start on expert 0."""
  x = jax.random.normal(jax.random.PRNGKey(0), (256, D))
  y = jnp.tanh(x @ jax.random.normal(jax.random.PRNGKey(1), (D, 4)))
  model = nn.Dense(4)
  params = model.init(jax.random.PRNGKey(2), x)["params"]
  spec = dict(CELLWISE_ACT, k_y=2, k_x=2, num_experts=4, rank=1, router_bias=True)
  adapted, trainable = inject.inject(model, params, spec, x[:1], target_modules=".*", key=jax.random.PRNGKey(3))
  return x, y, params, adapted, trainable


def _router_task(adapted, collapse, balance_weight=None):
  """balance_weight=None: a task with no router loss at all (predict returns no "aux_loss")."""

  def init(key, frozen):
    trainable = adapted.init_adapter(key, frozen)
    router = trainable["adapter"][""]["router"]
    router["bias"] = jnp.zeros_like(router["bias"]).at[..., 0].set(collapse)  # all on expert 0
    return trainable

  def predict(p, frozen, inputs):
    pred, traces = adapted.apply(frozen, p, inputs["x"], capture_routing=True)
    losses = inject.router_losses(traces, load_balance=balance_weight or 0.0)
    aux = {"load_balance": losses["load_balance"]}
    if balance_weight is not None:
      aux["aux_loss"] = losses["aux_loss"]
    return pred, aux

  return train.Task(
    init=init,
    predict=predict,
    aux_names=("load_balance",),
    diagnostics=lambda p, f, inputs: inject.routing_diagnostics(
      adapted.apply(f, p, inputs["x"], capture_routing=True)[1]
    ),
  )


@pytest.mark.slow
def test_balance_loss_moves_a_collapsed_router_toward_uniform_use():
  x, y, params, adapted, _ = _collapsed_router_problem()
  data = train.Data(train={"x": x, "y": y}, test={"x": x, "y": y}, frozen=params)
  settings = train.Settings(epochs=6, batch_size=64, learning_rate=3e-2, weight_decay=0.0)
  without = train.fit(_router_task(adapted, 4.0), data, [0], settings, log=None)
  zero = train.fit(_router_task(adapted, 4.0, 0.0), data, [0], settings, log=None)
  balanced = train.fit(_router_task(adapted, 4.0, 1.0), data, [0], settings, log=None)
  # Weight 0 changes nothing: identical histories, the balance loss is still recorded.
  np.testing.assert_array_equal(zero.history, without.history)
  np.testing.assert_array_equal(zero.train_history, without.train_history)
  usage0 = without.diagnostics["usage"][0, -1, 0, 0]  # [routers, E] of the one layer, last epoch
  usage1 = balanced.diagnostics["usage"][0, -1, 0, 0]
  assert without.diagnostics["usage"].shape == (1, 6, 1, 1, 4, 4)
  assert usage0[:, 0].mean() > 0.6  # still mostly on expert 0
  assert usage1[:, 0].mean() < usage0[:, 0].mean() - 0.2  # moved toward uniform (1/4)
  lb = balanced.train_history[0, :, balanced.train_names.index("load_balance")]
  assert lb[-1] < lb[0]
  assert without.diagnostics["entropy"].shape == (1, 6, 1, 1, 4)


@pytest.mark.slow
def test_router_losses_and_usage_by_group_match_a_hand_count():
  gates = jnp.asarray([[[0.7, 0.3]], [[0.2, 0.8]], [[0.6, 0.4]]])  # [N=3, R=1, E=2]
  logits = jnp.log(gates)
  trace = inject.RouterTrace("layer", logits, gates, (), None)
  losses = inject.router_losses([trace], load_balance=0.5, z_loss=0.25)
  f = np.array([2 / 3, 1 / 3])
  p = np.array([1.5 / 3, 1.5 / 3])
  np.testing.assert_allclose(losses["load_balance"], 2 * (f * p).sum(), rtol=1e-6)
  np.testing.assert_allclose(losses["router_z"], 0.0, atol=1e-6)  # log-softmax logits: lse = 0
  np.testing.assert_allclose(losses["aux_loss"], 0.5 * losses["load_balance"], rtol=1e-6)
  diag = inject.routing_diagnostics([trace], groups=jnp.asarray([0, 1, 0]), num_groups=2)
  np.testing.assert_allclose(diag["usage"][0, :, 0], [[0.65, 0.35], [0.2, 0.8]], rtol=1e-6)


# ------------------------------------------------------------------------------------------- dtype


@pytest.mark.slow
def test_bfloat16_backbone_with_float32_adapters_trains(tiny_bert):
  _, params, ids, mask = tiny_bert
  model = bert.Bert(**TINY, dtype=jnp.bfloat16)
  adapted, trainable = inject.inject(
    model, params, CELLWISE_CTX, ids[:1], mask[:1], target_modules=bert.ADAPTER_TARGETS, key=jax.random.PRNGKey(2)
  )
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(trainable))
  labels = jnp.arange(B) % TASKS
  out = jax.jit(adapted.apply)(params, trainable, ids, mask, context=labels)
  assert out.dtype == jnp.bfloat16
  grads = jax.jit(
    jax.grad(lambda t: jnp.sum(adapted.apply(params, t, ids, mask, context=labels).astype(jnp.float32) ** 2))
  )(trainable)
  leaves = jax.tree_util.tree_leaves(grads["adapter"])
  assert all(g.dtype == jnp.float32 for g in leaves)
  b_grads = [g for path, g in jax.tree_util.tree_flatten_with_path(grads["adapter"])[0] if "'B'" in str(path)]
  assert b_grads and all(float(jnp.abs(g).max()) > 0 for g in b_grads)  # B = 0 at init: its gradient is not


# ------------------------------------------------------------------------------------------- save and load


@pytest.mark.slow
def test_saved_adapter_reloads_to_identical_outputs_and_refuses_another_model(tiny_bert, tmp_path):
  from localmoe import adapter_io
  import json

  model, params, ids, mask = tiny_bert
  rules = [(r".*attention/.*", CELLWISE_CTX), (r".*", dict(LORA, dtype="float32"))]
  adapted, trainable = inject.inject(
    model,
    params,
    rules,
    ids[:1],
    mask[:1],
    target_modules=bert.ADAPTER_TARGETS,
    key=jax.random.PRNGKey(2),
    trainable_extras=r"embeddings/LayerNorm",
  )
  trainable = _randomize(trainable, seed=6)
  labels = jnp.arange(B) % TASKS
  adapter_io.save_adapter(str(tmp_path / "ad"), adapted, trainable)
  config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
  assert config["target_modules"] == bert.ADAPTER_TARGETS and len(config["layers"]) == 12
  assert config["layers"][0] == {
    "path": "encoder/layer_0/attention/self/query",
    "kind": "DenseGeneral",
    "in_shape": [D],
    "out_shape": [HEADS, D // HEADS],
    "d_in": D,
    "d_out": D,
  }
  assert config["adapter"][0][1]["method"] == "cellwise_moe" and "localmoe_version" in config
  again, loaded = adapter_io.load_adapter(str(tmp_path / "ad"), model, params, ids[:1], mask[:1])
  np.testing.assert_array_equal(
    jax.jit(again.apply)(params, loaded, ids, mask, context=labels),
    jax.jit(adapted.apply)(params, trainable, ids, mask, context=labels),
  )
  # A model whose matched layers differ: refused before anything is applied, naming the layer and shapes.
  wider = bert.Bert(**dict(TINY, intermediate_size=48))
  wider_params = _randomize(jax.eval_shape(wider.init, jax.random.PRNGKey(1), ids, mask)["params"])
  with pytest.raises(
    ValueError,
    match=r"layer 'encoder/layer_0/intermediate/dense': the saved adapter was built "
    r"for \[16\] -> \[32\] but this model's layer is \[16\] -> \[48\]",
  ):
    adapter_io.load_adapter(str(tmp_path / "ad"), wider, wider_params, ids[:1], mask[:1])
  deeper = bert.Bert(**dict(TINY, num_layers=3, max_position=T))
  deeper_params = _randomize(jax.eval_shape(deeper.init, jax.random.PRNGKey(1), ids, mask)["params"])
  with pytest.raises(ValueError, match=r"layer_2.*that the saved adapter does not have"):
    adapter_io.load_adapter(str(tmp_path / "ad"), deeper, deeper_params, ids[:1], mask[:1])
  # One entry only: params with a leading seed axis are refused.
  stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), trainable)
  with pytest.raises(ValueError, match="pass one entry's params"):
    adapter_io.save_adapter(str(tmp_path / "bad"), adapted, stacked)


# ------------------------------------------------------------------------------------------- bad input (issue 19)
# Inputs that used to give silent wrong results or raw tracebacks: each is now one clear error (or, for traced
# task ids under jit, NaN outputs, documented in `routing.one_hot_labels`).


@pytest.fixture(scope="module")
def attn_ctx():
  """An attention block with every projection context-routed, x [B, T, D], trainable randomised."""
  model = _Attn()
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  params = _init(model, x)
  adapted, trainable = inject.inject(
    model, params, CELLWISE_CTX, x[:1], target_modules=r"attn/.*", key=jax.random.PRNGKey(2)
  )
  return model, params, x, adapted, _randomize(trainable, seed=3)


def _message(error):
  assert "\n" not in str(error.value), str(error.value)
  return str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize(
  "spec",
  [CELLWISE_CTX, BLOCKWISE_CTX, {"method": "per_task_lora", "rank": 2, "context_dim": TASKS}],
  ids=lambda s: s["method"],
)
@pytest.mark.parametrize("bad", [7, -1, TASKS])
def test_task_ids_outside_context_dim_are_an_error(spec, bad):
  model = _Attn()
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  params = _init(model, x)
  adapted, trainable = inject.inject(model, params, spec, x[:1], target_modules=r"attn/.*", key=jax.random.PRNGKey(2))
  labels = (jnp.arange(B) % TASKS).at[1].set(bad)
  want = (
    f"context holds ids [{bad}] outside 0..2 (context_dim=3): pass ids in 0..2, or set context_dim to the "
    "number of tasks."
  )
  with pytest.raises(ValueError) as error:  # eager
    adapted.apply(params, trainable, x, context=labels)
  assert _message(error) == want
  with pytest.raises(ValueError) as error:  # jit over a constant context
    jax.jit(lambda t: adapted.apply(params, t, x, context=labels))(trainable)
  assert _message(error) == want
  with pytest.raises(ValueError) as error:  # merge for one task
    adapted.merge(params, trainable, context=bad)
  assert _message(error) == want
  module = adapters.make(spec, d_in=D, d_out=D)  # the bare adapter
  with pytest.raises(ValueError) as error:
    module.apply({"params": trainable["adapter"]["attn/query"]}, x[:, 0], labels)
  assert _message(error) == want


@pytest.mark.slow
@pytest.mark.parametrize(
  "spec", [CELLWISE_CTX, {"method": "per_task_lora", "rank": 2, "context_dim": TASKS}], ids=lambda s: s["method"]
)
def test_traced_task_ids_outside_context_dim_give_nan_not_uniform_routing(spec):
  model = _Attn()
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  params = _init(model, x)
  adapted, trainable = inject.inject(model, params, spec, x[:1], target_modules=r"attn/.*", key=jax.random.PRNGKey(2))
  trainable = _randomize(trainable, seed=3)
  labels = jnp.arange(B) % TASKS
  apply = jax.jit(adapted.apply)
  good = apply(params, trainable, x, context=labels)
  bad = apply(params, trainable, x, context=labels.at[1].set(7))
  assert bool(jnp.isnan(bad[1]).all())  # the bad example: NaN
  np.testing.assert_array_equal(np.delete(bad, 1, 0), np.delete(good, 1, 0))  # the others: unchanged


@pytest.mark.slow
def test_float_labels_as_one_vector_are_refused(attn_ctx):
  _, params, x, adapted, trainable = attn_ctx
  floats = jnp.arange(TASKS, dtype=jnp.float32)  # [0., 1., 2.]: 3 == context_dim
  with pytest.raises(ValueError) as error:
    adapted.apply(params, trainable, x[:TASKS], context=floats)
  assert _message(error) == (
    "context has shape (3,) and dtype float32 (layer 'attn/query'): apply takes one context per example, "
    "integer labels [batch] (float labels: context.astype(jnp.int32)) or a one-hot/embedding "
    "[batch, context_dim] (one vector for all examples: jnp.broadcast_to(c, (batch, context_dim)))."
  )
  with pytest.raises(ValueError, match=r"context has shape \(3,\) and dtype float32"):
    jax.jit(adapted.apply)(params, trainable, x[:TASKS], context=floats)
  # The two unambiguous spellings agree.
  np.testing.assert_allclose(
    adapted.apply(params, trainable, x[:TASKS], context=floats.astype(jnp.int32)),
    adapted.apply(params, trainable, x[:TASKS], context=jnp.eye(TASKS)),
    rtol=1e-6,
  )


def _traces(attn_ctx):
  _, params, x, adapted, trainable = attn_ctx
  _, traces = adapted.apply(params, trainable, x, context=jnp.arange(B) % TASKS, capture_routing=True)
  return traces


@pytest.mark.slow
def test_router_losses_with_an_all_zero_mask_are_zero_not_nan(attn_ctx):
  traces = _traces(attn_ctx)
  zero = jnp.zeros((B, T))
  losses = inject.router_losses(traces, load_balance=1.0, z_loss=1.0, mask=zero)
  assert {k: float(v) for k, v in losses.items()} == {"aux_loss": 0.0, "load_balance": 0.0, "router_z": 0.0}

  def aux(logits, gates):  # through the traces' arrays
    rebuilt = [dataclasses.replace(t, logits=l, gates=g) for t, l, g in zip(traces, logits, gates)]
    return inject.router_losses(rebuilt, load_balance=1.0, z_loss=1.0, mask=zero)["aux_loss"]

  grads = jax.jit(jax.grad(aux, argnums=(0, 1)))([t.logits for t in traces], [t.gates for t in traces])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads))  # zero, not NaN
  # A mask of ones is the unmasked loss.
  ones = inject.router_losses(traces, load_balance=1.0, z_loss=1.0, mask=jnp.ones((B, T)))
  none = inject.router_losses(traces, load_balance=1.0, z_loss=1.0)
  np.testing.assert_allclose(ones["aux_loss"], none["aux_loss"], rtol=1e-6)


@pytest.mark.parametrize("shape", [(B, T, 2), (B - 2, T), (B, T + 1)], ids=["extra_axis", "batch", "tokens"])
def test_router_losses_refuse_a_mask_that_does_not_fit(attn_ctx, shape):
  with pytest.raises(ValueError) as error:
    inject.router_losses(_traces(attn_ctx), load_balance=0.1, mask=jnp.ones(shape))
  assert _message(error) == (
    f"mask has shape {shape} but layer 'attn/query' routes inputs with leading axes {(B, T)}: pass weights "
    "[batch, ...] of this batch that broadcast onto them (e.g. the attention mask [batch, tokens]), without "
    "extra axes."
  )


@pytest.mark.slow
def test_routing_diagnostics_refuse_group_ids_beyond_num_groups(attn_ctx):
  traces = _traces(attn_ctx)
  groups = jnp.arange(B) % TASKS  # ids 0..2
  with pytest.raises(ValueError) as error:
    inject.routing_diagnostics(traces, groups=groups, num_groups=2)
  assert _message(error) == (
    "groups holds ids [2] outside 0..1 (num_groups=2): pass num_groups = the number of "
    "groups (ids run 0..num_groups-1)."
  )
  traced = jax.jit(lambda g: inject.routing_diagnostics(traces, groups=g, num_groups=2))(groups)
  assert bool(jnp.isnan(traced["usage"]).all())  # under jit: NaN, not dropped
  with pytest.raises(ValueError, match=r"groups has shape \(4,\) but layer 'attn/query' routed a batch of 6"):
    inject.routing_diagnostics(traces, groups=groups[:4], num_groups=3)
  with pytest.raises(ValueError, match=r"num_groups=0 must be a positive integer"):
    inject.routing_diagnostics(traces, groups=groups, num_groups=0)
  usage = inject.routing_diagnostics(traces, groups=groups, num_groups=3)["usage"]  # [layers, 3, routers, E]
  np.testing.assert_allclose(usage.sum(-1), 1.0, rtol=1e-5)


def test_trainable_extras_as_a_list_of_names_like_target_modules():
  x = jax.random.normal(jax.random.PRNGKey(0), (B, D))
  task = jnp.arange(B) % TASKS
  model = _WithHeads()
  params = _init(model, x, task)
  build = lambda extras: inject.inject(
    model, params, LORA, x, task, target_modules="body", key=jax.random.PRNGKey(2), trainable_extras=extras
  )
  by_list, trainable = build(["head_0", "head_2"])
  by_regex, same = build(r"head_(0|2)")
  assert by_list.extra_paths == by_regex.extra_paths == ("head_0", "head_2")
  for a, b in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(same)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError) as error:
    build(["nothing"])
  assert _message(error).startswith("trainable_extras=('nothing',) matched no module of the params")
  with pytest.raises(ValueError) as error:
    build([])
  assert _message(error) == (
    "trainable_extras=[] selects nothing: pass None for no trainable extras, or module names (e.g. ['head'])."
  )
  with pytest.raises(ValueError) as error:
    build(3)
  assert _message(error) == (
    "trainable_extras=3 must be a regex string (e.g. 'head') or a list of module names "
    "(e.g. ['head']), like target_modules."
  )


@pytest.mark.parametrize("method", sorted(adapters.ADAPTERS))
@pytest.mark.parametrize("alpha", [-1, 0, float("nan"), float("inf"), "2"])
def test_make_refuses_a_non_positive_alpha(method, alpha):
  spec = {
    "lora": LORA,
    "dora": LORA,
    "melora": {"rank": 2, "num_blocks": 2},
    "localized_lora": {"rank": 2, "k_y": 2, "k_x": 2},
    "blockwise_moe": BLOCKWISE_CTX,
    "cellwise_moe": CELLWISE_CTX,
    "per_task_lora": {"rank": 2, "context_dim": TASKS},
  }[method]
  spec = dict(spec, method=method, alpha=alpha)
  with pytest.raises(ValueError) as error:
    adapters.make(spec, d_in=D, d_out=D)
  assert _message(error) == (
    f"alpha={alpha!r} must be a finite number > 0 (the update is scaled by alpha / rank): "
    "use e.g. alpha=2 * rank, or alpha=None for a scale of 1."
  )
  adapters.make(dict(spec, alpha=4.0), d_in=D, d_out=D)  # a positive alpha is fine
