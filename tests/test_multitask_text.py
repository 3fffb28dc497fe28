"""The multi-task text experiment's pieces: parity of the methods, per-task metrics, one LoRA per task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import multitask_text as config_module
from experiments import multitask_text as mt
from localmoe import adapters, routing, train
from localmoe import params as params_lib

# MiniLM's adapted layers per block: q, k, v, attention output (384 -> 384), FFN in (384 -> 1536), out (1536 -> 384).
SHAPES = [(384, 384)] * 4 + [(384, 1536), (1536, 384)]


def _count(method, adapter_config, tasks=4):
  spec = mt.adapter_spec(method, adapter_config, config_module.get_config().router, tasks)
  return sum(adapters.make(spec, d_in=i, d_out=o).num_params() for i, o in SHAPES) * 6


def test_methods_are_at_parameter_parity_with_lora():
  m = config_module.get_config().adapter
  lora = _count("lora", m)
  assert lora == 6 * 8 * sum(i + o for i, o in SHAPES) == 331_776
  for method in ("localized_lora", "per_task_lora"):
    assert _count(method, m) == lora
  for method in (
    "blockwise_moe",
    "cellwise_moe",
    "blockwise_moe_anchor",
    "cellwise_moe_anchor",
    "cellwise_moe_oracle",
  ):  # experts at parity, plus small context routers
    assert 0 < _count(method, m) - lora < 0.02 * lora
  # Activation routers read a d_in / K field per cell: stated in the table, not hidden.
  assert _count("cellwise_moe_activation", m) > _count("cellwise_moe", m)


def test_config_model_is_the_backbone_and_config_adapter_holds_the_adapter_defaults():
  for arg in (None, "cpu", "quick"):
    config = config_module.get_config(arg)
    assert set(config.adapter.keys()) == {"rank", "grid", "num_experts", "alpha"}
    assert set(config.model.keys()) == {"num_layers", "frozen_layers", "dtype", "heads"}


def test_task_scores_match_a_hand_count():
  num_classes = (3, 2)
  logits = jnp.full((6, 3), mt.NEG).at[:, :2].set(0.0)
  pred = jnp.asarray([0, 1, 2, 0, 1, 1])
  logits = jnp.where(jax.nn.one_hot(pred, 3) > 0, 5.0, logits)
  #                  label task counted
  y = jnp.asarray([[0, 0, 1], [1, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 1, 0]])
  fn = mt.per_example_metrics(num_classes)
  means = np.asarray(fn(logits, y).mean(0))
  scores = mt.task_scores(means, ("a", "b"), num_classes)
  np.testing.assert_allclose(scores["accuracy/a"], 2 / 3)  # rows 0, 1 right; row 2 wrong
  np.testing.assert_allclose(scores["accuracy/b"], 1.0)  # row 5 is not counted
  # Task a: class 0 F1 = 1, class 1: tp 1, pred 1, true 2 -> 2/3, class 2: tp 0, pred 1, true 0 -> 0.
  np.testing.assert_allclose(scores["macro_f1/a"], (1 + 2 / 3 + 0) / 3, rtol=1e-6)
  np.testing.assert_allclose(scores["macro_f1/b"], 1.0)
  np.testing.assert_allclose(scores["accuracy/mean"], (2 / 3 + 1) / 2)


@pytest.mark.slow
def test_one_lora_per_task_is_the_selected_tasks_lora():
  module = adapters.make({"method": "per_task_lora", "rank": 2, "context_dim": 3}, d_in=6, d_out=5)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
  task = jnp.asarray([0, 2, 1, 2])
  params = module.init(jax.random.PRNGKey(1), x, task)["params"]
  params = {"A": params["A"], "B": jax.random.normal(jax.random.PRNGKey(2), params["B"].shape)}
  got = module.apply({"params": params}, x, task)
  want = jnp.stack([x[n] @ params["A"][t] @ params["B"][t].T for n, t in enumerate(task)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert module.num_params() == 3 * 2 * (6 + 5)


@pytest.mark.parametrize(
  "override, message",
  [
    (dict(method_names="lora,nope"), "unknown \\['nope'\\]"),
    (dict(adapter=dict(rank=6)), "config.adapter.rank=6 does not split at parity"),
    (dict(adapter=dict(num_experts=0)), "config.adapter.num_experts=0 must be a positive integer"),
    (dict(adapter=dict(grid=0)), "config.adapter.grid=0 must be a positive integer"),
    (
      dict(adapter=dict(grid=5, rank=20)),
      r"^config.adapter \(method localized_lora, a 384 -> 384 layer\): d_in=384 "
      r"is not divisible by k_x=5: choose k_x among the divisors of 384",
    ),
    (dict(adapter=dict(alpha=-1.0)), "config.adapter.alpha=-1.0 must be >= 0"),
    (dict(model=dict(frozen_layers=6)), "config.model.frozen_layers=6 must lie in 0..5"),
    (dict(data=dict(seed=-1)), "config.data.seed=-1 must be an integer >= 0"),
    (dict(data=dict(tasks="topic,nosuch")), r"unknown task\(s\) \['nosuch'\]"),
    (dict(data=dict(train_per_task=10, val_per_task=10)), "val_per_task=10 must be below"),
    (dict(probe=dict(l2="0,1")), "config.probe.l2"),
    (dict(router=dict(anchor_lr_mult=0.0)), "config.router.anchor_lr_mult=0.0 must be a finite number > 0"),
    (dict(eval=dict(diagnostic_rows=10_000)), "diagnostic_rows=10000 must be <="),
    (dict(optim=dict(groups="nosuch")), r"config.optim.groups='nosuch': unknown preset\(s\) \['nosuch'\]"),
    (dict(optim=dict(groups="[{'pattern': 'x', 'lr': 3}]")), r"groups\[0\] has unknown key\(s\) \['lr'\]"),
    (dict(data=dict(tasks="topic,topic")), "config.data.tasks"),
    (dict(model=dict(num_layers=7)), "config.model.num_layers=7"),
    (dict(router=dict(load_balance=-1.0)), "config.router.load_balance"),
    (dict(num_seeds=100000, data=dict(max_length=128)), "more than this machine can hold"),
  ],
)
def test_bad_configs_are_refused_before_anything_runs(override, message):
  config = config_module.get_config()
  with config.unlocked():
    for key, value in override.items():
      if isinstance(value, dict):
        for k, v in value.items():
          config[key][k] = v
      else:
        config[key] = value
  with pytest.raises(ValueError, match=message):
    mt.validate(config)


def test_paired_differences_are_per_seed_and_skip_diverged_seeds():
  acc = lambda *v: {"accuracy/mean": {"per_seed": list(v)}}
  summaries = {
    "lora": acc(0.60, 0.70, 0.65),
    "per_task_lora": acc(0.62, 0.71, None),
    "cellwise_moe": acc(0.63, 0.69, 0.70),
  }
  paired = mt.paired_differences(summaries)["cellwise_moe"]
  np.testing.assert_allclose(paired["vs_lora"]["per_seed"], [3.0, -1.0, 5.0], atol=1e-9)
  np.testing.assert_allclose(paired["vs_lora"]["mean"], 7 / 3, atol=1e-9)
  assert paired["vs_per_task_lora"]["per_seed"][2] is None  # that seed diverged
  np.testing.assert_allclose(paired["vs_per_task_lora"]["mean"], np.mean([1.0, -2.0]), atol=1e-9)


@pytest.mark.slow
def test_logistic_probe_converges_to_the_regularised_optimum():
  r = np.random.default_rng(0)
  x = jnp.asarray(r.standard_normal((120, 5)), jnp.float32)
  labels = jnp.asarray(np.argmax(np.asarray(x) @ r.standard_normal((5, 3)), -1))
  params, steps, grad_norm = mt.fit_logistic(x, labels, jnp.float32(1e-2), 3, 500)
  assert float(grad_norm) < mt.PROBE_TOLERANCE and int(steps) < 500

  # At the optimum the gradient of the same objective vanishes; a perturbed point is worse.
  def objective(p):
    logits = x @ p["kernel"] + p["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() + 1e-2 * jnp.sum(p["kernel"] ** 2)

  g = jax.grad(objective)(params)
  assert max(float(jnp.abs(v).max()) for v in jax.tree_util.tree_leaves(g)) < 1e-5
  worse = jax.tree_util.tree_map(lambda a: a + 0.05, params)
  assert objective(worse) > objective(params)


def test_anchored_methods_get_the_router_group_and_others_do_not():
  config = config_module.get_config()
  for method in mt.ANCHORED:
    rules = [dict(r) for r in mt.method_groups(method, config)]
    assert rules[0]["name"] == "router" and rules[0]["lr_mult"] == 100.0 and rules[0]["weight_decay"] == 0.0
  assert [r["name"] for r in mt.method_groups("cellwise_moe", config)] == ["heads"]  # LP-FT heads only
  spec = mt.adapter_spec("cellwise_moe_oracle", config.adapter, config.router, 4)
  assert spec["router_init"] == "task_aligned" and spec["router_init_margin"] == 2.0
  assert mt.adapter_spec("cellwise_moe", config.adapter, config.router, 4).get("router_init") is None


@pytest.mark.network  # reads the text tasks (cached in the data directory after one fetch)
def test_a_subset_larger_than_a_task_names_the_field_the_task_and_the_fix():
  config = config_module.get_config("cpu")
  with config.unlocked():
    config.data.train_per_task = 5000
  with pytest.raises(
    ValueError,
    match=r"config.data.train_per_task=5000 is more than task 'spam' has \(4460 "
    r"train rows\): use at most 4460, or 0 for all of them",
  ):
    mt._subsets(config.data, ("topic", "spam"))


# ------------------------------------------------------------------------------------------- LP-FT and anchors


def test_lp_ft_heads_start_from_the_probe_and_train_at_a_tenth_of_the_rate():
  config = config_module.get_config("quick")
  assert config.model.heads == "probe" and config.optim.groups == "heads_slow"
  for method in ("heads_only", "lora", "cellwise_moe_anchor", "per_task_lora"):
    rules = train.parse_groups(mt.method_groups(method, config))
    heads = [r for r in rules if r.name == "heads"]
    assert len(heads) == 1 and heads[0].lr_mult == 0.1 and heads[0].weight_decay is None, method
    paths = [p for p, _ in params_lib.leaf_paths(mt.trainable_shapes(method, config, 4))]
    head_paths = [p for p in paths if train.group_of(rules, p) == "heads"]
    assert head_paths == [f"extras/head_{t}/{leaf}" for t in range(4) for leaf in ("bias", "kernel")], method
  # The heads every entry starts from are the probe's, whatever the seed; "random" draws them per seed.
  rows = {
    "hidden": np.zeros((1, 4, mt.HIDDEN), np.float32),
    "attention_mask": np.ones((1, 4), np.int32),
    "task": np.zeros((1,), np.int32),
    "y": np.zeros((1, 3), np.int32),
  }
  corpus = mt.Corpus(("a", "b"), (2, 3), rows, rows, rows, {})
  probe = mt.random_heads(jax.random.PRNGKey(5), corpus.num_classes)
  frozen = {"backbone": {}, **probe}
  task = mt.build_task("heads_only", config, None, frozen, corpus, probe)[0]
  for seed in (0, 1):
    start = task.init(jax.random.PRNGKey(seed), frozen)["extras"]
    for a, b in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(probe)):
      np.testing.assert_array_equal(a, b)
  config.model.heads = "random"
  task = mt.build_task("heads_only", config, None, frozen, corpus, probe)[0]
  drawn = [task.init(jax.random.PRNGKey(seed), frozen)["extras"]["head_0"]["kernel"] for seed in (0, 1)]
  assert not np.array_equal(drawn[0], drawn[1]) and not np.array_equal(drawn[0], probe["head_0"]["kernel"])


@pytest.mark.slow
def test_the_probes_l2_is_chosen_on_the_held_out_rows_and_refitted_on_the_training_rows():
  from localmoe.train import probe

  r = np.random.default_rng(0)
  x = r.standard_normal((80, 4)).astype(np.float32)
  y = (x[:, 0] > 0.6).astype(np.int32)  # about 30% class 1, separable
  grid = [1e-4, 10.0]  # 10: the kernel ~0, majority class only
  # Held-out rows labelled by the same rule: the weak L2 wins. Held out rows all of class 0: the strong one.
  x_val = r.standard_normal((40, 4)).astype(np.float32)
  params, info = probe.select_l2(x, y, x_val, (x_val[:, 0] > 0.6).astype(np.int32), grid, 2, 500)
  assert info["l2"] == 1e-4 and info["val_accuracy"][0] > info["val_accuracy"][1] and info["converged"]
  _, majority = probe.select_l2(x, y, x_val, np.zeros(40, np.int32), grid, 2, 500)
  assert majority["l2"] == 10.0 and majority["val_accuracy"][1] == 1.0
  refit, _, _ = probe.fit_logistic(jnp.asarray(x), jnp.asarray(y), jnp.float32(1e-4), 2, 500)  # train rows only
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(refit)):
    np.testing.assert_array_equal(a, b)


def test_anchors_routers_start_uniform_within_1e_3_and_the_oracle_task_aligned():
  config = config_module.get_config()
  spec = mt.adapter_spec("cellwise_moe_anchor", config.adapter, config.router, 4)
  module = adapters.make(spec, d_in=16, d_out=16)
  assert (module.router_init, module.router_init_scale) == ("uniform", 1e-3)
  init = routing.router_initializer(module.router_init, module.router_init_scale, module.router_init_margin)
  kernel = np.asarray(init(jax.random.PRNGKey(0), (2, 2, 4, 4)))  # [K_y, K_x, F, E]
  assert np.abs(kernel).max() <= 1e-3 and kernel.min() < -5e-4 and kernel.max() > 5e-4  # U(-1e-3, 1e-3)
  # Task-aligned without a margin: the router's documented default lead of 4.0 on expert t mod E.
  e = config.adapter.num_experts
  aligned = adapters.make(
    dict(
      method="cellwise_moe",
      k_y=2,
      k_x=2,
      rank=1,
      num_experts=e,
      router_input="context",
      context_dim=6,
      router_init="task_aligned",
    ),
    d_in=8,
    d_out=8,
  )
  assert aligned.router_init_margin == 4.0
  kernel = np.asarray(
    routing.router_initializer("task_aligned", None, aligned.router_init_margin)(jax.random.PRNGKey(0), (2, 2, 6, e))
  )
  want = np.zeros((6, e))
  want[np.arange(6), np.arange(6) % e] = 4.0
  np.testing.assert_array_equal(kernel, np.broadcast_to(want, kernel.shape))
  oracle = mt.adapter_spec("cellwise_moe_oracle", config.adapter, config.router, 4)
  assert (oracle["router_init"], oracle["router_init_margin"]) == ("task_aligned", config.router.oracle_margin)
