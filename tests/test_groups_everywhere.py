"""Parameter groups in every experiment that trains through `localmoe.train.fit`: `config.optim.groups` exists
in each config, the presets match each experiment's parameter paths, and every method's rules are resolved
against that method's own parameters by the experiment's `validate` (shapes only), so a bad rule is one
ValueError naming the method before anything is read, written or computed (launch.py: exit 2)."""

import importlib
import os

import jax
import pytest

from localmoe import sweep, train
from localmoe.train import settings as settings_lib
from tests.test_launch import launch

# (experiment, its routed methods (poly_router applies), methods with a LoRA-style B (lora_plus applies),
#  a method without a router)
EXPERIMENTS = [
  ("svd_simulation", "blockwise_moe,cellwise_moe", "lora,melora,localized_lora,blockwise_moe,cellwise_moe", "lora"),
  ("california_housing", "blockwise_moe,cellwise_moe", "lora,melora,localized_lora,cellwise_moe", "melora"),
  ("mnist_degradation", "blockwise_moe,cellwise_moe", "lora,melora,localized_lora,cellwise_moe", "localized_lora"),
  ("mnist_adaptation", "blockwise_moe,cellwise_moe", "lora,melora,localized_lora,cellwise_moe", "full_finetune"),
  ("nonconvex_regression", "blockwise_moe,cellwise_moe", "lora,localized_lora,cellwise_moe", "lora"),
  ("multitask_text", "cellwise_moe,blockwise_moe", "lora,localized_lora,cellwise_moe,per_task_lora", "lora"),
]
IDS = [e[0] for e in EXPERIMENTS]


def config_of(experiment, methods, groups):
  config = importlib.import_module(f"configs.{experiment}").get_config("quick")
  config.method_names = methods
  config.optim.groups = groups
  return config, importlib.import_module(f"experiments.{experiment}")


# Bad `config.optim.groups` input, one row each of docs/bad_inputs.md (tools/bad_input_table.py prints what each
# gives now): (case, experiment, method_names, groups, the start of the one-line error).
BAD_GROUPS = [
  (
    "a rule that freezes every parameter",
    "svd_simulation",
    "lora",
    "[{'name': 'all', 'pattern': '.*', 'freeze': True}]",
    "config.optim.groups (method lora): every trainable parameter is in a frozen group ('all')",
  ),
  (
    "a preset that matches nothing in one of the methods (`poly_router` with LoRA)",
    "svd_simulation",
    "cellwise_moe,lora",
    "poly_router",
    "config.optim.groups (method lora): rule 'router' (pattern '(?:.*/)?router/.*') matches no trainable parameter",
  ),
  (
    "a preset for heads in an experiment without heads",
    "mnist_degradation",
    "cellwise_moe",
    "heads_slow",
    "config.optim.groups (method cellwise_moe): rule 'heads' (pattern 'extras/.*') matches no trainable parameter",
  ),
  (
    "a rule every match of which an earlier rule takes",
    "california_housing",
    "cellwise_moe",
    "[{'name': 'all', 'pattern': '.*'}, {'name': 'router', 'pattern': 'router/.*'}]",
    "config.optim.groups (method cellwise_moe): rule 'router' (pattern 'router/.*') matches only parameters that "
    "the earlier rule 'all' (pattern '.*') already takes",
  ),
  (
    "`poly_router` with an `_anchor` method (which adds its own `router` rule)",
    "multitask_text",
    "cellwise_moe_anchor",
    "poly_router",
    "config.optim.groups='poly_router' has a rule named 'router', as has method cellwise_moe_anchor",
  ),
  (
    "a rule the `_anchor` method's own router rule shadows",
    "multitask_text",
    "blockwise_moe_anchor",
    "[{'name': 'mine', 'pattern': '.*/router/kernel'}]",
    "config.optim.groups (method blockwise_moe_anchor): rule "
    "'mine' (pattern '.*/router/kernel') matches only parameters that the earlier rule 'router' (pattern "
    "'adapter/.*/router/.*', which method blockwise_moe_anchor adds before the config's rules",
  ),
  (
    "`lr_mult` NaN on the command line (`float('nan')` in the literal)",
    "svd_simulation",
    "lora",
    "[{'pattern': '.*', 'lr_mult': float('nan')}]",
    "config.optim.groups=\"[{'pattern': '.*', 'lr_mult': "
    "float('nan')}]\" is not a Python literal list of rule dicts: only numbers, strings",
  ),
  (
    "`lr_mult=nan` in a config file",
    "nonconvex_regression",
    "lora",
    [dict(pattern=".*", lr_mult=float("nan"))],
    "config.optim.groups[0].lr_mult=nan must be a finite number > 0",
  ),
  (
    "an unknown preset",
    "mnist_adaptation",
    "lora",
    "poly_routers",
    "config.optim.groups='poly_routers': unknown preset(s) ['poly_routers']",
  ),
]


def bad_groups_message(experiment, methods, groups) -> str:
  """The one-line error of the experiment's validate for these groups ("" if it accepts them)."""
  config, module = config_of(experiment, methods, "")
  config.optim.groups = groups
  try:
    module.validate(config)
  except ValueError as error:
    return str(error)
  return ""


@pytest.mark.parametrize("case, experiment, methods, groups, start", BAD_GROUPS, ids=[c[0] for c in BAD_GROUPS])
def test_bad_groups_are_one_line_naming_the_field(case, experiment, methods, groups, start):
  message = bad_groups_message(experiment, methods, groups)
  assert message.startswith(start) and "\n" not in message and "<ast." not in message, (case, message)


def test_every_config_that_trains_has_the_field_and_it_takes_strings_lists_and_dicts():
  for experiment, *_ in EXPERIMENTS:
    config = importlib.import_module(f"configs.{experiment}").get_config("quick")
    config.optim.groups = [dict(pattern=".*")]  # a locked config takes each form
    config.optim.groups = dict(router=dict(pattern="(?:.*/)?router/.*", lr_mult=10.0))
    config.optim.groups = "poly_router"
  assert "optim" not in importlib.import_module("configs.mnist_approximation").get_config("quick")  # no training
  swept = sweep.apply_overrides(config, {"optim.groups": dict(router=dict(pattern="r", lr_mult=1.0))})
  swept = sweep.apply_overrides(swept, {"optim.groups.router.lr_mult": 100.0})
  assert train.parse_groups(swept.optim.groups)[0].lr_mult == 100.0


# nonconvex_regression's validate traces its injected MLP per method (about 2 s): slow.
SLOW_IF_INJECTED = [
  pytest.param(*e, marks=pytest.mark.slow) if e[0] == "nonconvex_regression" else e for e in EXPERIMENTS
]


@pytest.mark.parametrize("experiment, routed, with_b, plain", SLOW_IF_INJECTED, ids=IDS)
def test_presets_match_every_experiments_paths(experiment, routed, with_b, plain):
  del plain
  for methods, groups in ((with_b, "lora_plus"), (routed, "poly_router+lora_plus")):
    config, module = config_of(experiment, methods, groups)
    module.validate(config)  # every rule matches in every method


@pytest.mark.parametrize("experiment, routed, with_b, plain", SLOW_IF_INJECTED, ids=IDS)
def test_a_rule_one_method_cannot_match_names_that_method(experiment, routed, with_b, plain):
  del with_b
  config, module = config_of(experiment, f"{routed},{plain}", "poly_router")
  with pytest.raises(
    ValueError,
    match=rf"^config.optim.groups \(method {plain}\): rule 'router' \(pattern "
    r"'\(\?:\.\*/\)\?router/\.\*'\) matches no trainable parameter \(.*e\.g\. '",
  ):
    module.validate(config)


@pytest.mark.parametrize("experiment, routed, with_b, plain", SLOW_IF_INJECTED, ids=IDS)
def test_freezing_every_parameter_is_refused(experiment, routed, with_b, plain):
  del routed, with_b
  config, module = config_of(experiment, plain, "[{'name': 'all', 'pattern': '.*', 'freeze': True}]")
  with pytest.raises(
    ValueError,
    match=r"\(method \w+\): every trainable parameter is in a frozen group \('all'\), so "
    r"nothing would train: set freeze=False",
  ):
    module.validate(config)


def test_freezing_every_parameter_is_refused_by_fit_too():
  from tests.test_train_groups import settings, tiny_data, tiny_task

  groups = train.parse_groups(
    [dict(name="adapter", pattern="adapter/.*", freeze=True), dict(name="head", pattern="extras/.*", freeze=True)]
  )
  with pytest.raises(ValueError, match=r"every trainable parameter is in a frozen group \('adapter', 'head'\)"):
    train.fit(tiny_task(), tiny_data(), [0], settings(groups=groups), log=None)
  part = train.parse_groups([dict(name="adapter", pattern="adapter/.*", freeze=True)])
  params = tiny_task().init(jax.random.PRNGKey(0), None)
  assert train.optimizer.group_sizes(settings(groups=part), params) == {"adapter": 12, "rest": 1}


def test_a_shadowed_rule_says_which_earlier_rule_takes_its_parameters():
  config, module = config_of(
    "svd_simulation", "cellwise_moe", "[{'name': 'all', 'pattern': '.*'}, {'name': 'router', 'pattern': 'router/.*'}]"
  )
  with pytest.raises(ValueError) as error:
    module.validate(config)
  message = str(error.value)
  assert message.startswith(
    "config.optim.groups (method cellwise_moe): rule 'router' (pattern 'router/.*') matches "
    "only parameters that the earlier rule 'all' (pattern '.*') already takes, e.g. "
    "'router/kernel'; the first matching rule wins: put 'router' first"
  ), message
  assert "matches no trainable parameter" not in message


def test_the_anchor_methods_own_router_rule_is_named_when_a_users_rule_clashes():
  from experiments import multitask_text as mt

  config, _ = config_of("multitask_text", "cellwise_moe_anchor", "poly_router")
  with pytest.raises(
    ValueError,
    match=r"config.optim.groups='poly_router' has a rule named 'router', as has method "
    r"cellwise_moe_anchor: the _anchor and _oracle methods add their own rule "
    r"'router' \(pattern 'adapter/\.\*/router/\.\*'",
  ):
    mt.validate(config)
  config.optim.groups = "[{'name': 'mine', 'pattern': '.*/router/kernel'}]"
  with pytest.raises(
    ValueError,
    match=r"rule 'mine' .* matches only parameters that the earlier rule 'router' "
    r"\(pattern 'adapter/\.\*/router/\.\*', which method cellwise_moe_anchor adds "
    r"before the config's rules \(config.router.anchor_lr_mult, anchor_weight_decay"
    r"\)\) already takes, .*: narrow the pattern of 'mine' or remove it\.$",
  ):
    mt.validate(config)


@pytest.mark.slow
def test_multitask_shapes_are_the_trained_trees():
  """validate's abstract trees have the paths `build_task` gives on real arrays (random weights)."""
  import numpy as np
  from experiments import multitask_text as mt
  from localmoe import params as params_lib
  from localmoe.models import bert

  config, _ = config_of("multitask_text", "cellwise_moe_anchor", "heads_slow")
  shapes = mt.trainable_shapes("cellwise_moe_anchor", config, 4)
  m = config.model  # the same layers, narrow (the paths do not depend on widths)
  narrow = bert.Bert(num_layers=m.num_layers, hidden_size=16, num_heads=2, intermediate_size=32)
  upper = bert.Upper(narrow, m.frozen_layers)
  rows = {
    "hidden": np.zeros((1, 8, 16), np.float32),
    "attention_mask": np.ones((1, 8), np.int32),
    "task": np.zeros((1,), np.int32),
    "y": np.zeros((1, 3), np.int32),
  }
  corpus = mt.Corpus(("a", "b", "c", "d"), (2, 3, 2, 4), rows, rows, rows, {})
  model = mt.MultiTaskClassifier(upper, corpus.num_classes)
  frozen = model.init(jax.random.PRNGKey(0), rows["hidden"], rows["attention_mask"], rows["task"])["params"]
  heads0 = {k: v for k, v in frozen.items() if k != "backbone"}
  task = mt.build_task("cellwise_moe_anchor", config, upper, frozen, corpus, heads0)[0]
  real = jax.eval_shape(task.init, jax.random.PRNGKey(1), frozen)  # the task built on concrete weights
  assert [p for p, _ in params_lib.leaf_paths(shapes)] == [p for p, _ in params_lib.leaf_paths(real)]


def test_a_nan_multiplier_on_the_command_line_prints_the_value_not_a_syntax_node():
  with pytest.raises(ValueError) as error:
    train.parse_groups("[{'pattern': '.*', 'lr_mult': float('nan')}]")
  assert "<ast." not in str(error.value) and "no calls or names such as float('nan')" in str(error.value)
  with pytest.raises(ValueError, match=r"groups\[0\].lr_mult=nan must be a finite number > 0"):
    train.parse_groups([dict(pattern=".*", lr_mult=float("nan"))])


def test_a_sweep_over_a_rule_of_a_preset_string_is_one_clear_line():
  with pytest.raises(
    ValueError,
    match=r"^sweep entry 3: override 'optim.groups.router.lr_mult' addresses one rule, "
    r"but config.optim.groups='poly_router' is a string .* write the rules out",
  ):
    settings_lib.check_group_overrides("poly_router", {"optim.groups.router.lr_mult": 10.0}, "sweep entry 3")
  settings_lib.check_group_overrides({"router": {"pattern": "x"}}, {"optim.groups.router.lr_mult": 10.0})
  settings_lib.check_group_overrides("poly_router", {"optim.lr": 1e-3, "optim.groups": "lora_plus"})


SWEEP_CONFIG = """
from configs import svd_simulation


def get_config(arg=None):
  config = svd_simulation.get_config("quick")
  config.optim.groups = "poly_router"
  config.method_names = "cellwise_moe"
  return config


def get_sweep(arg=None):
  return [{"optim.groups.router.lr_mult": 10.0}]
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["method", "sweep"])
def test_launch_refuses_bad_groups_with_exit_2_before_writing(case, tmp_path):
  workdir = tmp_path / "run"
  if case == "method":
    args = ["--config=configs/svd_simulation.py:quick", "--config.optim.groups=poly_router"]
    line = "error: config.optim.groups (method melora): rule 'router'"
  else:
    (tmp_path / "sweep_config.py").write_text(SWEEP_CONFIG)
    args = [f"--config={tmp_path / 'sweep_config.py'}", "--sweep"]
    line = "error: sweep entry 0: override 'optim.groups.router.lr_mult' addresses one rule"
  proc = launch(*args, f"--workdir={workdir}")
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert proc.stderr.startswith(line) and proc.stderr.count("\n") == 1, proc.stderr
  assert "Traceback" not in proc.stderr and not workdir.exists()


def test_the_bad_inputs_page_is_what_the_table_tool_prints_now(capsys, monkeypatch):
  import runpy

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.setattr("sys.argv", ["bad_input_table.py", "config"])
  runpy.run_path(os.path.join(root, "tools", "bad_input_table.py"), run_name="__main__")
  with open(os.path.join(root, "docs", "bad_inputs.md"), encoding="utf-8") as f:
    assert capsys.readouterr().out == f.read(), (
      "regenerate: python tools/bad_input_table.py config > docs/bad_inputs.md"
    )
