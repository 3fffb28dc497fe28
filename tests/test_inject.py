"""localmoe.inject: exactly the matched Dense layers are adapted; zero-init identities (DoRA, Queryable LoRA)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from localmoe import adapters, inject, models
from localmoe.queryable import QueryableLoRA


class _Sub(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="c")(x)


class _Toy(nn.Module):
  """Three parallel maps a, b, sub/c summed, so each layer's Delta shows up additively in the output."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="a")(x) + nn.Dense(4, name="b")(x) + _Sub(name="sub")(x)


def _randomize(tree, seed=0):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [0.3 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


@pytest.mark.slow
@pytest.mark.parametrize("target", [r"a|sub/c", ["a", "c"]])
def test_touches_exactly_the_matched_layers(target):
  model, x = _Toy(), jax.random.normal(jax.random.PRNGKey(1), (5, 8))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  spec = {"method": "lora", "rank": 2}
  adapted, trainable = inject.inject(model, params, spec, x[:1], target_modules=target, key=jax.random.PRNGKey(2))
  assert adapted.paths == ("a", "sub/c")
  assert set(trainable["adapter"]) == {"a", "sub/c"} and trainable["extras"] == {}
  trainable = _randomize(trainable)  # nonzero B: every Delta is visible
  lora = adapters.make(spec, d_in=8, d_out=4)
  expected = model.apply({"params": params}, x)
  expected += lora.apply({"params": trainable["adapter"]["a"]}, x) + lora.apply(
    {"params": trainable["adapter"]["sub/c"]}, x
  )
  np.testing.assert_allclose(adapted.apply(params, trainable, x), expected, rtol=1e-5, atol=1e-5)
  # Gradients reach only the adapter; the frozen params get none.
  loss = lambda p, t: jnp.sum(adapted.apply(p, t, x) ** 2)
  g_frozen, g_train = jax.grad(loss, argnums=(0, 1))(params, trainable)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(g_frozen))
  assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree_util.tree_leaves(g_train))


def test_no_match_is_an_error_that_names_the_field():
  model, x = _Toy(), jnp.zeros((1, 8))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  with pytest.raises(ValueError, match="target_modules"):
    inject.inject(model, params, {"method": "lora", "rank": 2}, x, target_modules="nope", key=jax.random.PRNGKey(0))
  assert inject.dense_paths(model, params, x) == ["a", "b", "sub/c"]


SPECS = {
  "lora": {"method": "lora", "rank": 4, "alpha": 8.0},
  "dora": {"method": "dora", "rank": 4, "alpha": 8.0},
  "melora": {"method": "melora", "num_blocks": 2, "rank": 2},
  "localized_lora": {"method": "localized_lora", "k_y": 2, "k_x": 2, "rank": 2},
  "blockwise_moe": {
    "method": "blockwise_moe",
    "k_y": 2,
    "k_x": 2,
    "rank": 1,
    "num_experts": 3,
    "router_input": "activation",
  },
  "cellwise_moe": {
    "method": "cellwise_moe",
    "k_y": 2,
    "k_x": 2,
    "rank": 1,
    "num_experts": 3,
    "router_input": "activation",
  },
  "queryable_lora": {"method": "queryable_lora", "rank": 4, "num_atoms": 4, "num_blocks": 2, "top_k": 2},
}


@pytest.fixture(scope="module")
def mlp():
  model = models.DeepNarrowMLP(depth=4, width=8, init_scheme="he")
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)))["params"]
  return model, params


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_adapter_starts_as_the_frozen_model(mlp, name):
  """Zero-init identity (B = 0; DoRA's magnitude = ||W0||_c): adapted == frozen at initialisation."""
  model, params = mlp
  x = jax.random.uniform(jax.random.PRNGKey(3), (16, 2), minval=-1, maxval=1)
  adapted, trainable = inject.inject(
    model, params, SPECS[name], x[:1], target_modules=r"hidden_\d+", key=jax.random.PRNGKey(1)
  )
  assert adapted.paths == tuple(f"hidden_{i}" for i in range(4))
  assert adapted.num_params() == sum(np.size(l) for l in jax.tree_util.tree_leaves(trainable))
  np.testing.assert_allclose(
    adapted.apply(params, trainable, x), model.apply({"params": params}, x), rtol=1e-6, atol=1e-6
  )


@pytest.mark.slow
def test_dora_matches_its_dense_formula():
  """W' = m (W0 + s B A^T) / ||W0 + s B A^T||_c, and x W' - x W0 is what the adapter returns."""
  d_in, d_out, r = 6, 5, 2
  w0 = jax.random.normal(jax.random.PRNGKey(0), (d_in, d_out))
  dora = adapters.make({"method": "dora", "rank": r, "alpha": 4.0}, d_in=d_in, d_out=d_out)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, d_in))
  params = _randomize(dora.init(jax.random.PRNGKey(2), x, kernel=w0)["params"])
  merged = w0 + 2.0 * params["A"] @ params["B"].T
  w_new = params["magnitude"] * merged / jnp.linalg.norm(merged, axis=0)
  np.testing.assert_allclose(dora.apply({"params": params}, x, kernel=w0), x @ w_new - x @ w0, rtol=1e-4, atol=1e-5)
  assert dora.num_params() == r * (d_in + d_out) + d_out


def test_queryable_with_closed_gate_is_lora(mlp):
  """g_l = sigmoid(eta_l) -> 0 recovers LoRA with the same A, B (Sec. 3)."""
  model, params = mlp
  x = jax.random.uniform(jax.random.PRNGKey(3), (16, 2), minval=-1, maxval=1)
  q = QueryableLoRA(rank=4, num_atoms=4, num_blocks=2, top_k=2, alpha=8.0)
  adapted, trainable = inject.inject(model, params, q, x[:1], target_modules=r"hidden_\d+", key=jax.random.PRNGKey(1))
  for path in adapted.paths:
    trainable["adapter"]["layers"][path]["B"] = 0.3 * jax.random.normal(jax.random.PRNGKey(4), (8, 4))
  closed = jax.tree_util.tree_map(lambda a: a, trainable)
  for path in adapted.paths:
    closed["adapter"]["layers"][path]["eta"] = jnp.asarray(-1e4)
  lora_spec = {"method": "lora", "rank": 4, "alpha": 8.0}
  lora, _ = inject.inject(model, params, lora_spec, x[:1], target_modules=r"hidden_\d+", key=jax.random.PRNGKey(1))
  lora_params = {
    "adapter": {
      p: {"A": closed["adapter"]["layers"][p]["A"], "B": closed["adapter"]["layers"][p]["B"]} for p in adapted.paths
    },
    "extras": {},
  }
  np.testing.assert_allclose(adapted.apply(params, closed, x), lora.apply(params, lora_params, x), rtol=1e-5, atol=1e-5)
  # With the gate open the routed atoms change the output.
  assert float(jnp.abs(adapted.apply(params, trainable, x) - lora.apply(params, lora_params, x)).max()) > 1e-4


# ------------------------------------------------------------------------------------------- partial masks


def _trace(seed, lead, path="ffn", routers=2, experts=3):
  """A RouterTrace of random logits [*lead, routers, experts] and their softmax gates, built in numpy."""
  logits = np.random.default_rng(seed).normal(size=lead + (routers, experts)).astype(np.float32)
  gates = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return inject.RouterTrace(path, jnp.asarray(logits), jnp.asarray(gates), (1, routers), None)


def _hand_losses(gates, logits):
  """Switch balance E * sum_e f_e P_e per router (averaged over routers) and z = mean logsumexp^2, over the
  rows given (numpy; rows are the tokens that count)."""
  e = gates.shape[-1]
  f = np.eye(e)[gates.argmax(-1)].mean(0)  # [R, E]
  balance = (e * (f * gates.mean(0)).sum(-1)).mean()
  z = (np.log(np.exp(logits).sum(-1)) ** 2).mean()
  return balance, z


@pytest.mark.slow
def test_router_losses_and_diagnostics_count_only_the_masked_tokens():
  """A partial attention mask [batch, tokens]: the losses and diagnostics equal a hand count over the kept
  tokens only (a mask treated as all ones, or any nonzero mask as all ones, fails), and a context router
  (one routing per example) counts an example when any of its tokens is kept."""
  tokens = _trace(0, (3, 4))  # an activation router [B, T]
  examples = dataclasses.replace(_trace(1, (3,), path="attn/query"), input_lead=(3, 4))  # a context router
  mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)  # example 2 is all padding
  keep = mask.reshape(-1) > 0
  losses = inject.router_losses([tokens, examples], load_balance=1.0, z_loss=1.0, mask=mask)
  b1, z1 = _hand_losses(
    np.asarray(tokens.gates).reshape(-1, 2, 3)[keep], np.asarray(tokens.logits).reshape(-1, 2, 3)[keep]
  )
  b2, z2 = _hand_losses(np.asarray(examples.gates)[:2], np.asarray(examples.logits)[:2])
  np.testing.assert_allclose(losses["load_balance"], b1 + b2, rtol=1e-5)
  np.testing.assert_allclose(losses["router_z"], z1 + z2, rtol=1e-5)
  groups = np.array([0, 1, 1])
  diag = inject.routing_diagnostics([tokens], groups=groups, num_groups=2, mask=mask)
  g = np.asarray(tokens.gates)
  np.testing.assert_allclose(diag["usage"][0, 0], g[0, :2].mean(0), rtol=1e-5)  # task 0: 2 tokens
  np.testing.assert_allclose(diag["usage"][0, 1], g[1, 0], rtol=1e-5)  # task 1: 1 token
  entropy = -(g[0, :2] * np.log(g[0, :2])).sum(-1).mean(0)
  np.testing.assert_allclose(diag["entropy"][0, 0], entropy, rtol=1e-5)
  diag = inject.routing_diagnostics([examples], groups=groups, num_groups=2, mask=mask)
  np.testing.assert_allclose(diag["usage"][0, 1], np.asarray(examples.gates)[1], rtol=1e-5)  # example 2 out


@pytest.mark.slow
def test_apply_rngs_reach_the_adapters_and_no_rngs_is_deterministic():
  """rngs={"gumbel": k, "dropout": k} give other gates per key (Gumbel-softmax noise), the same key the same
  gates, and no rngs the noiseless gates every call (evaluation)."""
  model, x = _Toy(), jnp.asarray(np.random.default_rng(0).normal(size=(6, 8)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  spec = dict(
    method="cellwise_moe",
    rank=1,
    k_y=2,
    k_x=2,
    num_experts=2,
    router_input="context",
    context_dim=3,
    router_hard="gumbel_soft",
    router_dropout=0.5,
  )
  adapted, trainable = inject.inject(model, params, spec, x[:1], target_modules="a|b", key=jax.random.PRNGKey(1))
  context = jnp.arange(6) % 3

  def gates(rngs=None):
    _, traces = adapted.apply(params, trainable, x, context=context, capture_routing=True, rngs=rngs)
    return [np.asarray(t.gates) for t in traces]

  plain, again = gates(), gates()
  np.testing.assert_array_equal(plain[0], again[0])
  one = gates({"gumbel": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(5)})
  two = gates({"gumbel": jax.random.PRNGKey(2), "dropout": jax.random.PRNGKey(5)})
  assert not np.allclose(one[0], two[0]) and not np.allclose(one[0], plain[0])
  assert not np.allclose(one[0], one[1])  # each layer its own draw (fold_in of its index)
  np.testing.assert_array_equal(one[0], gates({"gumbel": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(5)})[0])
  with pytest.raises(TypeError, match=r"rngs\['gumbel'\] is not a PRNG key"):
    gates({"gumbel": 3})


# ------------------------------------------------------------------------------------------- never a silent no-op


class _JitRoot(nn.Module):
  """A model whose __call__ is wrapped in nn.jit (as gemma's `Transformer.__call__`)."""

  @nn.jit
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="proj")(nn.relu(nn.Dense(4, name="a")(x)))


class _JitInner(nn.Module):
  @nn.jit
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="proj")(x)


class _JitChild(nn.Module):
  """nn.jit on a submodule's method: its cached trace is out of the hosts' reach."""

  @nn.compact
  def __call__(self, x, skip=False):
    h = nn.Dense(4, name="a")(x)
    return h if skip else _JitInner(name="inner")(h)


@pytest.mark.slow
def test_an_nn_jit_wrapped_call_is_unwrapped_and_its_adapters_run():
  model, x = _JitRoot(), jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  base = model.apply({"params": params}, x)  # fills nn.jit's cache before inject
  adapted, trainable = inject.inject(
    model, params, {"method": "lora", "rank": 2}, x[:1], target_modules="proj", key=jax.random.PRNGKey(1)
  )
  assert adapted.paths == ("proj",)
  trainable = jax.tree_util.tree_map(lambda a: a + 0.3, trainable)  # B != 0
  assert float(jnp.abs(adapted.apply(params, trainable, x) - base).max()) > 1e-2
  grads = jax.jit(jax.grad(lambda t: jnp.sum(adapted.apply(params, t, x) ** 2)))(trainable)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads["adapter"]))
  merged = adapted.merge(params, trainable)
  np.testing.assert_allclose(
    model.apply({"params": merged}, x), adapted.apply(params, trainable, x), rtol=1e-5, atol=1e-5
  )


@pytest.mark.slow
def test_layers_no_traced_call_reaches_are_named_at_inject():
  """nn.jit on a submodule's method (its cached trace skips the interceptor) and a branch the example call
  does not take: both refused at inject, naming the layer, never adapted silently in part."""
  model, x = _JitChild(), jnp.ones((1, 4))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  model.apply({"params": params}, x)
  with pytest.raises(
    ValueError,
    match=r"^layer\(s\) \['inner/proj'\] match target_modules='a\|inner/proj' \(their "
    r"params hold a kernel\) but no traced call of the model reached them: .*"
    r"remove an nn.jit on a submodule's method",
  ):
    inject.inject(
      model, params, {"method": "lora", "rank": 2}, x, target_modules="a|inner/proj", key=jax.random.PRNGKey(1)
    )
  with pytest.raises(
    ValueError,
    match=r"^layer\(s\) \['inner/proj'\] match .* pass example inputs \(and "
    r"example_kwargs\) that reach them",
  ):
    inject.inject(
      model,
      params,
      {"method": "lora", "rank": 2},
      x,
      target_modules="a|inner/proj",
      key=jax.random.PRNGKey(1),
      example_kwargs={"skip": True},
    )


class _RematBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(8, name="ffn")(nn.relu(nn.Dense(8, name="up")(x)))


class _RematStack(nn.Module):
  remat: bool = True

  @nn.compact
  def __call__(self, x):
    block = nn.remat(_RematBlock) if self.remat else _RematBlock
    for i in range(2):
      x = block(name=f"blocks_{i}")(x)
    return x


@pytest.mark.slow
def test_router_traces_under_nn_remat_give_the_losses_of_the_same_model_without_remat():
  """Traces are sown (a flax collection), not appended to a Python list inside the transform: a context-routed
  and an activation-routed adapter in nn.remat blocks give the same outputs, traces and losses as without."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 8)), jnp.float32)
  labels = jnp.arange(4) % 3
  cell = dict(method="cellwise_moe", rank=1, k_y=2, k_x=2, num_experts=2, b_init="normal_0.01")
  rules = [
    (r".*/up", dict(cell, router_input="context", context_dim=3)),
    (r".*/ffn", dict(cell, router_input="activation")),
  ]
  params = _RematStack(remat=False).init(jax.random.PRNGKey(0), x)["params"]
  results = []
  for remat in (False, True):
    model = _RematStack(remat=remat)
    adapted, trainable = inject.inject(
      model, params, rules, x[:1], target_modules=r".*/(up|ffn)", key=jax.random.PRNGKey(1)
    )

    paths = []

    def loss(t):
      y, traces = adapted.apply(params, t, x, context=labels, capture_routing=True)
      paths[:] = [trace.path for trace in traces]
      aux = inject.router_losses(traces, load_balance=0.1, z_loss=0.01)
      return jnp.mean(y**2) + aux["aux_loss"], aux

    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
    results.append((value, aux, paths, grads))
  (v0, a0, p0, g0), (v1, a1, p1, g1) = results
  assert p0 == p1 == ["blocks_0/up", "blocks_0/ffn", "blocks_1/up", "blocks_1/ffn"]
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  for name in ("load_balance", "router_z"):
    np.testing.assert_allclose(a1[name], a0[name], rtol=1e-6)
  assert float(a0["router_z"]) > 0
  for l0, l1 in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(l1, l0, rtol=1e-4, atol=1e-6)
