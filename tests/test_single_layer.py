"""single_layer.run_variants (the variant loop of the single-layer drivers) and validate_methods."""

import json
import os

import numpy as np
import pytest

from configs import routing_separation as config_module
from experiments import routing_separation
from localmoe import checkpoint, single_layer, train


def small_config(methods="lora,cellwise_moe"):
  config = config_module.get_config(f"quick,methods={methods.replace(',', '+')}")
  with config.unlocked():
    config.num_seeds = 2
    config.data.num_samples, config.data.num_test = 240, 80
    config.optim.epochs, config.optim.eval_batch_size = 1, 256
    config.checkpoint_every_epochs = 1
  return config


def test_run_variants_trains_each_variant_as_run_methods_does(tmp_path):
  config = small_config()
  seeds = [0, 1]
  families = ["heterogeneous", "uniform"]
  calls = []

  def data_of(family):
    return routing_separation.make_data(config, seeds, family), len(routing_separation.FAMILIES[family]), family

  def report(family, summaries, fits, seconds, info):
    calls.append((family, sorted(summaries), sorted(fits), info))
    assert seconds > 0
    return {"tag": family.upper()}, f"section {family}"

  done = single_layer.run_variants(config, str(tmp_path), families, data_of, report, 32, 32, {})
  assert list(done.entries) == families and done.sections == ["section heterogeneous", "section uniform"]
  assert [c[0] for c in calls] == families and all(c[3] == c[0] for c in calls)
  assert all(c[1] == c[2] == ["cellwise_moe", "lora"] for c in calls)
  assert list(done.entries["uniform"]) == ["methods", "tag"] and done.entries["uniform"]["tag"] == "UNIFORM"
  assert sorted(done.histories) == [f"{f}/{m}" for f in families for m in ("cellwise_moe", "lora")]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == sorted(families)  # one directory per variant

  # The same numbers as one run_methods call on that variant's data with its own context width (4 vs 2).
  settings = train.Settings.from_config(config.optim)
  for family in families:
    contexts = len(routing_separation.FAMILIES[family])
    modules = single_layer.build_methods(config.methods, ["lora", "cellwise_moe"], 32, 32, contexts)
    direct, _ = single_layer.run_methods(
      modules,
      routing_separation.make_data(config, seeds, family),
      seeds,
      settings,
      32,
      contexts,
      {},
      checkpoints=checkpoint.policy(config, None),
    )
    for name, summary in direct.items():
      np.testing.assert_array_equal(done.entries[family]["methods"][name]["test_r2"], summary["test_r2"])
      assert done.entries[family]["methods"][name]["params"] == summary["params"]

  out = done.write(str(tmp_path / "run"), "routing_separation", config, "uniform", 1.5, "# t\n", extra={"k": 1})
  written = json.load(open(tmp_path / "run" / "results.json"))
  assert out["methods"] is done.entries["uniform"]["methods"] and out["wall_time_s"] == 1.5
  assert written["k"] == 1 and sorted(written["variants"]) == sorted(families)
  assert written["methods"]["lora"]["test_r2"] == done.entries["uniform"]["methods"]["lora"]["test_r2"]


def test_validate_methods_checks_every_method_and_its_groups_on_the_task_it_trains():
  config = small_config()
  settings = single_layer.validate_methods(config, 160, 0.0, 32, 32, 4)
  assert settings.epochs == 1
  with config.unlocked():
    config.optim.groups = "poly_router"  # LoRA has no router: its rule matches nothing
  with pytest.raises(ValueError, match=r"config.optim.groups \(method lora\): rule 'router'"):
    single_layer.validate_methods(config, 160, 0.0, 32, 32, 4)
  with config.unlocked():
    config.method_names = "cellwise_moe"
  single_layer.validate_methods(config, 160, 0.0, 32, 32, 4)
  # make_task decides which params the rules see: a task without the router refuses the same rule.
  no_router = lambda module, d_in, context_dim: train.Task(init=lambda key, frozen: {"A": np.zeros(2)}, predict=None)
  with pytest.raises(ValueError, match=r"\(method cellwise_moe\): rule 'router'"):
    single_layer.validate_methods(config, 160, 0.0, 32, 32, 4, make_task=no_router)
  with config.unlocked():
    config.methods.cellwise_moe.k_x = 5
  with pytest.raises(ValueError, match=r"config.methods.cellwise_moe: .*k_x=5"):
    single_layer.validate_methods(config, 160, 0.0, 32, 32, 4)
  with config.unlocked():
    config.num_seeds = 0
  with pytest.raises(ValueError, match=r"config.num_seeds=0 must be a positive integer"):
    single_layer.validate_methods(config, 160, 0.0, 32, 32, 4)


def test_routing_separation_refuses_groups_that_match_no_parameter():
  config = small_config("lora")
  with config.unlocked():
    config.optim.groups = "poly_router"
  with pytest.raises(ValueError, match=r"\(method lora\): rule 'router' .* matches no trainable parameter"):
    routing_separation.validate(config)
