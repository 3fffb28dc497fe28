"""Adapters against the paper's formulas (Eq. 1, 4, 6, 8), built by hand with explicit loops."""

import functools
import itertools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import localmoe as lm
from localmoe import grid
from tests import draws
from tests import oracles

jax.config.update("jax_enable_x64", False)

D_IN, D_OUT, K_Y, K_X, RANK, E, D_CTX = 12, 8, 2, 3, 2, 3, 4
LEAD = (2, 3)  # leading batch axes


def randomize(variables, seed=0, scale=0.5):
  """Replaces every parameter by N(0, scale^2) float32, so B != 0 and routers are non-trivial.

  Drawn with numpy (no program to compile per shape); `variables` may hold only shapes (`jax.eval_shape`).
  """
  return {"params": draws.normal_like(variables["params"], seed, scale, jnp.float32)}


def inputs(seed=1):
  kx, kc = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (*LEAD, D_IN))
  labels = jax.random.randint(kc, LEAD, 0, D_CTX)
  return x, jax.nn.one_hot(labels, D_CTX)


def ref_gates(logits, top_k):
  """Numpy softmax / top-k over the last axis, written independently of the library."""
  logits = np.asarray(logits, np.float64)
  out = np.zeros_like(logits)
  for idx in np.ndindex(logits.shape[:-1]):
    row = logits[idx]
    keep = np.argsort(-row, kind="stable")[: (top_k or len(row))]
    w = np.exp(row[keep] - row[keep].max())
    out[idx][keep] = w / w.sum()
  return out


def build(method, **kw):
  base = dict(d_in=D_IN, d_out=D_OUT)
  if method in ("localized_lora", "blockwise_moe", "cellwise_moe"):
    base.update(k_y=K_Y, k_x=K_X, rank=RANK)
  if method in ("blockwise_moe", "cellwise_moe"):
    base.update(num_experts=E, context_dim=D_CTX)
  base.update(kw)
  return lm.make(dict(method=method, **base))


# ------------------------------------------------------------------------- dense formulas, explicit loops


@pytest.mark.slow
def test_lora_matches_eq1():
  m = build("lora", rank=3, alpha=6.0)
  x, _ = inputs()
  v = randomize(m.init(jax.random.PRNGKey(0), x))
  A, B = (np.asarray(v["params"][k], np.float64) for k in "AB")
  xn = np.asarray(x, np.float64)
  want = np.zeros((*LEAD, D_OUT))
  for idx in np.ndindex(LEAD):
    want[idx] = (6.0 / 3) * B @ A.T @ xn[idx]
  np.testing.assert_allclose(m.apply(v, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("per_block_gemms", [False, True])
def test_melora_is_block_diagonal(per_block_gemms, monkeypatch):
  if per_block_gemms:
    monkeypatch.setattr(grid, "FIELD_GEMMS_MIN_ELEMENTS", 0)
  m = build("melora", num_blocks=2, rank=2)
  x, _ = inputs()
  v = randomize(m.init(jax.random.PRNGKey(0), x))
  A, B = (np.asarray(v["params"][k], np.float64) for k in "AB")
  xn = np.asarray(x, np.float64)
  want = np.zeros((*LEAD, D_OUT))
  for idx in np.ndindex(LEAD):
    for n in range(2):
      xs = xn[idx][n * 6 : (n + 1) * 6]
      want[idx][n * 4 : (n + 1) * 4] = B[n] @ A[n].T @ xs
  np.testing.assert_allclose(m.apply(v, x), want, rtol=1e-5, atol=1e-5)
  grad_x = jax.grad(lambda x: jnp.sum(jnp.sin(m.apply(v, x))))(x)  # [LEAD, D_IN]
  want_grad = np.einsum("...o,od->...d", np.cos(want), np.asarray(lm.delta_weight(m, v), np.float64))
  np.testing.assert_allclose(grad_x, want_grad, rtol=1e-4, atol=1e-5)
  dense = np.asarray(lm.delta_weight(m, v))
  assert np.all(dense[:4, 6:] == 0) and np.all(dense[4:, :6] == 0)


def test_localized_matches_eq4():
  m = build("localized_lora")
  x, _ = inputs()
  v = randomize(m.init(jax.random.PRNGKey(0), x))
  A, B = (np.asarray(v["params"][k], np.float64) for k in "AB")
  xn = np.asarray(x, np.float64)
  dy, dx = D_OUT // K_Y, D_IN // K_X
  want = np.zeros((*LEAD, D_OUT))
  for idx in np.ndindex(LEAD):
    for i in range(K_Y):
      for j in range(K_X):
        want[idx][i * dy : (i + 1) * dy] += B[i, j] @ A[i, j].T @ xn[idx][j * dx : (j + 1) * dx]
  np.testing.assert_allclose(m.apply(v, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
  "router_input,top_k,bias,temperature",
  list(itertools.product(["context", "activation"], [None, 1, 2, E], [False, True], [1.0, 0.5])),
)
def test_blockwise_matches_eq6(router_input, top_k, bias, temperature):
  m = build("blockwise_moe", router_input=router_input, top_k=top_k, router_bias=bias, temperature=temperature)
  x, ctx = inputs()
  v = randomize(m.init(jax.random.PRNGKey(0), x, ctx))
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
  A, B, Wg = p["A"], p["B"], p["router"]["kernel"]
  xn, cn = np.asarray(x, np.float64), np.asarray(ctx, np.float64)
  dy, dx = D_OUT // K_Y, D_IN // K_X
  want = np.zeros((*LEAD, D_OUT))
  for idx in np.ndindex(LEAD):
    u = cn[idx] if router_input == "context" else xn[idx]  # Eq. 5 input
    logits = u @ Wg + (p["router"]["bias"] if bias else 0.0)
    g = ref_gates(logits / temperature, top_k)
    for i, j, e in itertools.product(range(K_Y), range(K_X), range(E)):
      want[idx][i * dy : (i + 1) * dy] += g[e] * B[e, i, j] @ A[e, i, j].T @ xn[idx][j * dx : (j + 1) * dx]
  np.testing.assert_allclose(m.apply(v, x, ctx), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
  "router_input,top_k,bias,temperature",
  list(itertools.product(["context", "activation"], [None, 1, 2, E], [False, True], [1.0, 0.5])),
)
def test_cellwise_matches_eq8(router_input, top_k, bias, temperature):
  m = build("cellwise_moe", router_input=router_input, top_k=top_k, router_bias=bias, temperature=temperature)
  x, ctx = inputs()
  v = randomize(m.init(jax.random.PRNGKey(0), x, ctx))
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
  A, B, Wg = p["A"], p["B"], p["router"]["kernel"]
  xn, cn = np.asarray(x, np.float64), np.asarray(ctx, np.float64)
  dy, dx = D_OUT // K_Y, D_IN // K_X
  want = np.zeros((*LEAD, D_OUT))
  for idx in np.ndindex(LEAD):
    for i, j in itertools.product(range(K_Y), range(K_X)):
      xj = xn[idx][j * dx : (j + 1) * dx]
      u = cn[idx] if router_input == "context" else xj  # Eq. 7 input: local slice x_j
      logits = u @ Wg[i, j] + (p["router"]["bias"][i, j] if bias else 0.0)
      g = ref_gates(logits / temperature, top_k)
      for e in range(E):
        want[idx][i * dy : (i + 1) * dy] += g[e] * B[e, i, j] @ A[e, i, j].T @ xj
  np.testing.assert_allclose(m.apply(v, x, ctx), want, rtol=1e-4, atol=1e-5)


def test_integer_context_equals_one_hot():
  m = build("cellwise_moe")
  x, ctx = inputs()
  v = randomize(m.init(jax.random.PRNGKey(0), x, ctx))
  labels = jnp.argmax(ctx, -1)
  np.testing.assert_allclose(m.apply(v, x, labels), m.apply(v, x, ctx), rtol=1e-6)


# ------------------------------------------------------------------------- reductions and containment


def test_lora_equals_localized_with_one_cell():
  x, _ = inputs()
  lora = build("lora", rank=RANK)
  loc = build("localized_lora", k_y=1, k_x=1)
  v = randomize(lora.init(jax.random.PRNGKey(0), x))
  v_loc = {"params": {"A": v["params"]["A"][None, None], "B": v["params"]["B"][None, None]}}
  np.testing.assert_allclose(loc.apply(v_loc, x), lora.apply(v, x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lm.delta_weight(loc, v_loc), lm.delta_weight(lora, v), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("router_input", ["context", "activation"])
def test_localized_equals_cellwise_with_one_expert(router_input):
  x, ctx = inputs()
  loc = build("localized_lora")
  cell = build("cellwise_moe", num_experts=1, router_input=router_input)
  v_cell = randomize(cell.init(jax.random.PRNGKey(0), x, ctx))
  v_loc = {"params": {"A": v_cell["params"]["A"][0], "B": v_cell["params"]["B"][0]}}
  np.testing.assert_allclose(cell.apply(v_cell, x, ctx), loc.apply(v_loc, x), rtol=1e-5, atol=1e-6)


def test_containment_blockwise_gate_copied_into_every_cell():
  """Proposition 1: a block-wise gate copied into every cell gives the block-wise output."""
  x, ctx = inputs()
  block = build("blockwise_moe")
  cell = build("cellwise_moe")
  v_block = randomize(block.init(jax.random.PRNGKey(0), x, ctx))
  # Same experts; gates taken from the block-wise router and broadcast over the grid.
  gates, state = block.apply(v_block, x, ctx, method=block.route, mutable=["intermediates"])
  cell_gates = jnp.broadcast_to(gates[..., None, None, :], (*LEAD, K_Y, K_X, E))
  v_cell = {
    "params": {
      "A": v_block["params"]["A"],
      "B": v_block["params"]["B"],
      "router": {"kernel": jnp.zeros((K_Y, K_X, D_CTX, E))},
    }
  }
  np.testing.assert_allclose(
    cell.apply(v_cell, x, ctx, gates=cell_gates), block.apply(v_block, x, ctx), rtol=1e-5, atol=1e-6
  )
  # And with real routers: every cell router a copy of the global one reproduces it (context routing).
  v_cell["params"]["router"]["kernel"] = jnp.broadcast_to(v_block["params"]["router"]["kernel"], (K_Y, K_X, D_CTX, E))
  np.testing.assert_allclose(cell.apply(v_cell, x, ctx), block.apply(v_block, x, ctx), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- Lemma 1 and Corollary 1


def _cellwise_activation():
  m = build("cellwise_moe", router_input="activation")
  x, _ = inputs()
  x = x[0, 0]  # one example: [d_in]
  v = randomize(m.init(jax.random.PRNGKey(0), x))
  return m, v, x


@pytest.mark.slow
def test_lemma1_routing_jacobian_is_block_diagonal():
  m, v, x = _cellwise_activation()

  def out_blocks(kernel, x):
    params = dict(v["params"], router={"kernel": kernel})
    return m.apply({"params": params}, x).reshape(K_Y, D_OUT // K_Y)

  kernel = v["params"]["router"]["kernel"]  # [K_y, K_x, d_in/K_x, E]
  jac = jax.jacrev(out_blocks)(kernel, x)  # [K_y', o, K_y, K_x, d, E]
  for i_out, i, j in itertools.product(range(K_Y), range(K_Y), range(K_X)):
    block = np.asarray(jac[i_out, :, i, j])
    if i_out != i:
      assert np.all(block == 0.0), (i_out, i, j)
    else:
      assert np.abs(block).max() > 1e-4, (i_out, i, j)
  # ... and d h_i / d W_g^(i,j) depends on x_j alone: perturbing any other field leaves it unchanged.
  dx = D_IN // K_X
  for j in range(K_X):
    other = jnp.ones(D_IN).at[j * dx : (j + 1) * dx].set(0.0)
    jac2 = jax.jacrev(out_blocks)(kernel, x + 0.7 * other)
    for i in range(K_Y):
      np.testing.assert_allclose(jac2[i, :, i, j], jac[i, :, i, j], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_lemma1_blockwise_router_couples_every_output_block():
  m = build("blockwise_moe", router_input="activation")
  x, _ = inputs()
  x = x[0, 0]
  v = randomize(m.init(jax.random.PRNGKey(0), x))

  def out_blocks(kernel):
    params = dict(v["params"], router={"kernel": kernel})
    return m.apply({"params": params}, x).reshape(K_Y, D_OUT // K_Y)

  jac = jax.jacrev(out_blocks)(v["params"]["router"]["kernel"])
  for i_out in range(K_Y):
    assert np.abs(np.asarray(jac[i_out])).max() > 1e-4


def test_corollary1_fault_stays_in_its_column():
  m, v, x = _cellwise_activation()
  dx = D_IN // K_X
  for j0 in range(K_X):
    corrupted = x.at[j0 * dx : (j0 + 1) * dx].set(5.0)
    g = m.apply(v, x, method=m.route)  # [K_y, K_x, E]
    g_bad = m.apply(v, corrupted, method=m.route)
    for j in range(K_X):
      changed = not np.allclose(g[:, j], g_bad[:, j])
      assert changed == (j == j0), (j0, j)
  block = build("blockwise_moe", router_input="activation")
  vb = randomize(block.init(jax.random.PRNGKey(0), x))
  g = block.apply(vb, x, method=block.route)
  g_bad = block.apply(vb, x.at[:dx].set(5.0), method=block.route)
  assert not np.allclose(g, g_bad)


# ------------------------------------------------------------------------- parameter counts (paper, Section 3)

PAPER_COUNTS = [
  # SVD simulation: d=64, K=4, D=3 contexts.
  (dict(method="lora", d_in=64, d_out=64, rank=16), 2048),
  (dict(method="melora", d_in=64, d_out=64, num_blocks=4, rank=16), 2048),
  (dict(method="localized_lora", d_in=64, d_out=64, k_y=4, k_x=4, rank=4), 2048),
  (dict(method="blockwise_moe", d_in=64, d_out=64, k_y=4, k_x=4, rank=2, num_experts=2, context_dim=3), 2054),
  (dict(method="cellwise_moe", d_in=64, d_out=64, k_y=4, k_x=4, rank=2, num_experts=2, context_dim=3), 2144),
  # California Housing: d=8, K=2, D=2 (the paper's ranks exceed the block size: over-complete).
  (dict(method="lora", d_in=8, d_out=8, rank=16, allow_overcomplete_rank=True), 256),
  (dict(method="melora", d_in=8, d_out=8, num_blocks=2, rank=16, allow_overcomplete_rank=True), 256),
  (dict(method="localized_lora", d_in=8, d_out=8, k_y=2, k_x=2, rank=8, allow_overcomplete_rank=True), 256),
  (dict(method="blockwise_moe", d_in=8, d_out=8, k_y=2, k_x=2, rank=4, num_experts=2, context_dim=2), 260),
  (dict(method="cellwise_moe", d_in=8, d_out=8, k_y=2, k_x=2, rank=4, num_experts=2, context_dim=2), 272),
  # MNIST sensor degradation: d=784, K=4, D=2.
  (dict(method="lora", d_in=784, d_out=784, rank=16), 25088),
  (dict(method="melora", d_in=784, d_out=784, num_blocks=4, rank=32), 50176),
  (dict(method="localized_lora", d_in=784, d_out=784, k_y=4, k_x=4, rank=4), 25088),
  (dict(method="blockwise_moe", d_in=784, d_out=784, k_y=4, k_x=4, rank=2, num_experts=2, context_dim=2), 25092),
  (dict(method="cellwise_moe", d_in=784, d_out=784, k_y=4, k_x=4, rank=2, num_experts=2, context_dim=2), 25152),
]


@pytest.mark.parametrize("spec,count", PAPER_COUNTS)
def test_parameter_counts_equal_the_paper(spec, count):
  m = lm.make(spec)
  x = jnp.zeros((1, spec["d_in"]))
  ctx = jnp.zeros((1, spec.get("context_dim", 1)))
  shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, ctx))
  assert lm.trainable_params(shapes) == count
  assert m.num_params() == count


# ------------------------------------------------------------------------- dense Delta W and merge


@pytest.mark.parametrize("method", ["lora", "melora", "localized_lora", "blockwise_moe", "cellwise_moe"])
def test_delta_weight_and_merge_agree_with_forward(method):
  kw = {"num_blocks": 2, "rank": 2} if method == "melora" else {"rank": 2} if method == "lora" else {}
  m = build(method, **kw)
  x, ctx = inputs()
  v = randomize(m.init(jax.random.PRNGKey(0), x, ctx))
  c0 = ctx[0, 0]
  dense = lm.delta_weight(m, v, context=c0)  # [d_out, d_in]
  assert dense.shape == (D_OUT, D_IN)
  same_ctx = jnp.broadcast_to(c0, ctx.shape)
  np.testing.assert_allclose(x @ dense.T, m.apply(v, x, same_ctx), rtol=1e-4, atol=1e-5)
  w0 = jax.random.normal(jax.random.PRNGKey(5), (D_OUT, D_IN))
  np.testing.assert_allclose(lm.merge(w0, m, v, context=c0), w0 + dense, rtol=1e-6, atol=1e-6)


def test_delta_weight_with_fixed_gates_for_activation_routing():
  m = build("cellwise_moe", router_input="activation")
  x, _ = inputs()
  v = randomize(m.init(jax.random.PRNGKey(0), x))
  gates = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(3), (K_Y, K_X, E)))
  dense = lm.delta_weight(m, v, gates=gates)
  np.testing.assert_allclose(x @ dense.T, m.apply(v, x, gates=gates), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="pass gates="):
    lm.delta_weight(m, v)


def test_zero_init_is_identity_update():
  for method in ["lora", "localized_lora", "blockwise_moe", "cellwise_moe"]:
    m = build(method, rank=2)
    x, ctx = inputs()
    v = m.init(jax.random.PRNGKey(0), x, ctx)
    assert np.all(np.asarray(m.apply(v, x, ctx)) == 0.0)


# ------------------------------------------------------------------------- memory: rank-space mixing


def _max_intermediate_size(jaxpr) -> int:
  biggest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      biggest = max(biggest, int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 0)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      biggest = max(biggest, _max_intermediate_size(sub))
  return biggest


@pytest.mark.slow
@pytest.mark.parametrize("method", ["blockwise_moe", "cellwise_moe"])
def test_no_per_example_dense_update_in_forward_or_backward(method, grid_path):
  d, batch, k, e, r = 64, 32, 4, 4, 2
  m = lm.make(dict(method=method, d_in=d, d_out=d, k_y=k, k_x=k, rank=r, num_experts=e, router_input="activation"))
  x = jnp.ones((batch, d))
  v = m.init(jax.random.PRNGKey(0), x)

  def loss(params):
    return jnp.sum(m.apply({"params": params}, x) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(v["params"]).jaxpr
  largest = _max_intermediate_size(jaxpr)
  # The rank-space activations are batch*E*K_y*K_x*r = 4,096 here, plus the router logits computed in the
  # same per-field GEMMs (at most batch*K_x*K_y*E); a per-example dense update would be batch*d*d = 131,072.
  # Parameters themselves are E*K*K*(d/K)*r = 2,048 per factor.
  assert largest <= batch * (e * k * k * r + k * k * e)
  assert largest < batch * d * d // 8


# ------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize(
  "spec,field",
  [
    (dict(method="localized_lora", d_in=30, d_out=8, k_y=2, k_x=4, rank=1), "d_in=30 is not divisible by k_x=4"),
    (dict(method="localized_lora", d_in=8, d_out=9, k_y=2, k_x=2, rank=1), "d_out=9 is not divisible by k_y=2"),
    (dict(method="melora", d_in=10, d_out=10, num_blocks=3, rank=1), "num_blocks=3"),
    (dict(method="localized_lora", d_in=8, d_out=8, k_y=2, k_x=2, rank=5), "rank=5 is larger"),
    (dict(method="lora", d_in=8, d_out=8, rank=9), "allow_overcomplete_rank"),
    (dict(method="lora", d_in=8, d_out=8, rank=0), "rank=0"),
    (
      dict(method="cellwise_moe", d_in=8, d_out=8, k_y=2, k_x=2, rank=1, num_experts=2, context_dim=2, top_k=3),
      "top_k=3 must lie in 1..num_experts=2",
    ),
    (dict(method="blockwise_moe", d_in=8, d_out=8, k_y=2, k_x=2, rank=1, num_experts=2), "context_dim=None"),
    (
      dict(
        method="blockwise_moe",
        d_in=8,
        d_out=8,
        k_y=2,
        k_x=2,
        rank=1,
        num_experts=2,
        context_dim=2,
        router_input="tokens",
      ),
      "router_input='tokens'",
    ),
    (
      dict(
        method="blockwise_moe", d_in=8, d_out=8, k_y=2, k_x=2, rank=1, num_experts=2, context_dim=2, temperature=0.0
      ),
      "temperature=0.0",
    ),
    (dict(method="cellwise_moe", d_in=8, d_out=8, k_y=2, k_x=2, rank=1, num_experts=0, context_dim=2), "num_experts=0"),
    (dict(method="loRA", d_in=8, d_out=8, rank=1), "method='loRA' is not a known adapter"),
    (dict(method="lora", d_in=8, d_out=8, rank=1, k_x=2), "unknown field"),
    (dict(method="lora", d_in=8, d_out=8, rank=1, a_init="kaiming"), "a_init='kaiming'"),
  ],
)
def test_bad_construction_names_the_field(spec, field):
  with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(".", r"\.")):
    m = lm.make(spec)
    m.init(jax.random.PRNGKey(0), jnp.zeros((1, spec["d_in"])), jnp.zeros((1, 2)))


def test_context_router_without_context_is_a_clear_error():
  m = build("cellwise_moe")
  with pytest.raises(ValueError, match="called without a context"):
    m.init(jax.random.PRNGKey(0), jnp.zeros((2, D_IN)))
  m2 = build("blockwise_moe")
  with pytest.raises(ValueError, match="context has 3 features but context_dim=4"):
    m2.init(jax.random.PRNGKey(0), jnp.zeros((2, D_IN)), jnp.zeros((2, 3)))


# ------------------------------------------------------------------------- dtypes (param_dtype, dtype)

DTYPE_CASES = [
  ("lora", dict(rank=2)),
  ("dora", dict(rank=2)),
  ("melora", dict(num_blocks=2, rank=2)),
  ("localized_lora", {}),
  ("blockwise_moe", dict(router_input="context")),
  ("blockwise_moe", dict(router_input="activation", top_k=2, router_bias=True)),
  ("cellwise_moe", dict(router_input="context", temperature=0.5)),
  ("cellwise_moe", dict(router_input="activation", router_bias=True)),
]


def _apply_with_kernel(m, params, x, ctx, kernel):
  if getattr(m, "uses_base_kernel", False):
    return m.apply({"params": params}, x, kernel=kernel)
  return m.apply({"params": params}, x, ctx)


@pytest.mark.slow
@pytest.mark.parametrize("method,kw", DTYPE_CASES)
def test_bfloat16_input_with_float32_params(method, kw, grid_path):
  """dtype=None computes in the input's dtype: bf16 in, bf16 out, float32 params and float32 gradients."""
  m = build(method, **kw)
  x, ctx = inputs()
  kernel = jax.random.normal(jax.random.PRNGKey(7), (D_IN, D_OUT))
  init_kw = dict(kernel=kernel) if method == "dora" else {}
  x16 = x.astype(jnp.bfloat16)
  init_args = (x16,) if method == "dora" else (x16, ctx)
  v = jax.eval_shape(functools.partial(m.init, **init_kw), jax.random.PRNGKey(0), *init_args)  # shapes, dtypes
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(v["params"]))
  params = randomize(v)["params"]
  if method == "dora":  # keep the magnitude near ||W0|| so the ratio m / n is O(1)
    params["magnitude"] = jnp.linalg.norm(kernel, axis=0) * 1.1
  apply = jax.jit(lambda p, h: _apply_with_kernel(m, p, h, ctx, kernel))
  out16 = apply(params, x16)
  out32 = apply(params, x16.astype(jnp.float32))
  assert out16.dtype == jnp.bfloat16 and out32.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(out32)))
  assert scale > 0
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=3e-2 * scale, rtol=0)

  grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, x16).astype(jnp.float32) ** 2)))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert g.dtype == jnp.float32, path
    assert float(jnp.max(jnp.abs(g))) > 0, path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "melora", "localized_lora", "blockwise_moe", "cellwise_moe"])
def test_dtype_fields_from_strings(method):
  """A config may name dtypes as strings; dtype fixes the compute (and output) dtype, param_dtype storage."""
  kw = {"num_blocks": 2, "rank": 2} if method == "melora" else {"rank": 2} if method == "lora" else {}
  x, ctx = inputs()
  m = build(method, dtype="bfloat16", **kw)
  v = randomize(m.init(jax.random.PRNGKey(0), x, ctx))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(v["params"]))
  assert m.apply(v, x, ctx).dtype == jnp.bfloat16  # float32 input, bf16 compute
  m16 = build(method, param_dtype="bfloat16", **kw)
  v16 = m16.init(jax.random.PRNGKey(0), x, ctx)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(v16["params"]))
  assert m16.apply(v16, x, ctx).dtype == jnp.float32  # float32 input decides
  assert lm.delta_weight(m16, v16, context=ctx[0, 0]).dtype == jnp.bfloat16


@pytest.mark.parametrize("field,value", [("dtype", "bfloat17"), ("param_dtype", "int32"), ("dtype", "int8")])
def test_bad_dtype_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"{field}='{value}' is not a floating-point dtype"):
    build("cellwise_moe", **{field: value})


@pytest.mark.parametrize("method", ["blockwise_moe", "cellwise_moe"])
def test_router_softmax_stays_float32_under_bfloat16(method):
  """Sown router logits and gates are float32 ([tokens, routers, E]); the gates used are bf16."""
  m = build(method, router_input="activation")
  x, _ = inputs()
  x16 = x.astype(jnp.bfloat16)
  v = randomize(m.init(jax.random.PRNGKey(0), x16))
  gates, state = m.apply(v, x16, method=m.route, mutable=["intermediates"])
  assert gates.dtype == jnp.bfloat16
  found = lm.collect_router_outputs(state["intermediates"])
  routers = 1 if method == "blockwise_moe" else K_Y * K_X
  assert found[0].logits.dtype == jnp.float32 and found[0].gates.dtype == jnp.float32
  assert found[0].gates.shape == (int(np.prod(LEAD)), routers, E)
  np.testing.assert_allclose(found[0].gates.sum(-1), 1.0, rtol=1e-6)
  _, state32 = m.apply(v, x, method=m.route, mutable=["intermediates"])
  want = lm.collect_router_outputs(state32["intermediates"])[0].gates
  np.testing.assert_allclose(found[0].gates, want, atol=3e-2)


# ------------------------------------------------------------------------- fast form == einsum oracle (Eq. 4/6/8)

# The router options (router input, top-k, bias, temperature) as a pairwise covering design: every value of
# every option meets every value of every other option in some row (checked below), in 6 rows instead of the
# 24 of the full product.
ROUTER_OPTIONS = [
  dict(router_input="context", top_k=None, router_bias=False, temperature=1.0),
  dict(router_input="activation", top_k=None, router_bias=True, temperature=0.5),
  dict(router_input="context", top_k=1, router_bias=True, temperature=0.5),
  dict(router_input="activation", top_k=1, router_bias=False, temperature=1.0),
  dict(router_input="context", top_k=2, router_bias=False, temperature=0.5),
  dict(router_input="activation", top_k=2, router_bias=True, temperature=1.0),
]


def test_router_options_cover_every_pair_of_values():
  values = dict(
    router_input=["context", "activation"], top_k=[None, 1, 2], router_bias=[False, True], temperature=[1.0, 0.5]
  )
  for a, b in itertools.combinations(values, 2):
    seen = {(row[a], row[b]) for row in ROUTER_OPTIONS}
    assert seen == set(itertools.product(values[a], values[b])), (a, b)


ORACLE_CASES = (
  [
    ("localized_lora", {}),
    ("melora", dict(num_blocks=2, rank=2)),
    ("localized_lora", dict(k_y=4, k_x=1)),
    ("localized_lora", dict(k_y=1, k_x=6, rank=1)),
  ]
  + [(method, dict(router_input="activation")) for method in ("blockwise_moe", "cellwise_moe")]  # plain, as is row 0
  + [(method, options) for method in ("blockwise_moe", "cellwise_moe") for options in ROUTER_OPTIONS]
  + [
    ("cellwise_moe", dict(router_input="activation", k_y=4, k_x=2)),
    ("blockwise_moe", dict(router_input="activation", k_y=1, k_x=6, rank=1, top_k=2)),
    ("cellwise_moe", dict(router_input="context", k_y=4, k_x=1, num_experts=1)),
  ]
)


@pytest.fixture(params=["field_gemms", "einsum"])
def grid_path(request, monkeypatch):
  """Runs a test on both forms of the grid adapters: per-field GEMMs (large layers) and einsums (small)."""
  monkeypatch.setattr(grid, "FIELD_GEMMS_MIN_ELEMENTS", 0 if request.param == "field_gemms" else 1 << 62)
  return request.param


@pytest.fixture
def field_gemms(monkeypatch):
  monkeypatch.setattr(grid, "FIELD_GEMMS_MIN_ELEMENTS", 0)


def _oracle_case(method, kw, lead, dtype):
  m = build(method, **kw)
  kx, kc = jax.random.split(jax.random.PRNGKey(11))
  x = jax.random.normal(kx, (*lead, D_IN)).astype(dtype)
  ctx = jax.nn.one_hot(jax.random.randint(kc, lead, 0, D_CTX), D_CTX)
  params = randomize(jax.eval_shape(m.init, jax.random.PRNGKey(0), x, ctx))["params"]
  return m, params, x, ctx


def _output_and_grads(fn, params, x):
  """fn(params, x) and the gradients of sum(sin(fn)) w.r.t. (params, x), from one compiled program."""

  def loss_and_output(p, h):
    y = fn(p, h)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y  # a nonuniform cotangent

  (_, y), grads = jax.jit(jax.value_and_grad(loss_and_output, argnums=(0, 1), has_aux=True))(params, x)
  return y, grads


def _plain(kw):
  return not (kw.get("top_k") or kw.get("router_bias") or kw.get("temperature", 1.0) != 1.0)


# The option design at LEAD (two leading axes); no and three leading axes at the plain options of the default
# grid (the shape variants of the localized grid add no batch handling of their own; one leading axis, [N, d],
# is what the experiments' single layers feed).
@pytest.mark.slow
@pytest.mark.parametrize(
  "method,kw,lead",
  [(m, kw, LEAD) for m, kw in ORACLE_CASES]
  + [
    (m, kw, lead) for m, kw in ORACLE_CASES if _plain(kw) and not {"k_y", "k_x"} & set(kw) for lead in [(), (2, 1, 3)]
  ],
)
def test_fast_form_equals_einsum_oracle(method, kw, lead, field_gemms):
  """Outputs and gradients w.r.t. params and x equal the einsum form of Eq. 4/6/8 to 1e-5 (float32)."""
  m, params, x, ctx = _oracle_case(method, kw, lead, jnp.float32)
  fast = lambda p, x: m.apply({"params": p}, x, ctx)
  slow = lambda p, x: oracles.apply(m, p, x, ctx)
  got, g_fast = _output_and_grads(fast, params, x)
  want, g_slow = _output_and_grads(slow, params, x)
  assert got.shape == want.shape == (*lead, D_OUT)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_fast), jax.tree_util.tree_leaves(g_slow)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=str(path))


@pytest.mark.slow
@pytest.mark.parametrize(
  "method,kw",
  ORACLE_CASES[:1]
  + [
    (m, dict(router_input=ri, top_k=2, router_bias=True, temperature=0.5))
    for m in ("blockwise_moe", "cellwise_moe")
    for ri in ("context", "activation")
  ],
)
def test_small_layer_einsum_form_equals_oracle(method, kw):
  """Below grid.FIELD_GEMMS_MIN_ELEMENTS the adapters keep the einsum form; it matches the oracle too."""
  m, params, x, ctx = _oracle_case(method, kw, LEAD, jnp.float32)
  assert not grid.use_field_gemms(x.shape)
  fast = lambda p, x: m.apply({"params": p}, x, ctx)
  slow = lambda p, x: oracles.apply(m, p, x, ctx)
  got, g_fast = _output_and_grads(fast, params, x)
  want, g_slow = _output_and_grads(slow, params, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g_fast), jax.tree_util.tree_leaves(g_slow)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
  "method,kw",
  [c for c in ORACLE_CASES if _plain(c[1])][:6]
  + [("cellwise_moe", dict(router_input="activation", top_k=2, router_bias=True))],
)
def test_fast_form_equals_oracle_in_bfloat16(method, kw, field_gemms):
  """bfloat16 inputs with float32 params: same dtype and values as the oracle, at bf16 tolerance."""
  m, params, x, ctx = _oracle_case(method, kw, LEAD, jnp.bfloat16)
  fast = lambda p, x: m.apply({"params": p}, x, ctx)
  slow = lambda p, x: oracles.apply(m, p, x, ctx)
  got, (g_fast, _) = _output_and_grads(fast, params, x)
  want, (g_slow, _) = _output_and_grads(slow, params, x)
  assert got.dtype == want.dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2 * scale)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_fast), jax.tree_util.tree_leaves(g_slow)):
    assert a.dtype == jnp.float32, path
    tol = 3e-2 * float(jnp.max(jnp.abs(b))) + 1e-6
    np.testing.assert_allclose(a, b, atol=tol, err_msg=str(path))


@pytest.mark.parametrize("method", ["blockwise_moe", "cellwise_moe"])
def test_fixed_gates_and_broadcast_context_equal_oracle(method, grid_path):
  """Fixed gates bypass the router; a single context broadcasts over the tokens (both as the oracle)."""
  m, params, x, ctx = _oracle_case(method, dict(router_input="context"), LEAD, jnp.float32)
  shape = (*LEAD, E) if method == "blockwise_moe" else (*LEAD, K_Y, K_X, E)
  gates = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(4), shape))
  np.testing.assert_allclose(
    m.apply({"params": params}, x, gates=gates), oracles.apply(m, params, x, gates=gates), rtol=1e-5, atol=1e-5
  )
  one = ctx[0, 0]  # [D]: one context for all tokens
  np.testing.assert_allclose(
    m.apply({"params": params}, x, one), oracles.apply(m, params, x, one), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("method", ["blockwise_moe", "cellwise_moe"])
def test_fused_router_sows_the_same_logits_and_gates_as_route(method, field_gemms):
  """The activation router fused into the per-field GEMMs sows exactly what `route` computes."""
  m, params, x, _ = _oracle_case(method, dict(router_input="activation", router_bias=True, top_k=2), LEAD, jnp.float32)
  _, fused = m.apply({"params": params}, x, mutable=["intermediates"])
  _, plain = m.apply({"params": params}, x, method=m.route, mutable=["intermediates"])
  (a,), (b,) = lm.collect_router_outputs(fused["intermediates"]), lm.collect_router_outputs(plain["intermediates"])
  routers = 1 if method == "blockwise_moe" else K_Y * K_X
  assert a.logits.shape == a.gates.shape == (int(np.prod(LEAD)), routers, E)
  np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a.gates, b.gates, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_per_task_lora_merges_per_task_and_refuses_a_missing_context():
  module = lm.make({"method": "per_task_lora", "rank": 2, "context_dim": 3}, d_in=D_IN, d_out=D_OUT)
  x, _ = inputs()
  task = jnp.asarray([[0, 2, 1], [1, 1, 0]])  # LEAD = (2, 3)
  variables = randomize(module.init(jax.random.PRNGKey(0), x, task))
  got = module.apply(variables, x, task)
  for t in range(3):  # each task's Delta W
    w = module.apply(variables, jnp.asarray(t), method=module.delta_weight)
    np.testing.assert_allclose(w, variables["params"]["B"][t] @ variables["params"]["A"][t].T, rtol=1e-5)
    rows = np.asarray(task) == t
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(x)[rows] @ np.asarray(w).T, rtol=1e-4, atol=1e-5)
  one_hot = jax.nn.one_hot(task, 3)
  np.testing.assert_allclose(module.apply(variables, x, one_hot), got, rtol=1e-6)
  with pytest.raises(ValueError, match="selects a LoRA by the context"):
    module.apply(variables, x)


# ------------------------------------------------------------------------- router controls

ROUTED = ["blockwise_moe", "cellwise_moe"]
ROUTED_INPUTS = list(itertools.product(ROUTED, ["context", "activation"]))


def _sown_gates(m, variables, x, ctx, **kw):
  """(output, the router's sown gates [tokens, routers, E] as numpy)."""
  out, state = m.apply(variables, x, ctx, mutable=["intermediates"], **kw)
  (router,) = lm.collect_router_outputs(state["intermediates"])
  return out, np.asarray(router.gates)


def _gate_shape(method):
  return (*LEAD, E) if method == "blockwise_moe" else (*LEAD, K_Y, K_X, E)


@pytest.mark.parametrize("method,router_input", ROUTED_INPUTS)
def test_default_router_controls_ignore_rngs_and_match_the_oracle(method, router_input, grid_path):
  """Defaults: soft gates (Eq. 5 / 7 by the oracle), no noise even when rngs are given. That they reproduce
  the code from before the controls bit for bit is tests/test_router_former.py."""
  x, ctx = inputs()
  new = build(method, router_input=router_input)
  assert (new.router_init, new.router_hard, new.router_dropout, new.rng_streams) == ("normal", None, 0.0, ())
  v = randomize(new.init(jax.random.PRNGKey(0), x, ctx))
  got = new.apply(v, x, ctx)
  np.testing.assert_array_equal(
    got, new.apply(v, x, ctx, rngs={"gumbel": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)})
  )
  np.testing.assert_allclose(got, oracles.apply(new, v["params"], x, ctx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,router_input", ROUTED_INPUTS)
def test_router_init_options(method, router_input):
  x, ctx = inputs()
  features = D_CTX if router_input == "context" else D_IN if method == "blockwise_moe" else D_IN // K_X
  routers = () if method == "blockwise_moe" else (K_Y, K_X)
  kernels = {}
  for kind, scale in [("normal", None), ("normal", 0.02), ("uniform", None), ("zeros", None)]:
    m = build(method, router_input=router_input, router_init=kind, router_init_scale=scale)
    v = m.init(jax.random.PRNGKey(0), x, ctx)
    kernels[kind, scale] = k = np.asarray(v["params"]["router"]["kernel"])
    assert k.shape == (*routers, features, E)
    if kind == "zeros":  # uniform gates 1/E
      _, gates = _sown_gates(m, randomize(v, scale=0.0), x, ctx)
      np.testing.assert_allclose(gates, 1.0 / E, rtol=1e-6)
  # The same normal draws, rescaled from 1/sqrt(F) to 0.02 (MixLoRA's std).
  np.testing.assert_allclose(kernels["normal", 0.02], kernels["normal", None] * 0.02 * np.sqrt(features), rtol=1e-5)
  uniform = kernels["uniform", None]
  assert np.abs(uniform).max() <= 1e-3 and uniform.min() < 0 < uniform.max()


@pytest.mark.slow
@pytest.mark.parametrize("method", ROUTED)
def test_task_aligned_start_routes_context_t_to_expert_t_mod_e(method, grid_path):
  m = build(method, router_init="task_aligned", router_init_margin=3.0)
  labels = jnp.arange(D_CTX)  # contexts 0..3, E = 3 experts
  x = jax.random.normal(jax.random.PRNGKey(1), (D_CTX, D_IN))
  v = m.init(jax.random.PRNGKey(0), x, labels)
  _, gates = _sown_gates(m, v, x, labels)  # [4, routers, E]
  routers = 1 if method == "blockwise_moe" else K_Y * K_X
  assert gates.shape == (D_CTX, routers, E)
  favoured = np.arange(D_CTX) % E
  np.testing.assert_array_equal(gates.argmax(-1), np.broadcast_to(favoured[:, None], (D_CTX, routers)))
  peak = np.exp(3.0) / (np.exp(3.0) + E - 1)
  np.testing.assert_allclose(gates[np.arange(D_CTX), :, favoured], peak, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
  "method,router_input,hard", [(m, ri, h) for m, ri in ROUTED_INPUTS for h in ["straight_through", "gumbel"]]
)
def test_hard_routing_has_one_nonzero_gate_and_trains_the_router(method, router_input, hard, grid_path):
  x, ctx = inputs()
  m = build(method, router_input=router_input, router_hard=hard)
  v = randomize(m.init(jax.random.PRNGKey(0), x, ctx))
  rngs = {"gumbel": jax.random.PRNGKey(5)} if hard == "gumbel" else {}
  out, gates = _sown_gates(m, v, x, ctx, rngs=rngs)
  assert np.all((gates > 0).sum(-1) == 1) and np.all(gates.max(-1) == 1.0)
  np.testing.assert_allclose(out, m.apply(v, x, gates=gates.reshape(_gate_shape(method))), rtol=1e-5, atol=1e-6)

  def router_grad(module):
    loss = lambda p: jnp.sum(jnp.sin(module.apply({"params": p}, x, ctx, rngs=rngs)))
    return np.asarray(jax.grad(loss)(v["params"])["router"]["kernel"])

  assert np.abs(router_grad(m)).max() > 1e-3  # the router still trains
  np.testing.assert_array_equal(router_grad(build(method, router_input=router_input, top_k=1)), 0.0)  # top-1 alone: no


@pytest.mark.parametrize("method", ROUTED)
def test_gumbel_modes_are_deterministic_without_the_rng(method, grid_path):
  x, ctx = inputs()
  v = randomize(build(method).init(jax.random.PRNGKey(0), x, ctx))
  apply = lambda **kw: build(method, **kw).apply(v, x, ctx)
  np.testing.assert_array_equal(apply(router_hard="gumbel"), apply(router_hard="straight_through"))
  np.testing.assert_array_equal(apply(router_hard="gumbel_soft"), apply())
  sampled = build(method, router_hard="gumbel_soft").apply(v, x, ctx, rngs={"gumbel": jax.random.PRNGKey(3)})
  assert not np.allclose(sampled, apply())


@pytest.mark.slow
@pytest.mark.parametrize("method,router_input", ROUTED_INPUTS)
def test_expert_dropout_drops_and_renormalises_only_with_the_rng(method, router_input, grid_path):
  x, ctx = inputs()
  m = build(method, router_input=router_input, router_dropout=0.5)
  base = build(method, router_input=router_input)
  v = randomize(m.init(jax.random.PRNGKey(0), x, ctx))
  out, gates = _sown_gates(m, v, x, ctx, rngs={"dropout": jax.random.PRNGKey(7)})
  _, soft = _sown_gates(base, v, x, ctx)
  kept = gates > 0
  assert (~kept).any() and kept.any(-1).all()
  np.testing.assert_allclose(gates, soft * kept / (soft * kept).sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out, m.apply(v, x, gates=gates.reshape(_gate_shape(method))), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(m.apply(v, x, ctx), base.apply(v, x, ctx))  # evaluation: off


@pytest.mark.parametrize("method,router_input", ROUTED_INPUTS)
def test_call_time_temperature_overrides_the_field(method, router_input, grid_path):
  x, ctx = inputs()
  m = build(method, router_input=router_input)
  v = randomize(m.init(jax.random.PRNGKey(0), x, ctx))
  want = build(method, router_input=router_input, temperature=0.25).apply(v, x, ctx)
  np.testing.assert_allclose(m.apply(v, x, ctx, temperature=0.25), want, rtol=1e-6, atol=1e-7)
  traced = jax.jit(lambda t: m.apply(v, x, ctx, temperature=t))(jnp.float32(0.25))
  np.testing.assert_allclose(traced, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(m.apply(v, x, ctx), want)


@pytest.mark.parametrize("method", ROUTED)
@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(router_init="xavier"), "router_init='xavier' is not a known router initialiser"),
    (dict(router_init="task_aligned", router_input="activation"), "needs router_input='context'"),
    (dict(router_init="uniform", router_init_scale=0.0), "router_init_scale=0.0 must be"),
    (dict(router_init="task_aligned", router_init_margin=-1.0), "router_init_margin=-1.0 must be"),
    (dict(router_hard="sparsemax"), "router_hard='sparsemax' is not one of"),
    (dict(router_hard="gumbel", top_k=1), "top_k=1 with router_hard='gumbel'"),
    (dict(router_dropout=1.0), r"router_dropout=1.0 must be a probability in \[0, 1\)"),
  ],
)
def test_bad_router_controls_name_the_field(method, kw, match):
  with pytest.raises(ValueError, match=match):
    build(method, **kw)
