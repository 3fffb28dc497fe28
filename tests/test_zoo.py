"""Adapters on the projections of models researchers use, whatever the layer's class (`localmoe.projections`).

tunix 0.1.7's own NNX Gemma 3, Llama 3 and Qwen 3 (read from the pinned wheel), replicas of gemma's linen
Einsum / FeedForward (nn.share_scope) / Transformer (nn.jit) and of MaxText's DenseGeneral on lax.dot_general
(`tests/zoo_models.py`): inject, forward differs from the base, a jitted gradient step reaches every adapter,
merge equals the adapted model per task, save/load round trip; and what is refused by name.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from localmoe import adapter_io
from localmoe import adapters as adapters_lib
from localmoe import inject
from localmoe import nnx_inject
from localmoe import projections
from localmoe.data import registry
from tests import zoo_models as zm

LORA = {"method": "lora", "rank": 2}
MOE = {
  "method": "cellwise_moe",
  "k_y": 2,
  "k_x": 2,
  "rank": 2,
  "num_experts": 2,
  "router_input": "context",
  "context_dim": 2,
}
TOKENS = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])  # [B=2, T=5]
TASKS = jnp.array([0, 1])  # [B] context labels


def _perturb(tree, key):
  """Every array + small noise (B starts at zero: a fresh adapter is the identity); numpy noise, no compile."""
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))
  return jax.tree_util.tree_map(lambda a: a + jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), tree)


def _numpy_init(build):
  """build, with its weights drawn by numpy from an abstract build (the model's own initialisers compile an
  eager op per shape; nothing here compiles). The same weights on every call."""

  def make():
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(0)
    return nnx.merge(
      graphdef, jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), state)
    )

  return make


def _context(spec, batch):
  return TASKS[batch] if spec.get("router_input") == "context" else None


# ------------------------------------------------------------------------------------------- NNX checks


def _check_nnx(build, args, target, spec, expected, tmp_path):
  """build() -> a fresh model (same weights each time); args(batch) -> its call's positional inputs."""
  build = _numpy_init(build)
  model = build()

  @nnx.jit
  def forward(model, inputs, context):
    with nnx_inject.routing_context(model, context):
      out = model(*inputs)
    return out[0] if isinstance(out, tuple) else out

  base = forward(model, args(slice(None)), None)
  example = args(slice(0, 1))
  nnx_inject.inject(model, spec, *example, target_modules=target, key=jax.random.PRNGKey(1))
  assert [layer.path for layer in nnx_inject.layers(model)] == expected
  state = nnx.state(model, nnx_inject.AdapterParam)
  nnx.update(model, _perturb(state, jax.random.PRNGKey(2)))
  context = _context(spec, slice(None))
  adapted = forward(model, args(slice(None)), context)
  assert float(jnp.abs(adapted - base).max()) > 1e-4

  @nnx.jit
  def grads(model, inputs, context):
    def loss(model):
      with nnx_inject.routing_context(model, context):
        out = model(*inputs)
      return jnp.mean((out[0] if isinstance(out, tuple) else out) ** 2)

    return nnx.grad(loss, argnums=nnx.DiffState(0, nnx_inject.AdapterParam))(model)

  holder = nnx.clone(model)  # the gradients, laid out as params
  nnx.update(holder, grads(model, args(slice(None)), context))
  by_layer = nnx_inject.trainable(holder)["adapter"]  # {layer path: grads}
  assert list(by_layer) == expected
  for layer, leaves in by_layer.items():
    assert any(float(jnp.abs(v).sum()) > 0 for v in jax.tree_util.tree_leaves(leaves)), layer

  for task in (0, 1):
    batch = slice(task, task + 1)
    merged = nnx_inject.merge(model, context=task if spec.get("router_input") == "context" else None)
    np.testing.assert_allclose(
      forward(merged, args(batch), None), forward(model, args(batch), _context(spec, batch)), atol=1e-5
    )

  nnx_inject.save_adapter(str(tmp_path / "adapter"), model)
  loaded = nnx_inject.load_adapter(str(tmp_path / "adapter"), build(), *example)
  np.testing.assert_array_equal(forward(loaded, args(slice(None)), context), adapted)


@pytest.fixture(scope="module")
def tunix():
  try:
    return zm.tunix_models()
  except registry.RegistryError as error:
    pytest.skip(f"google-tunix=={zm.TUNIX_VERSION} could not be downloaded (pip download): {error}")


def _mask_args(batch):
  """Gemma 3 / Llama 3 / Qwen 3 call inputs: tokens, positions, no cache, a causal mask."""
  tokens = TOKENS[batch]
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))  # [B, T]
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))  # [B, T, T]
  return (tokens, positions, None, mask)


def _layer_paths(layer: int, names) -> list[str]:
  return [f"layers/{layer}/{name}" for name in names]


@pytest.mark.network
@pytest.mark.parametrize("spec", [LORA, MOE], ids=["lora", "cellwise_moe"])
def test_tunix_gemma3(tunix, spec, tmp_path):
  """tunix's Gemma 3: fused qkv_einsum split into q, k, v (STACKED), attn_vec_einsum, the nnx.Linear MLP."""
  g3 = tunix["gemma3"]
  config = g3.ModelConfig(
    num_layers=1,
    num_embed=11,
    embed_dim=8,
    hidden_dim=12,
    num_heads=2,
    head_dim=4,
    num_kv_heads=2,
    sliding_window_size=4,
    param_dtype=jnp.float32,
  )
  names = [
    "attn/qkv_einsum/q",
    "attn/qkv_einsum/k",
    "attn/qkv_einsum/v",
    "attn/attn_vec_einsum",
    "mlp/gate_proj",
    "mlp/up_proj",
    "mlp/down_proj",
  ]
  _check_nnx(
    lambda: g3.Gemma3(config, rngs=nnx.Rngs(0)),
    _mask_args,
    r".*attn/(qkv_einsum/(q|k|v)|attn_vec_einsum)|.*mlp/(gate|up|down)_proj",
    spec,
    _layer_paths(0, names),
    tmp_path,
  )


@pytest.mark.network
def test_tunix_gemma3_kv_einsum_and_attribute_reads(tunix):
  """num_kv_heads < num_heads: q_einsum and kv_einsum split into k, v; only v targeted; the model's reads of
  its layers (`attn_vec_einsum.shape[1]`) pass through the wrapper."""
  g3 = tunix["gemma3"]
  config = g3.ModelConfig(
    num_layers=1,
    num_embed=11,
    embed_dim=8,
    hidden_dim=12,
    num_heads=2,
    head_dim=4,
    num_kv_heads=1,
    sliding_window_size=4,
    param_dtype=jnp.float32,
  )
  model = _numpy_init(lambda: g3.Gemma3(config, rngs=nnx.Rngs(0)))()
  nnx_inject.inject(
    model, LORA, *_mask_args(slice(0, 1)), target_modules=r".*(q_einsum|kv_einsum/v)", key=jax.random.PRNGKey(1)
  )
  assert [layer.path for layer in nnx_inject.layers(model)] == ["layers/0/attn/q_einsum", "layers/0/attn/kv_einsum/v"]
  attn = model.layers[0].attn
  assert isinstance(attn.kv_einsum, nnx_inject.AdaptedLayer)
  assert (attn.head_dim, attn.num_kv_heads, attn.kv_einsum.einsum_str) == (4, 1, "BSD,CKDH->CBSKH")


@pytest.mark.network
def test_tunix_gemma3_under_remat(tunix):
  """tunix's RematConfig.BLOCK runs the attention and MLP blocks under nnx.remat: the adapters run there too
  (output, gradient, merge)."""
  g3 = tunix["gemma3"]
  config = g3.ModelConfig(
    num_layers=1,
    num_embed=11,
    embed_dim=8,
    hidden_dim=12,
    num_heads=2,
    head_dim=4,
    num_kv_heads=2,
    sliding_window_size=4,
    param_dtype=jnp.float32,
    remat_config=g3.RematConfig.BLOCK,
  )
  model = _numpy_init(lambda: g3.Gemma3(config, rngs=nnx.Rngs(0)))()
  args = _mask_args(slice(None))
  forward = nnx.jit(lambda m: m(*args)[0])
  base = forward(model)
  nnx_inject.inject(
    model, LORA, *_mask_args(slice(0, 1)), target_modules=r".*(qkv_einsum/(q|v)|down_proj)", key=jax.random.PRNGKey(1)
  )
  nnx.update(model, _perturb(nnx.state(model, nnx_inject.AdapterParam), jax.random.PRNGKey(2)))
  out = forward(model)
  assert float(jnp.abs(out - base).max()) > 1e-4
  grads = nnx.jit(
    lambda m: nnx.grad(lambda m: jnp.mean(m(*args)[0] ** 2), argnums=nnx.DiffState(0, nnx_inject.AdapterParam))(m)
  )(model)
  assert all(float(jnp.abs(v).sum()) > 0 for v in jax.tree_util.tree_leaves(grads))
  np.testing.assert_allclose(forward(nnx_inject.merge(model)), out, atol=1e-5)


@pytest.mark.network
@pytest.mark.parametrize("spec", [LORA, MOE], ids=["lora", "cellwise_moe"])
def test_tunix_llama3(tunix, spec, tmp_path):
  l3 = tunix["llama3"]
  config = l3.ModelConfig(
    num_layers=1,
    vocab_size=11,
    embed_dim=8,
    hidden_dim=12,
    num_heads=2,
    head_dim=4,
    num_kv_heads=1,
    rope_theta=10_000,
    norm_eps=1e-6,
  )
  names = ["attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]
  _check_nnx(
    lambda: l3.Llama3(config, rngs=nnx.Rngs(0)),
    _mask_args,
    r".*attn/(q|k|v|o)_proj|.*mlp/(gate|up|down)_proj",
    spec,
    _layer_paths(0, names),
    tmp_path,
  )


def _qwen3_config(q3, experts=None):
  return q3.ModelConfig(
    num_layers=1,
    vocab_size=12,
    embed_dim=8,
    hidden_dim=12,
    num_heads=2,
    head_dim=4,
    num_kv_heads=1,
    rope_theta=10_000,
    norm_eps=1e-6,
    num_experts=experts,
    num_experts_per_tok=2 if experts else None,
  )


@pytest.mark.network
@pytest.mark.parametrize("spec", [LORA, MOE], ids=["lora", "cellwise_moe"])
def test_tunix_qwen3_dense(tunix, spec, tmp_path):
  """Qwen 3 (its Einsum casts the weight to `dtype` before jnp.einsum), the untied lm_head included."""
  q3 = tunix["qwen3"]
  config = _qwen3_config(q3)
  names = [
    "layers/0/attn/q_proj",
    "layers/0/attn/k_proj",
    "layers/0/attn/v_proj",
    "layers/0/attn/o_proj",
    "layers/0/mlp/gate_proj",
    "layers/0/mlp/up_proj",
    "layers/0/mlp/down_proj",
    "lm_head",
  ]
  _check_nnx(
    lambda: q3.Qwen3(config, rngs=nnx.Rngs(0)),
    _mask_args,
    r".*attn/(q|k|v|o)_proj|.*mlp/(gate|up|down)_proj|lm_head",
    spec,
    names,
    tmp_path,
  )


@pytest.mark.network
def test_tunix_qwen3_moe_experts_refused_by_name(tunix):
  """Stacked experts [E, D, F] are refused naming them, never the router adapted silently in their place."""
  q3 = tunix["qwen3"]
  model = _numpy_init(lambda: q3.Qwen3(_qwen3_config(q3, experts=4), rngs=nnx.Rngs(0)))()
  with pytest.raises(
    ValueError,
    match=r"layers/0/mlp/(gate|up|down)_proj' holds stacked MoE experts.*leave the "
    r"experts out.*Also refused: \['layers/0/mlp/\w+_proj', 'layers/0/mlp/\w+_proj'\]",
  ):
    nnx_inject.inject(model, LORA, *_mask_args(slice(0, 1)), target_modules=r".*mlp/.*", key=jax.random.PRNGKey(1))
  assert not nnx_inject.layers(model)  # nothing changed
  nnx_inject.inject(
    model, LORA, *_mask_args(slice(0, 1)), target_modules=r".*mlp/router", key=jax.random.PRNGKey(1)
  )  # the router by its own path
  assert [layer.path for layer in nnx_inject.layers(model)] == ["layers/0/mlp/router"]


# ------------------------------------------------------------------------------------------- MaxText replica


@pytest.mark.slow
@pytest.mark.parametrize("spec", [LORA, MOE], ids=["lora", "cellwise_moe"])
def test_maxtext_dense_general(spec, tmp_path):
  """MaxText's DenseGeneral (kernel cast, then lax.dot_general): q/k/v [D] -> [N, H], out [N, H] -> [D]."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))  # [B, T, D]
  _check_nnx(
    lambda: zm.MaxTextMlpAttention(rngs=nnx.Rngs(0)),
    lambda batch: (x[batch],),
    r"query|key|value|out|wi|wo",
    spec,
    ["query", "key", "value", "out", "wi", "wo"],
    tmp_path,
  )


@pytest.mark.slow
def test_child_ops_are_not_the_parents():
  """A generic module's child layer (same kernel shape, another input) keeps its own contraction: the adapter
  sits on the parent's weight, as the merge (which writes into that weight) confirms, in both hosts."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8))
  model = zm.NnxMixedNet(rngs=nnx.Rngs(0))
  nnx_inject.inject(model, LORA, x[:1], target_modules="proj", key=jax.random.PRNGKey(1))
  assert [layer.path for layer in nnx_inject.layers(model)] == ["proj"]
  nnx.update(model, _perturb(nnx.state(model, nnx_inject.AdapterParam), jax.random.PRNGKey(2)))
  np.testing.assert_allclose(nnx_inject.merge(model)(x), model(x), atol=1e-5)
  linen_model = zm.LinenMixedNet()
  params = linen_model.init(jax.random.PRNGKey(0), x)["params"]
  adapted, trainable = inject.inject(linen_model, params, LORA, x[:1], target_modules="proj", key=jax.random.PRNGKey(1))
  trainable = _perturb(trainable, jax.random.PRNGKey(2))
  out = adapted.apply(params, trainable, x)
  assert float(jnp.abs(out - linen_model.apply({"params": params}, x)).max()) > 1e-4
  np.testing.assert_allclose(linen_model.apply({"params": adapted.merge(params, trainable)}, x), out, atol=1e-5)


@pytest.mark.slow
def test_matmul_operator():
  """`x @ W` and `W @ x` (the weight first: operands swapped) are intercepted; merge writes each weight."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8))
  model = zm.MatmulNet(rngs=nnx.Rngs(0))
  base = model(x)
  nnx_inject.inject(model, LORA, x[:1], target_modules=r"mlp/(up|down)", key=jax.random.PRNGKey(1))
  assert [(l.path, l.equation) for l in nnx_inject.layers(model)] == [
    ("mlp/up", "...b,bc->...c"),
    ("mlp/down", "bc,ab->ac"),
  ]
  nnx.update(model, _perturb(nnx.state(model, nnx_inject.AdapterParam), jax.random.PRNGKey(2)))
  assert float(jnp.abs(model(x) - base).max()) > 1e-4
  np.testing.assert_allclose(nnx_inject.merge(model)(x), model(x), atol=1e-5)


def test_op_not_intercepted_is_refused_by_name():
  """A weight whose contraction is bound by name at import is never adapted silently."""
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match=r"layer 'proj'.*no contraction of its weight was intercepted"):
    nnx_inject.inject(zm.BoundNet(rngs=nnx.Rngs(0)), LORA, x, target_modules="proj", key=jax.random.PRNGKey(1))


@pytest.mark.slow
def test_adapter_that_did_not_run_is_an_error_at_the_call():
  """An adapted layer whose contraction a later call does not reach (here: switched to an op bound by name)
  is an error at that call, naming it, in both hosts."""
  x = jnp.ones((2, 8))
  model = nnx_inject.inject(zm.SwitchNet(rngs=nnx.Rngs(0)), LORA, x, target_modules="proj", key=jax.random.PRNGKey(1))
  model(x)
  model.proj.base.mode = "bound"
  with pytest.raises(ValueError, match=r"\['proj'\] are adapted but this call .*intercepted no contraction"):
    model(x)
  linen_model = zm.LinenSwitch()
  params = linen_model.init(jax.random.PRNGKey(0), x)["params"]
  adapted, trainable = inject.inject(linen_model, params, LORA, x, target_modules="proj", key=jax.random.PRNGKey(1))
  adapted.apply(params, trainable, x)
  switched = dataclasses.replace(adapted, model=zm.LinenSwitch(bound=True))
  with pytest.raises(ValueError, match=r"\['proj'\] are adapted but this call intercepted no contraction"):
    switched.apply(params, trainable, x)


@pytest.mark.slow
def test_scanned_generic_layers_get_one_adapter_per_layer():
  """Generic layers of an nnx.vmap / nnx.scan or nn.scan stack (a weight with a leading layer axis): one adapter
  per layer, stacked [3, ...] on the same axis; the same adapter params give the same outputs on both hosts."""
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 8))
  model = nnx_inject.inject(zm.ScannedStack(nnx.Rngs(0)), LORA, x, target_modules="layers", key=jax.random.PRNGKey(1))
  assert [(l.path, l.stack) for l in nnx_inject.layers(model)] == [("layers", (3,))]
  (adapter,) = model.layers.adapters
  params = jax.tree_util.tree_map(lambda a: a + 0.1, adapter.linen_params())  # [3, ...] each
  nnx.update(adapter, {"params": params})
  linen_model = zm.LinenScannedStack()
  frozen = linen_model.init(jax.random.PRNGKey(0), x)["params"]
  adapted, trainable = inject.inject(linen_model, frozen, LORA, x, target_modules="layers", key=jax.random.PRNGKey(1))
  assert adapted.layers == nnx_inject.layers(model)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_array_equal(a.shape, b.shape), trainable["adapter"]["layers"], params
  )
  y = adapted.apply(frozen, {"adapter": {"layers": params}, "extras": {}}, x)
  lora = adapters_lib.make(LORA, d_in=8, d_out=8)
  h = x
  for l in range(3):
    h = h @ frozen["layers"]["w"][l] + lora.apply({"params": jax.tree_util.tree_map(lambda a, l=l: a[l], params)}, h)
  np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- gemma replica (linen)


def _gemma(num_kv_heads: int = 2):
  """The replica and random params (drawn with numpy from the init's shapes: nothing to compile)."""
  model = zm.Transformer(num_kv_heads=num_kv_heads)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), TOKENS)["params"]
  rng = np.random.default_rng(0)
  return model, jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [LORA, MOE], ids=["lora", "cellwise_moe"])
def test_gemma_linen(spec, tmp_path):
  """gemma's linen Einsum (called as (eqn, x)), FeedForward's shared scope keyed by param name, fused
  qkv_einsum split into q/k/v, the Transformer's nn.jit __call__: inject, apply, gradient, merge, files."""
  model, params = _gemma()
  target = r".*(qkv_einsum/(q|k|v)|attn_vec_einsum|mlp/gating_einsum|mlp/linear)"
  adapted, trainable = inject.inject(model, params, spec, TOKENS[:1], target_modules=target, key=jax.random.PRNGKey(1))
  names = [
    "attn/qkv_einsum/q",
    "attn/qkv_einsum/k",
    "attn/qkv_einsum/v",
    "attn/attn_vec_einsum",
    "mlp/gating_einsum/gate",
    "mlp/gating_einsum/up",
    "mlp/linear",
  ]
  assert list(adapted.paths) == [f"layer_{i}/{n}" for i in range(2) for n in names]
  trainable = _perturb(trainable, jax.random.PRNGKey(2))
  apply = jax.jit(lambda p, tr, t, c: adapted.apply(p, tr, t, context=c))
  plain = jax.jit(lambda p, t: model.apply({"params": p}, t))
  context = _context(spec, slice(None))
  out = apply(params, trainable, TOKENS, context)
  assert float(jnp.abs(out - plain(params, TOKENS)).max()) > 1e-4
  grads = jax.jit(jax.grad(lambda tr: jnp.mean(adapted.apply(params, tr, TOKENS, context=context) ** 2)))(trainable)
  for path, leaves in grads["adapter"].items():
    assert any(float(jnp.abs(v).sum()) > 0 for v in jax.tree_util.tree_leaves(leaves)), path
  for task in (0, 1):
    batch = slice(task, task + 1)
    merged = adapted.merge(params, trainable, context=task if spec.get("router_input") == "context" else None)
    np.testing.assert_allclose(
      plain(merged, TOKENS[batch]), apply(params, trainable, TOKENS[batch], _context(spec, batch)), atol=1e-5
    )
  adapter_io.save_adapter(str(tmp_path / "adapter"), adapted, trainable)
  again, loaded = adapter_io.load_adapter(str(tmp_path / "adapter"), model, params, TOKENS[:1])
  np.testing.assert_array_equal(
    jax.jit(lambda p, tr, t, c: again.apply(p, tr, t, context=c))(params, loaded, TOKENS, context), out
  )


@pytest.mark.slow
def test_gemma_linen_kv_einsum_traces_and_whole_stack():
  """kv_einsum's slices by name; a pattern on the whole stacked key adapts every slice; router traces of
  generic layers come back in call order under their keys."""
  model, params = _gemma(num_kv_heads=1)
  adapted, trainable = inject.inject(
    model, params, MOE, TOKENS[:1], target_modules=r"layer_0/attn/(q_einsum|kv_einsum)", key=jax.random.PRNGKey(1)
  )
  assert list(adapted.paths) == ["layer_0/attn/q_einsum", "layer_0/attn/kv_einsum/k", "layer_0/attn/kv_einsum/v"]
  _, traces = adapted.apply(params, trainable, TOKENS, context=TASKS, capture_routing=True)
  assert [t.path for t in traces] == list(adapted.paths)
  assert inject.dense_paths(model, params, TOKENS[:1])[:3] == [
    "layer_0/attn/q_einsum",
    "layer_0/attn/kv_einsum/k",
    "layer_0/attn/kv_einsum/v",
  ]


def test_equations_normalised():
  """dot / matmul / dot_general as "<x>,<kernel>-><out>"; the weight first is swapped; experts refused."""
  x, w = jnp.ones((2, 5, 8)), jnp.ones((8, 3))
  assert projections.equation("dot", (x, w), False) == "...c,cd->...d"
  assert projections.equation("matmul", (w.T, jnp.ones((2, 8, 4))), True) == "...kn,mk->...mn"
  assert projections.equation("einsum", ("NDH,BTD->BTNH", jnp.ones((2, 8, 4)), x), True) == "BTD,NDH->BTNH"
  dims = (((1, 2), (0, 1)), ((), ()))
  assert (
    projections.equation("dot_general", (jnp.ones((5, 2, 4)), jnp.ones((2, 4, 8)), dims), False) == "...bc,bcd->...d"
  )
  with pytest.raises(projections.Refused, match="stacked experts") as info:
    projections.equation("dot_general", (jnp.ones((4, 5, 8)), jnp.ones((4, 8, 3)), (((2,), (1,)), ((0,), (0,)))), False)
  assert info.value.experts


def test_interception_restores_the_ops():
  """The replaced ops are jax's own again after the block (nested blocks included), even after an error."""
  ops = lambda: (jnp.einsum, jnp.dot, jnp.matmul, jax.lax.dot_general, jax.Array.__matmul__)  # noqa: E731
  before = ops()
  with pytest.raises(RuntimeError):
    with projections.intercepting():
      with projections.intercepting():
        assert all(a is not b for a, b in zip(ops()[:4], before[:4]))
      assert all(a is not b for a, b in zip(ops()[:4], before[:4]))
      raise RuntimeError
  assert all(a is b for a, b in zip(ops(), before))


class _RematBlock(nnx.Module):
  """An nnx.Linear and a generic MaxText-style DenseGeneral (w [8, 8], lax.dot_general)."""

  def __init__(self, rngs: nnx.Rngs):
    self.lin = nnx.Linear(8, 8, rngs=rngs)
    self.proj = zm.DenseGeneral(8, 8, rngs=rngs)

  def __call__(self, x):  # x: [B, T, 8]
    return x + self.proj(jnp.tanh(self.lin(x)))


class _RematNet(nnx.Module):
  def __init__(self, remat: bool, rngs: nnx.Rngs):
    self.blocks = nnx.List([_RematBlock(rngs) for _ in range(2)])
    self.remat = remat

  def __call__(self, x):
    for block in self.blocks:
      x = nnx.remat(lambda b, h: b(h))(block, x) if self.remat else block(x)
    return x


def test_nnx_router_traces_under_remat_give_the_losses_of_the_same_model_without_remat():
  """Router traces made inside nnx.remat leave it as model state: losses, traces and adapter gradients equal
  those of the same model without remat (a context-routed MoE on a built-in and on a generic layer)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))  # [B, T, D]
  results = {}
  for remat in (False, True):
    model = nnx_inject.inject(
      _RematNet(remat, nnx.Rngs(0)), MOE, x[:1], target_modules=r".*(lin|proj)", key=jax.random.PRNGKey(1)
    )
    nnx.update(model, _perturb(nnx.state(model, nnx_inject.AdapterParam), jax.random.PRNGKey(2)))

    def loss(m):
      with nnx_inject.routing_context(m, TASKS) as traces:
        y = m(x)
      aux = inject.router_losses(traces, load_balance=0.1, z_loss=0.01)
      return jnp.mean(y**2) + aux["aux_loss"], (aux["load_balance"], [t.gates for t in traces])

    grad_fn = nnx.value_and_grad(loss, has_aux=True, argnums=nnx.DiffState(0, nnx_inject.AdapterParam))
    (value, (balance, gates)), grads = nnx.jit(grad_fn)(model)
    results[remat] = value, balance, gates, jax.tree_util.tree_leaves(nnx.state(grads))
    assert not jax.tree_util.tree_leaves(nnx.state(model, nnx_inject.RouterTraceState))  # reset after the block
  (v0, b0, g0, d0), (v1, b1, g1, d1) = results[False], results[True]
  assert len(g1) == 4 and float(b1) > 0
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  np.testing.assert_allclose(b1, b0, rtol=1e-6)
  for a, b in zip(g1 + d1, g0 + d0):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_nnx_router_traces_inside_a_raw_lax_loop_are_kept_as_they_are():
  """Inside a raw jax.lax loop body the layers' trace state belongs to another trace level: the call still runs
  (as Gemma's decode loop does) and each trace is kept as it is, the model's state untouched."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))  # [B, T, D]
  model = nnx_inject.inject(
    _RematNet(False, nnx.Rngs(0)), MOE, x[:1], target_modules=r".*lin", key=jax.random.PRNGKey(1)
  )
  nnx.update(model, _perturb(nnx.state(model, nnx_inject.AdapterParam), jax.random.PRNGKey(2)))

  @nnx.jit
  def looped(m, h):
    with nnx_inject.routing_context(m, TASKS) as traces:
      out = jax.lax.fori_loop(0, 2, lambda _, carry: m(carry), h)
    return out, len(traces)

  out, n_traces = looped(model, x)
  expected = nnx_inject.call(model, nnx_inject.call(model, x, context=TASKS), context=TASKS)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  assert n_traces == 2  # one per adapted layer call of the traced body
  assert not jax.tree_util.tree_leaves(nnx.state(model, nnx_inject.RouterTraceState))
