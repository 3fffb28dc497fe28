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
  assignment = (jnp.arange(n)[:, None] + jnp.arange(r)[None, :]) % e  # [N, R]
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
  gates = jnp.concatenate([cell0, cell1], axis=1)  # [N, 2 cells, E]
  np.testing.assert_allclose(routing.load_balancing_loss(gates, 1, per_router=True), 2.0)
  np.testing.assert_allclose(routing.load_balancing_loss(gates, 1, per_router=False), 1.0)


@pytest.mark.slow
def test_z_loss_and_entropies():
  logits = jnp.zeros((10, 3, 4))
  np.testing.assert_allclose(routing.router_z_loss(logits), math.log(4) ** 2, rtol=1e-6)
  gates = jax.nn.softmax(logits)
  np.testing.assert_allclose(routing.routing_entropy(gates), np.full(3, math.log(4)), rtol=1e-6)
  hard = jax.nn.one_hot(jnp.zeros((10, 3), int), 4)
  np.testing.assert_allclose(routing.routing_entropy(hard), 0.0, atol=1e-7)
  np.testing.assert_allclose(routing.usage_entropy(hard), 0.0, atol=1e-7)
  np.testing.assert_allclose(routing.expert_usage(gates).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_router_outputs_are_sown_and_collected():
  m = lm.make(
    dict(
      method="cellwise_moe", d_in=8, d_out=8, k_y=2, k_x=2, rank=2, num_experts=3, router_input="activation", top_k=2
    )
  )
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 7, 8))
  v = m.init(jax.random.PRNGKey(1), x)
  out, state = m.apply({"params": v["params"]}, x, mutable=["intermediates"])
  found = lm.collect_router_outputs(state["intermediates"])
  assert len(found) == 1
  assert found[0].gates.shape == (35, 4, 3)  # [tokens, K_y*K_x routers, E]
  assert np.all((np.asarray(found[0].gates) > 0).sum(-1) == 2)
  per_cell = lm.load_balancing_loss(found[0].gates, top_k=2)
  overall = lm.load_balancing_loss(found[0].gates, top_k=2, per_router=False)
  g = np.asarray(found[0].gates)  # numpy: E * sum_e f_e P_e
  top2 = np.zeros_like(g)
  np.put_along_axis(top2, np.argsort(-g, -1)[..., :2], 0.5, -1)  # top-2 dispatch / k
  np.testing.assert_allclose(per_cell, (3 * (top2.mean(0) * g.mean(0)).sum(-1)).mean(), rtol=1e-5)
  np.testing.assert_allclose(overall, 3 * (top2.reshape(-1, 3).mean(0) * g.reshape(-1, 3).mean(0)).sum(), rtol=1e-5)
  assert np.isfinite(float(lm.router_z_loss(found[0].logits)))


# ------------------------------------------------------------------------- router controls


@pytest.mark.slow
def test_router_initializers():
  key, shape = jax.random.PRNGKey(3), (2, 3, 5, 4)  # [K_y, K_x, F, E]
  normal = routing.router_initializer("normal")
  assert normal is routing.router_kernel_init  # the default, unchanged
  np.testing.assert_array_equal(
    routing.router_initializer("normal", 0.02)(key, shape), 0.02 * np.asarray(jax.random.normal(key, shape))
  )
  for scale, bound in [(None, 1e-3), (0.5, 0.5)]:
    w = np.asarray(routing.router_initializer("uniform", scale)(key, shape))
    assert w.shape == shape and np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
    assert w.min() < 0 < w.max()
  np.testing.assert_array_equal(routing.router_initializer("zeros")(key, shape), np.zeros(shape))
  w = np.asarray(routing.router_initializer("task_aligned", margin=2.5)(key, shape))
  want = np.zeros(shape)
  for t in range(5):
    want[..., t, t % 4] = 2.5
  np.testing.assert_array_equal(w, want)


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(kind="xavier"), "router_init='xavier'"),
    (dict(kind="uniform", scale=-1.0), "router_init_scale=-1.0"),
    (dict(kind="task_aligned", margin=0.0), "router_init_margin=0.0"),
  ],
)
def test_router_initializer_errors_name_the_field(kw, match):
  with pytest.raises(ValueError, match=match):
    routing.router_initializer(**kw)


def test_straight_through_is_one_hot_forward_and_softmax_backward():
  logits = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (6, 4))  # a nonuniform cotangent
  hard = routing.straight_through(jax.nn.softmax(logits))
  np.testing.assert_array_equal(hard, jax.nn.one_hot(jnp.argmax(logits, -1), 4))
  g_hard = jax.grad(lambda l: jnp.sum(w * routing.straight_through(jax.nn.softmax(l))))(logits)
  g_soft = jax.grad(lambda l: jnp.sum(w * jax.nn.softmax(l)))(logits)
  np.testing.assert_allclose(g_hard, g_soft, rtol=1e-6)
  assert np.abs(np.asarray(g_hard)).min() > 0


def test_temperature_at():
  np.testing.assert_allclose(routing.temperature_at(0, 10.0, 0.5, 100), 10.0, rtol=1e-6)
  np.testing.assert_allclose(routing.temperature_at(50, 10.0, 0.5, 100), math.sqrt(10.0 * 0.5), rtol=1e-5)
  np.testing.assert_allclose(routing.temperature_at(100, 10.0, 0.5, 100), 0.5, rtol=1e-5)
  np.testing.assert_allclose(routing.temperature_at(250, 10.0, 0.5, 100), 0.5, rtol=1e-5)  # held after
  np.testing.assert_allclose(routing.temperature_at(25, 10.0, 0.5, 100, "linear"), 10.0 - 9.5 / 4, rtol=1e-6)
  traced = jax.jit(lambda s: routing.temperature_at(s, 10.0, 0.5, 100))(jnp.asarray(50))
  np.testing.assert_allclose(traced, math.sqrt(5.0), rtol=1e-5)
  with pytest.raises(ValueError, match="kind='cosine'"):
    routing.temperature_at(0, 10.0, 0.5, 100, "cosine")
  with pytest.raises(ValueError, match="steps=0"):
    routing.temperature_at(0, 10.0, 0.5, 0)


def test_drop_experts_renormalises_over_the_kept_experts():
  logits = jax.random.normal(jax.random.PRNGKey(0), (4000, 4))
  dropped = routing.drop_experts(jax.random.PRNGKey(1), logits, 0.25)
  keep = np.isfinite(np.asarray(dropped))
  assert keep.any(-1).all()  # never every expert of a row
  assert abs((~keep).mean() - 0.25) < 0.02  # ~ rate, minus all-dropped rows
  soft = np.asarray(jax.nn.softmax(logits))
  want = soft * keep / (soft * keep).sum(-1, keepdims=True)
  np.testing.assert_allclose(jax.nn.softmax(dropped), want, rtol=1e-5, atol=1e-7)


def _router_gates(router, u, **apply_kw):
  v = router.init(jax.random.PRNGKey(0), u)
  return router.apply(v, u, **apply_kw)


def test_gumbel_softmax_approaches_one_hot_as_temperature_goes_to_zero():
  u = jax.random.normal(jax.random.PRNGKey(2), (200, 5))
  router = routing.Router(num_experts=4, features=5, hard="gumbel_soft")
  rngs = {"gumbel": jax.random.PRNGKey(3)}
  cold = np.asarray(_router_gates(router, u, rngs=rngs, temperature=1e-3))
  warm = np.asarray(_router_gates(router, u, rngs=rngs, temperature=1.0))
  np.testing.assert_allclose(cold.sum(-1), 1.0, rtol=1e-5)
  assert cold.max(-1).min() > 0.99  # every row nearly one-hot
  assert warm.max(-1).mean() < 0.9
  # The sample is random: its argmax is not always the noiseless argmax, which it is without the rng.
  clean = np.asarray(_router_gates(router, u, temperature=1e-3))
  assert (cold.argmax(-1) != clean.argmax(-1)).any()
  np.testing.assert_allclose(_router_gates(router, u), _router_gates(routing.Router(4, 5), u), rtol=1e-6)


@pytest.mark.slow
def test_gate_diagnostics_equal_a_direct_computation():
  rng = np.random.default_rng(0)
  n, r, e, t = 60, 3, 4, 3
  gates = rng.dirichlet(np.ones(e), size=(n, r))  # [N, R, E]
  gates[0, 0] = [1.0, 0.0, 0.0, 0.0]  # a zero gate: 0 log 0 = 0
  groups = rng.integers(0, t, n)
  got = routing.gate_diagnostics(jnp.asarray(gates, jnp.float32), jnp.asarray(groups), t)
  entropy = np.mean([-sum(p * math.log(p) for p in gates[i, k] if p > 0) for i in range(n) for k in range(r)])
  usage = np.stack([gates[groups == g].mean(0) for g in range(t)])  # [T, R, E]
  tv = [0.5 * np.abs(usage[a, k] - usage[b, k]).sum() for a in range(t) for b in range(a + 1, t) for k in range(r)]
  np.testing.assert_allclose(got["entropy_nats"], entropy, rtol=1e-5)
  np.testing.assert_allclose(got["task_separation"], np.mean(tv), rtol=1e-5)
  # A group without tokens is left out of the pairs.
  got4 = routing.gate_diagnostics(jnp.asarray(gates, jnp.float32), jnp.asarray(groups), t + 1)
  np.testing.assert_allclose(got4["task_separation"], np.mean(tv), rtol=1e-5)
  assert set(routing.gate_diagnostics(jnp.asarray(gates))) == {"entropy_nats"}


def test_task_separation_has_the_multitask_experiment_definition():
  """usage [entries, layers, tasks, routers, E]: TV averaged over task pairs and routers, per layer."""
  rng = np.random.default_rng(1)
  usage = rng.dirichlet(np.ones(4), size=(2, 3, 4, 5))  # [n, L, T, R, E]
  want = np.zeros((2, 3))
  for i, l in np.ndindex(2, 3):
    want[i, l] = np.mean(
      [
        0.5 * np.abs(usage[i, l, a, k] - usage[i, l, b, k]).sum()
        for a in range(4)
        for b in range(a + 1, 4)
        for k in range(5)
      ]
    )
  got = routing.task_separation(jnp.asarray(usage, jnp.float32))
  assert got.shape == (2, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  same = jnp.broadcast_to(jnp.asarray(usage[:, :, :1]), usage.shape)  # every task routed alike
  np.testing.assert_allclose(routing.task_separation(same), 0.0, atol=1e-7)
  disjoint = jnp.broadcast_to(jnp.eye(4)[:, None, :], (4, 5, 4))  # task t only on expert t
  np.testing.assert_allclose(routing.task_separation(disjoint), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_token_weighted_losses_and_group_usage():
  """Weights [N] (a mask) in the balance and z-losses: 0/1 weights = the kept rows only, all zeros = 0 (not
  NaN); group_usage = per-group means; one_hot_labels refuses ids outside 0..num-1."""
  logits = jax.random.normal(jax.random.PRNGKey(0), (12, 3, 4))  # [N, R, E]
  kept = np.arange(12) % 3 != 0
  keep = jnp.asarray(kept, jnp.float32)

  @jax.jit
  def values(logits):
    gates = jax.nn.softmax(logits)
    out = {}
    for pr in (True, False):
      out[f"keep/{pr}"] = (
        routing.load_balancing_loss(gates, 2, pr, keep),
        routing.load_balancing_loss(gates[kept], 2, pr),
      )
      out[f"zero/{pr}"] = (routing.load_balancing_loss(gates, 1, pr, jnp.zeros(12)), jnp.zeros(()))
    out["z/keep"] = (routing.router_z_loss(logits, keep), routing.router_z_loss(logits[kept]))
    out["z/zero"] = (routing.router_z_loss(logits, jnp.zeros(12)), jnp.zeros(()))
    usage, entropy = routing.group_usage(gates, jax.nn.one_hot(jnp.arange(12) % 2, 3))  # group 2: no rows
    out["usage/1"] = (usage[1], routing.expert_usage(gates[1::2]))
    out["entropy/0"] = (entropy[0], routing.routing_entropy(gates[::2]))
    out["usage/2"] = (usage[2], jnp.zeros_like(usage[2]))
    return out

  for name, (got, want) in values(logits).items():
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)
  np.testing.assert_array_equal(
    routing.one_hot_labels(jnp.array([0, 2]), 3, "groups", "num_groups", "fix"), jnp.eye(3)[jnp.array([0, 2])]
  )
  with pytest.raises(ValueError, match=r"^groups holds ids \[-1, 3\] outside 0..2 \(num_groups=3\): fix\.$"):
    routing.one_hot_labels(jnp.array([0, 3, -1]), 3, "groups", "num_groups", "fix")
  traced = jax.jit(lambda ids: routing.one_hot_labels(ids, 3, "groups", "num_groups", "fix"))(jnp.array([1, 3]))
  np.testing.assert_array_equal(traced[0], [0.0, 1.0, 0.0])
  assert bool(jnp.isnan(traced[1]).all())
