"""Router controls act where they promise to: Gumbel routing and expert dropout in training (per step, per
seed, reproducible on resume) and never in evaluation; the temperature schedule from an adapter spec; bad
temperatures, router-init fields and diagnostics inputs refused with one line naming them."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import localmoe as lm
from localmoe import inject, routing, single_layer, train

D, CTX = 4, 2
SETTINGS = train.Settings(epochs=2, batch_size=16, learning_rate=3e-2)


def tiny_problem(seeds=(0,), n=64):
  """Per-seed data: y = W_c x for context c, W0 = 0."""

  def one(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    c = rng.integers(0, CTX, n)
    w = rng.standard_normal((CTX, D, D)).astype(np.float32)
    y = np.einsum("nod,nd->no", w[c], x).astype(np.float32)
    return {"x": x, "context": np.eye(CTX, dtype=np.float32)[c], "y": y}

  rows = [one(s) for s in seeds]
  stack = lambda sl: {k: np.stack([r[k][sl] for r in rows]) for k in rows[0]}
  return train.Data(
    train=stack(slice(0, 48)),
    test=stack(slice(48, None)),
    frozen={"w0": np.zeros((len(seeds), D, D), np.float32)},
    per_seed=True,
  )


def routed(**kw):
  spec = dict(
    method="cellwise_moe",
    d_in=D,
    d_out=D,
    rank=1,
    k_y=2,
    k_x=2,
    num_experts=2,
    context_dim=CTX,
    router_init="zeros",
    b_init="normal_0.01",
  )
  spec.update(kw)
  return lm.make(spec)


@pytest.mark.slow
def test_gumbel_and_expert_dropout_change_training_and_evaluation_stays_deterministic():
  data = tiny_problem()
  soft = train.fit(single_layer.layer_task(routed(), D, CTX), data, [0], SETTINGS, log=None)
  noisy_task = single_layer.layer_task(routed(router_hard="gumbel_soft", router_dropout=0.5), D, CTX)
  assert noisy_task.rngs == ("gumbel", "dropout")
  noisy = train.fit(noisy_task, data, [0], SETTINGS, log=None)
  assert not np.allclose(soft.history, noisy.history, rtol=1e-4)  # the noise acted in training
  # The test MSE in the history is that of the deterministic forward (predict without rngs) of the final
  # params, while any two keys give two different training forwards.
  params = jax.tree_util.tree_map(lambda a: a[0], noisy.params)
  frozen, test = {"w0": data.frozen["w0"][0]}, {k: v[0] for k, v in data.test.items()}
  inputs = {k: v for k, v in test.items() if k != "y"}
  deterministic = noisy_task.predict(params, frozen, inputs)
  np.testing.assert_allclose(noisy.history[0, -1, -1, 0], np.mean((deterministic - test["y"]) ** 2), rtol=1e-5)
  one, two = (noisy_task.call(params, frozen, inputs, jax.random.PRNGKey(k)) for k in (1, 2))
  assert not np.allclose(one, two)


def gate_probe_task(module):
  """The layer task, whose aux outputs read the gates of the training forward pass: the fraction of gate
  vectors that are exactly one-hot, and the fraction whose chosen expert differs from the noiseless argmax."""
  base = single_layer.layer_task(module, D, CTX)

  def predict(params, frozen, inputs, rngs=None):
    out, state = module.apply({"params": params}, inputs["x"], inputs["context"], rngs=rngs, mutable=["intermediates"])
    (router,) = routing.collect_router_outputs(state["intermediates"])
    gates = router.gates  # [N, R, E]
    one_hot = jnp.mean((gates.max(-1) == 1.0) & (jnp.sum(gates != 0, -1) == 1))
    resampled = jnp.mean(jnp.argmax(gates, -1) != jnp.argmax(router.logits, -1))
    return out, {"one_hot": one_hot, "resampled": resampled}

  return train.Task(init=base.init, predict=predict, aux_names=("one_hot", "resampled"), rngs=module.rng_streams)


@pytest.mark.slow
def test_hard_gumbel_gates_are_one_hot_samples_in_training_and_a_resume_draws_the_same_noise():
  data = tiny_problem()
  states = []
  keep = lambda fs: states.append(dataclasses.replace(fs, state=jax.tree_util.tree_map(np.array, fs.state)))
  whole = train.fit(gate_probe_task(routed(router_hard="gumbel")), data, [0], SETTINGS, log=None, on_epoch_end=keep)
  one_hot, resampled = whole.train_history[..., 1], whole.train_history[..., 2]  # [entries, epochs]
  np.testing.assert_array_equal(one_hot, 1.0)  # every forward gate one-hot
  assert resampled.min() > 0.1  # sampled, not the argmax
  resumed = train.fit(
    gate_probe_task(routed(router_hard="gumbel")), data, [0], SETTINGS, log=None, resume=states[0]
  )  # epoch 2 again, from epoch 1
  np.testing.assert_array_equal(whole.history, resumed.history)
  np.testing.assert_array_equal(whole.train_history, resumed.train_history)


def test_plain_tasks_are_called_as_before():
  task = single_layer.layer_task(routed(), D, CTX)
  assert task.rngs == () and not task.takes_step
  assert single_layer.layer_task(routed(router_dropout=0.1), D, CTX).rngs == ("dropout",)
  assert routing.rng_streams(
    [routed(router_dropout=0.1), routed(router_hard="gumbel"), lm.make(dict(method="lora", d_in=D, d_out=D, rank=1))]
  ) == ("gumbel", "dropout")
  assert routing.rng_streams(routed(router_hard="straight_through")) == ()
  with pytest.raises(TypeError, match=r"Task.rngs='gumbel' must be a tuple"):
    train.Task(init=task.init, predict=task.predict, rngs="gumbel")


@pytest.mark.slow
def test_temperature_schedule_comes_from_the_adapter_spec():
  module = routed(temperature_schedule=(10.0, 0.5, 100), router_init="normal")
  task = single_layer.layer_task(module, D, CTX)
  assert task.takes_step
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, D)), jnp.float32)
  c = jnp.eye(CTX)[jnp.arange(5) % CTX]
  v = module.init(jax.random.PRNGKey(0), x, c)
  plain = routed(router_init="normal")
  for step in (0, 50, 100, 400):
    want = plain.apply(v, x, c, temperature=routing.temperature_at(step, 10.0, 0.5, 100))
    np.testing.assert_allclose(module.apply(v, x, c, step=jnp.asarray(step)), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(module.apply(v, x, c), plain.apply(v, x, c, temperature=0.5), rtol=1e-6)
  assert not np.allclose(module.apply(v, x, c, step=0), module.apply(v, x, c, step=100))


def test_bad_temperature_schedules_name_the_field():
  cases = [
    (dict(temperature_schedule=(10.0, 0.5)), "temperature_schedule=\\(10.0, 0.5\\)"),
    (dict(temperature_schedule=(10.0, 0.0, 10)), "end=0.0 must be"),
    (dict(temperature_schedule=(10.0, 0.5, 10, "cosine")), "kind='cosine' is not a temperature schedule"),
    (dict(temperature_schedule=(10.0, 0.5, 10), temperature=2.0), "leave temperature at 1.0"),
  ]
  for kw, match in cases:
    with pytest.raises(ValueError, match=match):
      routed(**kw)


@pytest.mark.slow
def test_temperature_schedule_acts_in_training():
  data = tiny_problem()
  kw = dict(router_init="normal")
  fixed = train.fit(single_layer.layer_task(routed(**kw), D, CTX), data, [0], SETTINGS, log=None)
  annealed = train.fit(
    single_layer.layer_task(routed(temperature_schedule=(10.0, 0.5, 6), **kw), D, CTX), data, [0], SETTINGS, log=None
  )
  assert not np.allclose(fixed.history, annealed.history, rtol=1e-4)


@pytest.mark.parametrize(
  "value,error,match",
  [
    (0.0, ValueError, "temperature=0.0 must be finite and > 0"),
    (-1.0, ValueError, "temperature=-1.0 must be finite and > 0"),
    (float("inf"), ValueError, "temperature=inf must be finite and > 0"),
    (float("nan"), ValueError, "temperature=nan must be finite and > 0"),
    ("1", TypeError, "temperature='1' is not a number"),
    (True, TypeError, "temperature=True is not a number"),
    (np.ones(2, np.float32), TypeError, r"temperature is an array of shape \(2,\)"),
  ],
)
def test_bad_temperatures_are_refused_at_call_time_and_as_a_field(value, error, match, initialised):
  module, v, x, c = initialised
  with pytest.raises(error, match=match):
    module.apply(v, x, c, temperature=value)
  with pytest.raises(error, match=match):
    routed(temperature=value)


@pytest.fixture(scope="module")
def initialised():
  """A routed adapter, its variables (numpy, no initialiser compiled) and inputs."""
  module = routed(router_init="normal")
  rng = np.random.default_rng(0)
  params = {
    "A": rng.standard_normal((2, 2, 2, D // 2, 1)).astype(np.float32),
    "B": rng.standard_normal((2, 2, 2, D // 2, 1)).astype(np.float32),
    "router": {"kernel": rng.standard_normal((2, 2, CTX, 2)).astype(np.float32)},
  }
  return module, {"params": params}, np.ones((3, D), np.float32), np.eye(CTX, dtype=np.float32)[[0, 1, 0]]


def test_a_traced_temperature_is_checked_for_its_shape(initialised):
  module, v, x, c = initialised
  with pytest.raises(TypeError, match=r"temperature is a traced float32 array of shape \(2,\)"):
    jax.jit(lambda t: module.apply(v, x, c, temperature=t))(jnp.ones(2))
  assert routing.check_temperature(np.float32(0.5)) == 0.5 and routing.check_temperature(2) == 2.0
  assert routing.check_temperature(jnp.float32(0.5)).shape == ()


def test_router_init_fields_that_would_be_ignored_are_refused():
  with pytest.raises(ValueError, match="router_init_scale=0.5 has no effect with router_init='zeros'"):
    routed(router_init="zeros", router_init_scale=0.5)
  with pytest.raises(ValueError, match="router_init_margin=2.0 has no effect with router_init='normal'"):
    routed(router_init="normal", router_init_margin=2.0)
  routed(router_init="task_aligned", router_init_margin=2.0)
  routed(router_init="uniform", router_init_scale=0.01)


def test_temperature_at_takes_numpy_integer_steps():
  np.testing.assert_allclose(routing.temperature_at(5, 10.0, 0.5, np.int64(10)), math.sqrt(5.0), rtol=1e-6)
  with pytest.raises(ValueError, match="steps=True must be a positive integer"):
    routing.temperature_at(0, 10.0, 0.5, True)


GATES = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [1.0, 0.0], [0.3, 0.7], [0.6, 0.4]], np.float32)


@pytest.mark.parametrize(
  "gates,groups,num_groups,match",
  [
    (GATES, [0, 1, 2, 5, 5, 5], 3, r"groups holds ids \[5\] outside 0..2 \(num_groups=3\)"),
    (GATES, [-1, 0, 1, 2, 0, 1], 3, r"groups holds ids \[-1\] outside 0..2"),
    (GATES, [0.0, 1.0, 2.0, 0.0, 1.0, 2.0], 3, "groups has dtype float32: pass integer group ids"),
    (GATES, [0, 1, 2, 0, 1, 2], 0, "num_groups=0 must be a positive integer"),
    (GATES, [0, 1, 2, 0, 1, 2], 2.0, "num_groups=2.0 must be a positive integer"),
    (GATES, [0, 1, 2], 3, "groups has 3 ids but gates has 6 tokens"),
    (np.log(GATES + 0.1), None, None, "gates has a negative entry"),
    (GATES * 2, None, None, "gates has a row summing to 2"),
    (np.where(GATES > 0.95, np.nan, GATES), None, None, "gates has non-finite entries"),
  ],
)
def test_gate_diagnostics_refuses_what_it_cannot_measure(gates, groups, num_groups, match):
  groups = None if groups is None else np.asarray(groups)
  with pytest.raises(ValueError, match=match):
    routing.gate_diagnostics(jnp.asarray(gates)[:, None, :], groups, num_groups)


def test_gate_diagnostics_traced_bad_input_is_nan_not_a_number():
  diagnose = jax.jit(lambda g, t: routing.gate_diagnostics(g, t, 3))
  good = diagnose(jnp.asarray(GATES)[:, None], jnp.asarray([0, 1, 2, 0, 1, 2]))
  assert np.isfinite(good["entropy_nats"]) and good["entropy_nats"] >= 0 and np.isfinite(good["task_separation"])
  assert np.isnan(diagnose(jnp.asarray(GATES)[:, None], jnp.asarray([0, 1, 2, 5, 5, 5]))["task_separation"])
  assert np.isnan(diagnose(jnp.log(jnp.asarray(GATES) + 0.1)[:, None], jnp.asarray([0, 1, 2, 0, 1, 2]))["entropy_nats"])


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(D, name="out")(nn.relu(nn.Dense(D, name="hidden")(x)))


@pytest.mark.slow
def test_injected_adapters_draw_their_noise_from_apply_rngs():
  model = _Mlp()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, D)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  spec = dict(
    method="cellwise_moe",
    rank=1,
    k_y=2,
    k_x=2,
    num_experts=2,
    context_dim=CTX,
    router_hard="gumbel_soft",
    router_dropout=0.5,
    b_init="normal_0.01",
  )
  adapted, trainable = inject.inject(model, params, spec, x[:1], target_modules="hidden", key=jax.random.PRNGKey(1))
  context = jnp.arange(6) % CTX
  plain = adapted.apply(params, trainable, x, context=context)
  drawn = [
    adapted.apply(
      params,
      trainable,
      x,
      context=context,
      rngs={"gumbel": jax.random.PRNGKey(k), "dropout": jax.random.PRNGKey(k + 10)},
    )
    for k in (1, 2)
  ]
  assert not np.allclose(drawn[0], drawn[1])  # the noise reaches the adapters
  np.testing.assert_array_equal(plain, adapted.apply(params, trainable, x, context=context))

  # Trained through train.fit: a Task over the injected model declares the adapters' rng streams.
  streams = routing.rng_streams(adapted.adapter.modules(adapted.layers).values())
  assert streams == ("gumbel", "dropout")
  rows = np.random.default_rng(1)
  xs = rows.standard_normal((64, D)).astype(np.float32)
  data = train.Data(
    train={"x": xs[:48], "context": np.arange(48) % CTX, "y": np.tanh(xs[:48])},
    test={"x": xs[48:], "context": np.arange(16) % CTX, "y": np.tanh(xs[48:])},
    frozen=params,
  )

  def task(rngs_declared):
    def predict(trained, frozen, inputs, rngs=None):
      return adapted.apply(frozen, trained, inputs["x"], context=inputs["context"], rngs=rngs)

    return train.Task(init=lambda key, frozen: trainable, predict=predict, rngs=rngs_declared)

  one_epoch = train.Settings(epochs=1, batch_size=16, learning_rate=3e-2)
  noisy = train.fit(task(streams), data, [0], one_epoch, log=None)
  plain_fit = train.fit(task(()), data, [0], one_epoch, log=None)
  assert not np.allclose(noisy.history, plain_fit.history, rtol=1e-4)


@pytest.mark.slow
def test_training_keys_are_a_function_of_the_seed_and_the_global_step():
  """Each step's key is fold_in(fold_in(seed key, 2), global step), stream i fold_in(., i): different per
  seed under vmap, new at every step of every epoch, the same after a resume."""
  base = single_layer.layer_task(lm.make(dict(method="lora", d_in=D, d_out=D, rank=1)), D, CTX)

  def predict(params, frozen, inputs, rngs=None):
    draws = {name: jax.random.uniform(rngs[name]) if rngs else jnp.float32(-1) for name in ("gumbel", "dropout")}
    return base.predict(params, frozen, inputs), draws

  task = train.Task(init=base.init, predict=predict, aux_names=("gumbel", "dropout"), rngs=("gumbel", "dropout"))
  data = tiny_problem((0, 1))
  fit = train.fit(task, data, [3, 4], SETTINGS, log=None)  # 3 steps of 16 rows per epoch
  for k, seed in enumerate((3, 4)):
    noise = jax.random.fold_in(jax.random.PRNGKey(seed), 2)
    for epoch in range(SETTINGS.epochs):
      for i, name in enumerate(("gumbel", "dropout")):
        want = np.mean(
          [jax.random.uniform(jax.random.fold_in(jax.random.fold_in(noise, epoch * 3 + s), i)) for s in range(3)]
        )
        np.testing.assert_allclose(fit.train_history[k, epoch, 1 + i], want, rtol=1e-6)
