"""localmoe.inject: exactly the matched Dense layers are adapted; zero-init identities (DoRA, Queryable LoRA)."""

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
  trainable = _randomize(trainable)                          # nonzero B: every Delta is visible
  lora = adapters.make(spec, d_in=8, d_out=4)
  expected = model.apply({"params": params}, x)
  expected += (lora.apply({"params": trainable["adapter"]["a"]}, x)
               + lora.apply({"params": trainable["adapter"]["sub/c"]}, x))
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
    "blockwise_moe": {"method": "blockwise_moe", "k_y": 2, "k_x": 2, "rank": 1, "num_experts": 3,
                      "router_input": "activation"},
    "cellwise_moe": {"method": "cellwise_moe", "k_y": 2, "k_x": 2, "rank": 1, "num_experts": 3,
                     "router_input": "activation"},
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
  adapted, trainable = inject.inject(model, params, SPECS[name], x[:1], target_modules=r"hidden_\d+",
                                     key=jax.random.PRNGKey(1))
  assert adapted.paths == tuple(f"hidden_{i}" for i in range(4))
  assert adapted.num_params() == sum(np.size(l) for l in jax.tree_util.tree_leaves(trainable))
  np.testing.assert_allclose(adapted.apply(params, trainable, x), model.apply({"params": params}, x),
                             rtol=1e-6, atol=1e-6)


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
  lora_params = {"adapter": {p: {"A": closed["adapter"]["layers"][p]["A"], "B": closed["adapter"]["layers"][p]["B"]}
                             for p in adapted.paths}, "extras": {}}
  np.testing.assert_allclose(adapted.apply(params, closed, x), lora.apply(params, lora_params, x), rtol=1e-5, atol=1e-5)
  # With the gate open the routed atoms change the output.
  assert float(jnp.abs(adapted.apply(params, trainable, x) - lora.apply(params, lora_params, x)).max()) > 1e-4
