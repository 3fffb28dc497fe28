"""The routed adapters' default router controls reproduce the code from before the controls existed.

`tests/fixtures/router_former.npz` holds what the former code (the commit before "Router controls", 57b3f11^)
computed for block-wise and cell-wise adapters with context and activation routers: the initial params, the
output and the sown gates under those params and under random ones. It was written by this module run against
that code:

  git archive 57b3f11^ localmoe | tar -x -C <dir> && PYTHONPATH=<dir> python tests/test_router_former.py --write

and the test runs the same computation on today's code with every router control at its default.
"""

import os
import sys

import jax
import numpy as np
import pytest

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "router_former.npz")
D_IN, D_OUT, K_Y, K_X, RANK, E, D_CTX = 12, 8, 2, 3, 2, 3, 4
CASES = [
  (method, router_input) for method in ("blockwise_moe", "cellwise_moe") for router_input in ("context", "activation")
]


def computation(lm) -> dict[str, np.ndarray]:
  """{"<method>/<router input>/<what>": array} of the `localmoe` package `lm` (former or current)."""
  r = np.random.default_rng(0)
  x = r.standard_normal((2, 3, D_IN)).astype(np.float32)
  ctx = np.eye(D_CTX, dtype=np.float32)[r.integers(0, D_CTX, (2, 3))]
  out = {}
  for method, router_input in CASES:
    spec = dict(
      method=method,
      d_in=D_IN,
      d_out=D_OUT,
      k_y=K_Y,
      k_x=K_X,
      rank=RANK,
      num_experts=E,
      router_input=router_input,
      context_dim=D_CTX,
    )
    module = lm.make(spec)
    variables = module.init(jax.random.PRNGKey(0), x, ctx)
    drawn = jax.tree_util.tree_map(lambda a: 0.5 * r.standard_normal(a.shape).astype(np.float32), variables)
    name = f"{method}/{router_input}"
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
      out[f"{name}/init/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    for which, values in (("init", variables), ("random", drawn)):
      y, state = module.apply(values, x, ctx, mutable=["intermediates"])
      (router,) = lm.collect_router_outputs(state["intermediates"])
      out[f"{name}/{which}/output"] = np.asarray(y)
      out[f"{name}/{which}/gates"] = np.asarray(router.gates)
  return out


@pytest.mark.slow
@pytest.mark.xla_optimized  # initial params bit for bit with the fixture, which optimised XLA code drew
def test_default_router_controls_reproduce_the_former_code():
  import localmoe as lm

  former = dict(np.load(FIXTURE))
  now = computation(lm)
  assert sorted(now) == sorted(former)
  for key, want in former.items():
    if "/init/" in key and not key.endswith(("output", "gates")):
      np.testing.assert_array_equal(now[key], want, err_msg=key)  # initial params: bit for bit
    else:  # computed: float32 rounding differs by CPU
      np.testing.assert_allclose(now[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
  module = lm.make(
    dict(
      method="cellwise_moe",
      d_in=D_IN,
      d_out=D_OUT,
      k_y=K_Y,
      k_x=K_X,
      rank=RANK,
      num_experts=E,
      router_input="context",
      context_dim=D_CTX,
    )
  )
  assert (module.router_init, module.router_hard, module.router_dropout) == ("normal", None, 0.0)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
  import localmoe as former_lm

  np.savez_compressed(FIXTURE, **computation(former_lm))
  print(f"wrote {FIXTURE} from {os.path.dirname(former_lm.__file__)}")
