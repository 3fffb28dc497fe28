"""The multi-task text experiment's pieces: parity of the methods, per-task metrics, one LoRA per task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import multitask_text as config_module
from experiments import multitask_text as mt
from localmoe import adapters

# MiniLM's adapted layers per block: q, k, v, attention output (384 -> 384), FFN in (384 -> 1536), out (1536 -> 384).
SHAPES = [(384, 384)] * 4 + [(384, 1536), (1536, 384)]


def _count(method, model_config, tasks=4):
  spec = mt.adapter_spec(method, model_config, tasks)
  return sum(adapters.make(spec, d_in=i, d_out=o).num_params() for i, o in SHAPES) * 6


def test_methods_are_at_parameter_parity_with_lora():
  m = config_module.get_config().model
  lora = _count("lora", m)
  assert lora == 6 * 8 * sum(i + o for i, o in SHAPES) == 331_776
  for method in ("localized_lora", "per_task_lora"):
    assert _count(method, m) == lora
  for method in ("blockwise_moe", "cellwise_moe"):           # experts at parity, plus small context routers
    assert 0 < _count(method, m) - lora < 0.02 * lora
  # Activation routers read a d_in / K field per cell: stated in the table, not hidden.
  assert _count("cellwise_moe_activation", m) > _count("cellwise_moe", m)


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
  np.testing.assert_allclose(scores["accuracy/a"], 2 / 3)               # rows 0, 1 right; row 2 wrong
  np.testing.assert_allclose(scores["accuracy/b"], 1.0)                 # row 5 is not counted
  # Task a: class 0 F1 = 1, class 1: tp 1, pred 1, true 2 -> 2/3, class 2: tp 0, pred 1, true 0 -> 0.
  np.testing.assert_allclose(scores["macro_f1/a"], (1 + 2 / 3 + 0) / 3, rtol=1e-6)
  np.testing.assert_allclose(scores["macro_f1/b"], 1.0)
  np.testing.assert_allclose(scores["accuracy/mean"], (2 / 3 + 1) / 2)


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


@pytest.mark.parametrize("override, message", [
    (dict(method_names="lora,nope"), "unknown \\['nope'\\]"),
    (dict(model=dict(rank=6)), "config.model.rank=6 is not divisible by 8"),
    (dict(data=dict(tasks="topic,topic")), "config.data.tasks"),
    (dict(model=dict(num_layers=7)), "config.model.num_layers=7"),
    (dict(router=dict(load_balance=-1.0)), "config.router.load_balance"),
    (dict(num_seeds=100000, data=dict(max_length=128)), "more than this machine can hold"),
])
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
