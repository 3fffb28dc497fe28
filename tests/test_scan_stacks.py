"""Layers of scanned / vmapped stacks: one adapter per layer, stacked on the kernel's leading layer axis.

A matched layer whose kernel is stored [L, ...] (linen nn.scan / nn.vmap with variable_axes={"params": 0},
NNX nnx.vmap-built modules run by nnx.scan / nnx.vmap) gets adapter params [L, ...]; the stack's transform
slices them with the kernel, so layer l computes y = x W_l + b_l + Delta_l(x). Checked against the same layers
unrolled by hand, for LoRA and a context-routed cell-wise MoE: forward, gradients of every layer's slice,
merge, adapter files, router traces; and the refusals that remain, by name.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from localmoe import adapter_io
from localmoe import adapters
from localmoe import inject
from localmoe import nnx_inject
from tests import draws
from tests import zoo_models as zm

D, L, B, TASKS = 4, 3, 2, 3
LORA = {"method": "lora", "rank": 2}
MOE = {
  "method": "cellwise_moe",
  "k_y": 2,
  "k_x": 2,
  "rank": 1,
  "num_experts": 3,
  "router_input": "context",
  "context_dim": TASKS,
}
SPECS = [LORA, MOE]
IDS = ["lora", "cellwise_moe"]
OTHERS = {
  "dora": {"method": "dora", "rank": 2},  # the other per-layer adapters
  "melora": {"method": "melora", "num_blocks": 2, "rank": 1},
  "localized_lora": {"method": "localized_lora", "k_y": 2, "k_x": 2, "rank": 1},
  "blockwise_moe/context": dict(MOE, method="blockwise_moe"),
  "cellwise_moe/activation": dict(MOE, router_input="activation", context_dim=None),
}
LABELS = jnp.array([0, 2])  # one task per example [B]
X = jax.random.normal(jax.random.PRNGKey(1), (B, D))  # [B, D]


def _randomize(tree, seed=5, scale=0.3):
  """Every leaf + noise, so that LoRA's zero B (and the routers) give a nonzero, layer-dependent Delta
  (numpy draws: no op-by-op dispatch per leaf shape)."""
  return jax.tree_util.tree_map(lambda a, noise: a + noise, tree, draws.normal_like(tree, seed, scale))


def _call(model, x, context):
  """nnx_inject.call(model, x, context=context) as one jitted program."""
  return nnx.jit(lambda m, x, c: nnx_inject.call(m, x, context=c))(model, x, context)


def _run(model, x):
  """model(x) of an NNX model as one jitted program."""
  return nnx.jit(lambda m, x: m(x))(model, x)


def _context(spec):
  return LABELS if spec.get("router_input") == "context" else None


def _merge_context(spec):
  """(context of merge, the same context per example for apply) or (None, None)."""
  return (1, jnp.full((B,), 1)) if spec.get("router_input") == "context" else (None, None)


def _layer(tree, l: int):
  return jax.tree_util.tree_map(lambda a: a[l], tree)


def _by_hand(spec, kernels, biases, adapter_params, x, context, act=jnp.tanh):
  """The stack unrolled: h = act(h W_l + b_l + Delta_l(h)) for l = 0..L-1, Delta_l from slice l of the params
  (one jitted program)."""
  unrolled = lambda *args: _by_hand_eager(spec, *args, act=act)
  return jax.jit(unrolled)(kernels, biases, adapter_params, x, context)


def _by_hand_eager(spec, kernels, biases, adapter_params, x, context, act):
  module = adapters.make(spec, d_in=kernels.shape[-2], d_out=kernels.shape[-1])
  h = x
  for l in range(kernels.shape[0]):
    extra = {"kernel": kernels[l]} if spec["method"] == "dora" else {}  # DoRA reads W_l
    delta = module.apply({"params": _layer(adapter_params, l)}, h, context=context, **extra)  # [B, D]
    h = act(h @ kernels[l] + (0.0 if biases is None else biases[l]) + delta)
  return h


def _per_layer_norms(grads) -> np.ndarray:
  """|gradient| summed per layer of the stack, over every adapter leaf: [leaves, L]."""
  return np.stack([np.abs(np.asarray(g)).reshape(L, -1).sum(1) for g in jax.tree_util.tree_leaves(grads)])


# ------------------------------------------------------------------------------------------- linen


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(D, name="dense")(h)), None


class _Scanned(nn.Module):
  """L blocks under nn.scan: the Dense kernel stored [L, D, D]."""

  axes: tuple = (("params", 0),)

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_Block, variable_axes=dict(self.axes), split_rngs={"params": True}, length=L)
    return stack(name="blocks")(x, None)[0]


class _Unrolled(nn.Module):
  """The same layers as a Python loop (params dense_0 .. dense_{L-1})."""

  @nn.compact
  def __call__(self, x):
    for l in range(L):
      x = jnp.tanh(nn.Dense(D, name=f"dense_{l}")(x))
    return x


class _Vmapped(nn.Module):
  """An ensemble: L Dense layers under nn.vmap (kernel [L, D, D]), each applied to the same x: [L, B, D]."""

  @nn.compact
  def __call__(self, x):
    stack = nn.vmap(
      nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0, axis_size=L
    )
    return stack(D, name="members")(x)


def _scanned(axes=(("params", 0),)):
  model = _Scanned(axes)
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), X)["params"]


@pytest.fixture(scope="module", params=SPECS, ids=IDS)
def linen_scan(request):
  """(spec, model, params, adapted, trainable with random adapters) of the nn.scan stack (injected once)."""
  model, params = _scanned()
  adapted, trainable = inject.inject(
    model, params, request.param, X, target_modules=r".*dense", key=jax.random.PRNGKey(0)
  )
  return request.param, model, params, adapted, _randomize(trainable)


def test_linen_scan_layers_get_one_adapter_each(linen_scan):
  spec, model, params, adapted, trainable = linen_scan
  (layer,) = adapted.layers
  assert (layer.path, layer.stack) == ("blocks/dense", (L,))
  assert adapted.num_params() == L * adapters.make(spec, d_in=D, d_out=D).num_params()
  assert all(leaf.shape[0] == L for leaf in jax.tree_util.tree_leaves(trainable["adapter"]))
  context = _context(spec)
  dense = params["blocks"]["dense"]
  y = jax.jit(adapted.apply)(params, trainable, X, context=context)
  want = _by_hand(spec, dense["kernel"], dense["bias"], trainable["adapter"]["blocks/dense"], X, context)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(y - model.apply({"params": params}, X)).max()) > 1e-3  # the adapters act


def test_linen_scan_gradients_reach_every_layer(linen_scan):
  spec, _, params, adapted, trainable = linen_scan
  context = _context(spec)
  grads = jax.jit(jax.grad(lambda t: jnp.sum(adapted.apply(params, t, X, context=context) ** 2)))(trainable)
  assert (_per_layer_norms(grads["adapter"]) > 0).all()  # every layer's slice


def test_linen_scan_merge_equals_adapted(linen_scan):
  spec, model, params, adapted, trainable = linen_scan
  merge_at, same = _merge_context(spec)
  merged = adapted.merge(params, trainable, context=merge_at)
  assert merged["blocks"]["dense"]["kernel"].shape == (L, D, D)
  np.testing.assert_allclose(
    model.apply({"params": merged}, X), jax.jit(adapted.apply)(params, trainable, X, context=same), rtol=1e-5, atol=1e-5
  )


def test_linen_scan_adapter_files_round_trip(linen_scan, tmp_path):
  spec, model, params, adapted, trainable = linen_scan
  adapter_io.save_adapter(str(tmp_path / "a"), adapted, trainable)
  again, loaded = adapter_io.load_adapter(str(tmp_path / "a"), model, params, X)
  assert again.layers == adapted.layers
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, trainable)
  context = _context(spec)
  np.testing.assert_array_equal(
    again.apply(params, loaded, X, context=context), jax.jit(adapted.apply)(params, trainable, X, context=context)
  )


@pytest.mark.slow
def test_linen_scan_router_traces_and_losses_equal_the_unrolled_models():
  """With the traces' collection scanned too, a stack gives one trace per layer and the router losses of the
  unrolled model with the same (sliced) params; without it, capture_routing is refused by name."""
  model, params = _scanned((("params", 0), (inject.TRACES, 0)))
  adapted, trainable = inject.inject(model, params, MOE, X, target_modules=r".*dense", key=jax.random.PRNGKey(0))
  trainable = _randomize(trainable)
  y, traces = adapted.apply(params, trainable, X, context=LABELS, capture_routing=True)
  assert [t.path for t in traces] == ["blocks/dense"] * L

  unrolled = _Unrolled()
  flat = {f"dense_{l}": _layer(params["blocks"]["dense"], l) for l in range(L)}
  plain, _ = inject.inject(unrolled, flat, MOE, X, target_modules=r"dense_\d", key=jax.random.PRNGKey(0))
  sliced = {"adapter": {f"dense_{l}": _layer(trainable["adapter"]["blocks/dense"], l) for l in range(L)}, "extras": {}}
  want, want_traces = plain.apply(flat, sliced, X, context=LABELS, capture_routing=True)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  for got, ref in zip(traces, want_traces):
    np.testing.assert_allclose(got.gates, ref.gates, rtol=1e-5, atol=1e-6)
    assert got.input_lead == ref.input_lead == (B,)
  losses = inject.router_losses(traces, load_balance=0.01, z_loss=1e-3)
  for name, value in inject.router_losses(want_traces, load_balance=0.01, z_loss=1e-3).items():
    np.testing.assert_allclose(losses[name], value, rtol=1e-5)


def test_linen_scan_without_the_traces_collection_refuses_capture_by_name():
  model, params = _scanned()
  adapted, trainable = inject.inject(model, params, MOE, X, target_modules=r".*dense", key=jax.random.PRNGKey(0))
  with pytest.raises(
    ValueError,
    match=r"layer 'blocks/dense' is inside an nn.scan / nn.vmap whose variable_axes "
    r"lack 'router_traces'",
  ):
    adapted.apply(params, trainable, X, context=LABELS, capture_routing=True)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_linen_vmap_members_get_one_adapter_each(spec):
  model = _Vmapped()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), X)["params"]
  adapted, trainable = inject.inject(model, params, spec, X, target_modules="members", key=jax.random.PRNGKey(0))
  assert adapted.layers[0].stack == (L,)
  trainable = _randomize(trainable)
  context = _context(spec)
  y = jax.jit(adapted.apply)(params, trainable, X, context=context)  # [L, B, D]
  member = params["members"]
  for l in range(L):
    want = _by_hand(
      spec,
      member["kernel"][l : l + 1],
      member["bias"][l : l + 1],
      jax.tree_util.tree_map(lambda a, l=l: a[l : l + 1], trainable["adapter"]["members"]),
      X,
      context,
      act=lambda h: h,
    )
    np.testing.assert_allclose(y[l], want, rtol=1e-5, atol=1e-5)
  merge_at, same = _merge_context(spec)
  np.testing.assert_allclose(
    model.apply({"params": adapted.merge(params, trainable, context=merge_at)}, X),
    jax.jit(adapted.apply)(params, trainable, X, context=same),
    rtol=1e-5,
    atol=1e-5,
  )


def test_linen_stack_refusals_name_the_layer():
  """What stays refused: a model-wide adapter (a state from layer to layer) in a stack, and a stack whose
  layer axis is not the kernel's leading one."""
  model, params = _scanned()
  with pytest.raises(
    ValueError,
    match=r"\['blocks/dense'\] are layers of a scan / vmap stack .*QueryableLoRA "
    r"carries a state from layer to layer",
  ):
    inject.inject(
      model,
      params,
      {"method": "queryable_lora", "num_atoms": 2, "num_blocks": 1, "rank": 2},
      X,
      target_modules=r".*dense",
      key=jax.random.PRNGKey(0),
    )
  model, params = _scanned((("params", 1),))
  assert params["blocks"]["dense"]["kernel"].shape == (D, L, D)
  with pytest.raises(
    ValueError,
    match=r"layer 'blocks/dense' is inside a lifted transform \(nn.scan or nn.vmap\): "
    r"its kernel is stored as \(4, 3, 4\) but each call sees \(4, 4\), which is "
    r"not \[\*layers",
  ):
    inject.inject(model, params, LORA, X, target_modules=r".*dense", key=jax.random.PRNGKey(0))


# ------------------------------------------------------------------------------------------- NNX


class _NNXStack(nnx.Module):
  """L nnx.Linear layers built by nnx.vmap (kernel [L, D, D]) and run by nnx.scan."""

  def __init__(self, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(D, D, rngs=rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(layer, h):
      return jnp.tanh(layer(h))

    return body(self.blocks, x)

  def members(self, x):
    """Every layer on the same x (an ensemble, nnx.vmap): [L, B, D]."""
    return nnx.vmap(lambda layer, h: layer(h), in_axes=(0, None), out_axes=0)(self.blocks, x)


def _nnx_model(spec):
  model = _NNXStack(nnx.Rngs(0))
  kernels, biases = model.blocks.kernel.get_value(), model.blocks.bias.get_value()
  nnx_inject.inject(model, spec, X, target_modules="blocks", key=jax.random.PRNGKey(0))
  nnx.update(model.blocks.adapter, {"params": _randomize(model.blocks.adapter.linen_params())})
  return model, kernels, biases


@pytest.fixture(scope="module", params=SPECS, ids=IDS)
def nnx_stack(request):
  """(spec, adapted model, kernels [L, D, D], biases [L, D]) of the nnx.vmap / nnx.scan stack."""
  return (request.param, *_nnx_model(request.param))


def test_nnx_vmap_scan_layers_get_one_adapter_each(nnx_stack):
  spec, model, kernels, biases = nnx_stack
  (layer,) = nnx_inject.layers(model)
  assert (layer.path, layer.stack) == ("blocks", (L,))
  assert nnx_inject.num_params(model) == L * adapters.make(spec, d_in=D, d_out=D).num_params()
  context = _context(spec)
  params = model.blocks.adapter.linen_params()
  y = _call(model, X, context)
  np.testing.assert_allclose(y, _by_hand(spec, kernels, biases, params, X, context), rtol=1e-5, atol=1e-5)
  with nnx_inject.routing_context(model, context, capture=False):
    ensemble = model.members(X)  # nnx.vmap: [L, B, D]
  for l in range(L):
    want = _by_hand(
      spec,
      kernels[l : l + 1],
      biases[l : l + 1],
      jax.tree_util.tree_map(lambda a, l=l: a[l : l + 1], params),
      X,
      context,
      act=lambda h: h,
    )
    np.testing.assert_allclose(ensemble[l], want, rtol=1e-5, atol=1e-5)


def test_nnx_stack_gradients_reach_every_layer(nnx_stack):
  spec, model, _, _ = nnx_stack

  @nnx.jit
  def grads(model, context):
    def loss(model):
      return jnp.sum(nnx_inject.call(model, X, context=context) ** 2)  # already inside nnx.jit

    return nnx.grad(loss, argnums=nnx.DiffState(0, nnx_inject.AdapterParam))(model)

  assert (_per_layer_norms(nnx.to_pure_dict(grads(model, _context(spec)))) > 0).all()  # every layer's slice


def test_nnx_stack_merge_and_adapter_files(nnx_stack, tmp_path):
  spec, model, _, _ = nnx_stack
  merge_at, same = _merge_context(spec)
  merged = nnx_inject.merge(model, context=merge_at)
  assert type(merged.blocks) is nnx.Linear and merged.blocks.kernel.shape == (L, D, D)
  np.testing.assert_allclose(_run(merged, X), _call(model, X, same), rtol=1e-5, atol=1e-5)

  nnx_inject.save_adapter(str(tmp_path / "a"), model)
  fresh = _NNXStack(nnx.Rngs(0))
  nnx_inject.load_adapter(str(tmp_path / "a"), fresh, X)
  context = _context(spec)
  np.testing.assert_array_equal(_call(fresh, X, context), _call(model, X, context))


def test_nnx_stack_router_traces_are_refused_by_name():
  """A routed layer of an nnx stack: its traces cannot leave nnx.scan, so collecting them is refused by name;
  routing_context(..., capture=False) routes on the context without collecting."""
  model, kernels, biases = _nnx_model(MOE)
  with pytest.raises(
    ValueError,
    match=r"layer 'blocks' is a layer of an nnx.vmap / nnx.scan stack \(3,\) with a "
    r"routed adapter .*capture=False",
  ):
    nnx_inject.call(model, X, context=LABELS, capture_routing=True)
  with nnx_inject.routing_context(model, LABELS, capture=False) as traces:
    y = model(X)
  assert traces == []
  want = _by_hand(MOE, kernels, biases, model.blocks.adapter.linen_params(), X, LABELS)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


class _ParamsOnlyScan(_NNXStack):
  """The scan slices the params only (nnx.StateAxes): the other state (routing state too) is broadcast."""

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.StateAxes({nnx.Param: 0, ...: None}), nnx.Carry), out_axes=nnx.Carry)
    def body(layer, h):
      return jnp.tanh(layer(h))

    return body(self.blocks, x)


def test_nnx_scan_slicing_only_the_params_still_routes_every_layer():
  model = _ParamsOnlyScan(nnx.Rngs(0))
  kernels, biases = model.blocks.kernel.get_value(), model.blocks.bias.get_value()
  nnx_inject.inject(model, MOE, X, target_modules="blocks", key=jax.random.PRNGKey(0))
  nnx.update(model.blocks.adapter, {"params": _randomize(model.blocks.adapter.linen_params())})
  want = _by_hand(MOE, kernels, biases, model.blocks.adapter.linen_params(), X, LABELS)
  np.testing.assert_allclose(_call(model, X, LABELS), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_nnx_stack_other_per_layer_adapters(name):
  """DoRA (each layer's own W_l), MELoRA, Localized LoRA, a context-routed block-wise and an activation-routed
  cell-wise MoE: forward as unrolled by hand; merge equals adapted (an activation router: refused by name)."""
  spec = OTHERS[name]
  model, kernels, biases = _nnx_model(spec)
  context = _context(spec)
  want = _by_hand(spec, kernels, biases, model.blocks.adapter.linen_params(), X, context)
  np.testing.assert_allclose(_call(model, X, context), want, rtol=1e-5, atol=1e-5)
  if spec.get("router_input") == "activation":
    with pytest.raises(ValueError, match=r"layer 'blocks': CellWiseLoRAMoE routes on its input"):
      nnx_inject.merge(model)
    return
  merge_at, same = _merge_context(spec)
  np.testing.assert_allclose(
    _run(nnx_inject.merge(model, context=merge_at), X), _call(model, X, same), rtol=1e-5, atol=1e-5
  )


# ------------------------------------------------------------------------------------------- generic layers


XG = jax.random.normal(jax.random.PRNGKey(2), (B, 8))  # [B, 8]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_generic_layers_of_nnx_stacks_get_one_adapter_each(spec):
  """Projection modules of the model's own class (`localmoe.projections`) inside nnx.scan."""
  context = _context(spec)
  merge_at, same = _merge_context(spec)
  x = XG
  model = zm.ScannedStack(nnx.Rngs(0))
  w = model.layers.w.get_value()  # [L, 8, 8]
  nnx_inject.inject(model, spec, x, target_modules="layers", key=jax.random.PRNGKey(1))
  assert nnx_inject.layers(model)[0].stack == (L,)
  (adapter,) = model.layers.adapters
  nnx.update(adapter, {"params": _randomize(adapter.linen_params(), scale=0.1)})
  want = _by_hand(spec, w, None, adapter.linen_params(), x, context, act=lambda h: h)
  np.testing.assert_allclose(_call(model, x, context), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    _run(nnx_inject.merge(model, context=merge_at), x), _call(model, x, same), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_generic_layers_of_linen_stacks_get_one_adapter_each(spec):
  """Projection modules of the model's own class (`localmoe.projections`) inside nn.scan."""
  context = _context(spec)
  merge_at, same = _merge_context(spec)
  x = XG
  linen_model = zm.LinenScannedStack()
  params = jax.jit(linen_model.init)(jax.random.PRNGKey(0), x)["params"]
  adapted, trainable = inject.inject(linen_model, params, spec, x, target_modules="layers", key=jax.random.PRNGKey(1))
  assert adapted.layers[0].stack == (L,)
  trainable = _randomize(trainable, scale=0.1)
  want = _by_hand(spec, params["layers"]["w"], None, trainable["adapter"]["layers"], x, context, act=lambda h: h)
  np.testing.assert_allclose(jax.jit(adapted.apply)(params, trainable, x, context=context), want, rtol=1e-5, atol=1e-6)
  merged = adapted.merge(params, trainable, context=merge_at)
  np.testing.assert_allclose(
    linen_model.apply({"params": merged}, x),
    jax.jit(adapted.apply)(params, trainable, x, context=same),
    rtol=1e-5,
    atol=1e-6,
  )


# ------------------------------------------------------------------------------------------- blocks of several layers


class _MLPBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(D, 2 * D, rngs=rngs)
    self.down = nnx.Linear(2 * D, D, rngs=rngs)

  def __call__(self, h):
    return h + self.down(jax.nn.gelu(self.up(h)))


class _NNXBlocks(nnx.Module):
  """A transformer-like stack: L blocks of two layers each, built by nnx.vmap and run by nnx.scan."""

  def __init__(self, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _MLPBlock(rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(block, h):
      return block(h)

    return body(self.blocks, x)


class _LinenMLPBlock(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return h + nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(2 * D, name="up")(h))), None


class _LinenBlocks(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_LinenMLPBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
    return stack(name="blocks")(x, None)[0]


RULES = [(r".*up", MOE), (r".*down", LORA)]  # a context router on up, LoRA on down


def _blocks_by_hand(weights, adapter_params, x, context):
  """weights: {"up"/"down": (kernel [L, d_in, d_out], bias [L, d_out])}; adapter_params: stacked, by name."""
  modules = {"up": adapters.make(MOE, d_in=D, d_out=2 * D), "down": adapters.make(LORA, d_in=2 * D, d_out=D)}

  def linear(name, l, v):
    kernel, bias = weights[name]
    delta = modules[name].apply({"params": _layer(adapter_params[name], l)}, v, context=context)
    return v @ kernel[l] + bias[l] + delta

  h = x
  for l in range(L):
    h = h + linear("down", l, jax.nn.gelu(linear("up", l, h)))
  return h


def test_nnx_scanned_blocks_of_several_layers():
  model = _NNXBlocks(nnx.Rngs(0))
  weights = {
    n: (getattr(model.blocks, n).kernel.get_value(), getattr(model.blocks, n).bias.get_value()) for n in ("up", "down")
  }
  nnx_inject.inject(model, RULES, X, target_modules=r"blocks/(up|down)", key=jax.random.PRNGKey(0))
  assert [(l.path, l.stack) for l in nnx_inject.layers(model)] == [("blocks/up", (L,)), ("blocks/down", (L,))]
  for name in ("up", "down"):
    adapter = getattr(model.blocks, name).adapter
    nnx.update(adapter, {"params": _randomize(adapter.linen_params())})
  params = {n: getattr(model.blocks, n).adapter.linen_params() for n in ("up", "down")}
  y = _call(model, X, LABELS)
  np.testing.assert_allclose(y, jax.jit(_blocks_by_hand)(weights, params, X, LABELS), rtol=1e-5, atol=1e-5)
  merged = nnx_inject.merge(model, context=1)
  np.testing.assert_allclose(_run(merged, X), _call(model, X, jnp.full((B,), 1)), rtol=1e-5, atol=1e-5)


def test_linen_scanned_blocks_of_several_layers():
  model = _LinenBlocks()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), X)["params"]
  adapted, trainable = inject.inject(
    model, params, RULES, X, target_modules=r"blocks/(up|down)", key=jax.random.PRNGKey(0)
  )
  assert [(l.path, l.stack) for l in adapted.layers] == [("blocks/up", (L,)), ("blocks/down", (L,))]
  trainable = _randomize(trainable)
  blocks = params["blocks"]
  weights = {n: (blocks[n]["kernel"], blocks[n]["bias"]) for n in ("up", "down")}
  by_name = {n: trainable["adapter"][f"blocks/{n}"] for n in ("up", "down")}
  y = jax.jit(adapted.apply)(params, trainable, X, context=LABELS)
  np.testing.assert_allclose(y, jax.jit(_blocks_by_hand)(weights, by_name, X, LABELS), rtol=1e-5, atol=1e-5)
  merged = adapted.merge(params, trainable, context=1)
  np.testing.assert_allclose(
    model.apply({"params": merged}, X),
    jax.jit(adapted.apply)(params, trainable, X, context=jnp.full((B,), 1)),
    rtol=1e-5,
    atol=1e-5,
  )
