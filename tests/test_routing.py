"""Routers: top-k semantics, auxiliary losses and diagnostics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import localmoe as lm
from localmoe import routing


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_has_exactly_k_nonzero_gates_that_sum_to_one(k):
  logits = jax.random.normal(jax.random.PRNGKey(0), (50, 4))
  gates = routing.gates_from_logits(logits, k)
  assert np.all((np.asarray(gates) > 0).sum(-1) == k)
  np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
  # The kept experts are the k largest logits, weighted by their renormalised softmax.
  top = np.argsort(-np.asarray(logits), -1)[:, :k]
  np.testing.assert_array_equal(np.sort(top, -1), np.sort(np.argsort(-np.asarray(gates), -1)[:, :k], -1))


def test_top_k_with_ties_still_keeps_exactly_k():
  gates = routing.gates_from_logits(jnp.zeros((3, 5)), 2)
  assert np.all((np.asarray(gates) > 0).sum(-1) == 2)
  np.testing.assert_allclose(gates.sum(-1), 1.0)


def test_top_k_equal_to_e_is_soft_routing():
  logits = jax.random.normal(jax.random.PRNGKey(1), (7, 3))
  np.testing.assert_allclose(routing.gates_from_logits(logits, 3), jax.nn.softmax(logits), rtol=1e-6)


def test_load_balancing_loss_bounds():
  n, r, e = 64, 4, 4
  # Every router sends token t to expert t mod E: dispatch spread evenly, loss 1 (the minimum).
  assignment = (jnp.arange(n)[:, None] + jnp.arange(r)[None, :]) % e    # [N, R]
  spread = jax.nn.one_hot(assignment, e) * 0.7 + 0.3 / e
  np.testing.assert_allclose(routing.load_balancing_loss(spread, 1), 1.0, rtol=1e-5)
  collapsed = jnp.broadcast_to(jax.nn.one_hot(0, e), (n, r, e))
  np.testing.assert_allclose(routing.load_balancing_loss(collapsed, 1), float(e), rtol=1e-6)
  np.testing.assert_allclose(routing.load_balancing_loss(collapsed, 1, per_router=False), float(e))


def test_per_cell_and_global_balance_differ_when_cells_specialise():
  """Each cell uses one expert, but different cells use different ones: globally balanced, locally not."""
  n, e = 32, 2
  cell0 = jnp.broadcast_to(jax.nn.one_hot(0, e), (n, 1, e))
  cell1 = jnp.broadcast_to(jax.nn.one_hot(1, e), (n, 1, e))
  gates = jnp.concatenate([cell0, cell1], axis=1)                        # [N, 2 cells, E]
  np.testing.assert_allclose(routing.load_balancing_loss(gates, 1, per_router=True), 2.0)
  np.testing.assert_allclose(routing.load_balancing_loss(gates, 1, per_router=False), 1.0)


def test_z_loss_and_entropies():
  logits = jnp.zeros((10, 3, 4))
  np.testing.assert_allclose(routing.router_z_loss(logits), math.log(4) ** 2, rtol=1e-6)
  gates = jax.nn.softmax(logits)
  np.testing.assert_allclose(routing.routing_entropy(gates), np.full(3, math.log(4)), rtol=1e-6)
  hard = jax.nn.one_hot(jnp.zeros((10, 3), int), 4)
  np.testing.assert_allclose(routing.routing_entropy(hard), 0.0, atol=1e-7)
  np.testing.assert_allclose(routing.usage_entropy(hard), 0.0, atol=1e-7)
  np.testing.assert_allclose(routing.expert_usage(gates).sum(-1), 1.0, rtol=1e-6)


def test_router_outputs_are_sown_and_collected():
  m = lm.make(dict(method="cellwise_moe", d_in=8, d_out=8, k_y=2, k_x=2, rank=2, num_experts=3,
                   router_input="activation", top_k=2))
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 7, 8))
  v = m.init(jax.random.PRNGKey(1), x)
  out, state = m.apply({"params": v["params"]}, x, mutable=["intermediates"])
  found = lm.collect_router_outputs(state["intermediates"])
  assert len(found) == 1
  assert found[0].gates.shape == (35, 4, 3)                              # [tokens, K_y*K_x routers, E]
  assert np.all((np.asarray(found[0].gates) > 0).sum(-1) == 2)
  losses = lm.router_aux_losses(state["intermediates"], top_k=2)
  assert set(losses) == {"load_balance_per_cell", "load_balance_global", "router_z"}
  assert all(np.isfinite(float(v)) for v in losses.values())
