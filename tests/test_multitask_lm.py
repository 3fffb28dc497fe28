"""The multi-task LM experiment (Gemma 3): config refusals before loading, the split model equals the whole
one, adapters trained as pure functions equal the injected model, prompts, parity, and :quick end to end."""

import json
import os
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import multitask_lm as config_module
from experiments import multitask_lm as mt
from localmoe import adapters, multitask, nnx_functional, nnx_inject, results, runner
from localmoe.data import instructions
from localmoe.models import gemma3, gemma3_features

# Gemma 3 270M's adapted projections: q (640 -> 1024), k, v (640 -> 256), o (1024 -> 640), gate/up, down.
SHAPES = [(640, 1024), (640, 256), (640, 256), (1024, 640), (640, 2048), (640, 2048), (2048, 640)]


def _config(arg="quick", **overrides):
  config = config_module.get_config(arg)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.mark.parametrize(
  "key, value, words",
  [
    ("data.tasks", "topic,weather", "unknown task(s) ['weather']"),
    ("data.tasks", "spam,spam", "two distinct tasks"),
    ("data.max_length", 12, "config.data.max_length=12 must lie in 15..512"),
    ("method_names", "lora,cellwise_moe_bogus", "unknown ['cellwise_moe_bogus']"),
    ("model.frozen_layers", 2, "config.model.frozen_layers=2 must lie in 0..1"),
    ("model.num_layers", 19, "config.model.num_layers=19 must lie in 1..18"),
    ("adapter.rank", 6, "config.adapter.rank=6 does not split at parity for cellwise_moe_anchor"),
    ("eval.generate_rows", -1, "config.eval.generate_rows=-1 must be an integer >= 0"),
    ("eval.diagnostic_rows", 64, "config.eval.diagnostic_rows=64 must be <= config.optim.eval_batch_size=32"),
    ("data.val_per_task", 24, "config.data.val_per_task=24 must be below config.data.train_per_task=24"),
    ("optim.steps_per_epoch", 9, "config.optim.steps_per_epoch=9 is more than one pass"),
    ("optim.groups", "[{'name': 'router', 'pattern': 'adapter/.*'}]", "has a rule named 'router'"),
  ],
)
def test_validate_refuses_bad_overrides_in_one_line(key, value, words, monkeypatch):
  def no_loading(*args, **kwargs):
    raise AssertionError("validate must refuse before anything is loaded")

  monkeypatch.setattr(gemma3, "load", no_loading)
  monkeypatch.setattr(instructions.text, "load", no_loading)
  with pytest.raises(ValueError) as error:
    mt.run(_config(**{key: value}), "/nonexistent/never-written")
  message = str(error.value)
  assert words in message and "\n" not in message


@pytest.mark.slow
def test_the_shipped_variants_validate():
  for arg in ("quick", "cpu", "cpu_small", None):
    mt.validate(config_module.get_config(arg))


def test_config_model_is_the_backbone_and_config_adapter_holds_the_adapter_defaults():
  for arg in ("quick", "cpu", "cpu_small", None):
    config = config_module.get_config(arg)
    assert set(config.adapter.keys()) == {"rank", "grid", "num_experts", "alpha"}
    assert set(config.model.keys()) == {"num_layers", "frozen_layers", "dtype"}


def test_methods_are_at_parameter_parity_with_lora():
  config = config_module.get_config()
  count = lambda method: sum(
    adapters.make(multitask.adapter_spec(method, config.adapter, config.router, 4), d_in=i, d_out=o).num_params()
    for i, o in SHAPES
  )
  lora = count("lora")
  assert lora == 8 * sum(i + o for i, o in SHAPES)
  assert count("localized_lora") == count("per_task_lora") == lora
  for method in ("blockwise_moe_anchor", "cellwise_moe_anchor", "cellwise_moe_oracle"):  # + small routers
    assert 0 < count(method) - lora < 0.01 * lora


def test_task_logits_pick_each_rows_classes_and_mask_the_rest():
  index = np.asarray([[0, 1, 2], [3, 4, -1]])
  logits = jnp.arange(10.0)[None].repeat(2, 0)[:, :5] + jnp.asarray([[0.0], [10.0]])
  out = np.asarray(instructions.task_logits(logits, jnp.asarray([0, 1]), index))
  np.testing.assert_allclose(out[0], [0, 1, 2])
  np.testing.assert_allclose(out[1, :2], [13, 14])
  assert out[1, 2] < -1e8


def test_answer_words_with_one_first_token_are_refused():
  class FirstLetter:  # a tokenizer whose first token is the first letter
    def encode(self, texts, add_bos=True):
      return [[ord(t.strip()[0])] for t in texts]

  task = instructions.text.TextTask(
    name="sentiment",
    class_names=("rotten", "fresh"),
    train_texts=(),
    train_labels=np.zeros(0, np.int32),
    test_texts=(),
    test_labels=np.zeros(0, np.int32),
  )
  words, ids, index = instructions.answer_tokens(FirstLetter(), ["sentiment"], {"sentiment": task})
  assert words == (("negative", "positive"),) and list(ids) == [ord("n"), ord("p")]
  np.testing.assert_array_equal(index, [[0, 1]])
  same = dict(instructions.ANSWERS, sentiment={"rotten": "bad", "fresh": "brilliant"})
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(instructions, "ANSWERS", same)
    with pytest.raises(ValueError, match="start with the same token"):
      instructions.answer_tokens(FirstLetter(), ["sentiment"], {"sentiment": task})


def _tiny_gemma():
  config = gemma3.Config(
    num_layers=3,
    width=32,
    ffn_width=64,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    vocab_size=100,
    global_every=3,
    sliding_window=3,
  )
  model = gemma3.Gemma3(config, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(1, 100, (3, 7)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[0, :3] = 0  # a left-padded row
  return model, tokens, mask


@pytest.mark.slow
def test_split_model_equals_the_whole_model_and_few_shot_cache_equals_the_concatenation():
  model, tokens, mask = _tiny_gemma()
  answers = [5, 7, 9]
  whole = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask))[:, -1][:, answers])
  for start in (1, 2):  # a local and a global upper block
    hidden = gemma3_features.lower_hidden(model, tokens, mask, start, chunk=2)
    upper = gemma3_features.Upper(model, start, answers)
    np.testing.assert_allclose(np.asarray(upper(jnp.asarray(hidden), jnp.asarray(mask))), whole, atol=1e-5)
  prefixes = np.asarray([[2, 5, 6, 7], [0, 2, 8, 9]])
  few = gemma3_features.few_shot_logits(
    model, prefixes, (prefixes > 0).astype(np.int32), tokens, mask, np.asarray([0, 1, 0]), answers, chunk=2
  )
  for row, prefix in ((1, [2, 8, 9]), (2, [2, 5, 6, 7])):
    joined = np.concatenate([prefix, tokens[row]])[None]
    np.testing.assert_allclose(few[row], np.asarray(model(jnp.asarray(joined))[0, -1, answers]), atol=1e-4)


@pytest.mark.slow
def test_functional_adapters_equal_the_injected_model_and_swap_into_the_whole_one():
  model, tokens, mask = _tiny_gemma()
  hidden = jnp.asarray(gemma3_features.lower_hidden(model, tokens, mask, 1))
  upper = gemma3_features.Upper(model, 1, [5, 7, 9])
  spec = {
    "method": "cellwise_moe",
    "k_y": 2,
    "k_x": 2,
    "rank": 1,
    "num_experts": 2,
    "router_input": "context",
    "context_dim": 3,
  }
  nnx_inject.inject(
    upper, spec, hidden[:1], jnp.asarray(mask[:1]), target_modules=gemma3.TARGETS, key=jax.random.PRNGKey(3)
  )
  fn, frozen = nnx_functional.split(upper)
  params = fn.init(jax.random.PRNGKey(3), frozen)
  for path, value in nnx_inject.trainable(upper)["adapter"].items():  # the same draw as inject's
    jax.tree_util.tree_map(np.testing.assert_array_equal, params["adapter"][path], value)
  params = jax.tree_util.tree_map(lambda a: a + 0.3, params)  # B != 0: the adapters act
  task = jnp.asarray([0, 2, 1])
  got = fn.apply(params, frozen, hidden, jnp.asarray(mask), context=task)
  trained = fn.model(params, frozen)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(nnx_inject.call(trained, hidden, jnp.asarray(mask), context=task)), atol=1e-6
  )
  plain = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask))[:, -1][:, [5, 7, 9]])
  assert np.abs(np.asarray(got) - plain).max() > 1e-3
  with gemma3_features.swapped_in(model, trained) as whole:
    np.testing.assert_allclose(
      np.asarray(whole(jnp.asarray(tokens), jnp.asarray(mask), context=task)[:, -1][:, [5, 7, 9]]),
      np.asarray(got),
      atol=1e-4,
    )
  np.testing.assert_allclose(
    np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask))[:, -1][:, [5, 7, 9]]), plain
  )  # the original blocks are back


@pytest.mark.network  # Gemma 3's weights and the text tasks (cached after one fetch)
def test_quick_config_end_to_end_with_a_failed_method_retrained_alone(tmp_path, monkeypatch, capsys):
  """:quick with every kind of method, run twice in this process: first with every method but the routed one
  forced to fail (the run raises RunFailed and writes no results.json; the routed method trains to the end),
  then again: the failed ones run, the trained one resumes from its final checkpoint. This is the
  experiment's case of tests/test_failures.py (checked here, not repeated there, as its quick run is the
  costliest; the baselines fail first so that they are computed once)."""
  from localmoe.models import gemma3_tokenizer

  tokenizer = gemma3_tokenizer.Tokenizer.from_vocab()
  for task, (prefix, suffix) in instructions.TEMPLATES.items():  # the constants validate relies on
    assert (
      len(tokenizer.encode([prefix])[0]) + len(tokenizer.encode([suffix], add_bos=False)[0])
      == instructions.TEMPLATE_TOKENS[task]
    )
  workdir = str(tmp_path / "run")
  config = config_module.get_config("quick,methods=zero_shot+few_shot+linear_probe+lora+cellwise_moe_anchor")
  failing = ["zero_shot", "few_shot", "linear_probe", "lora"]
  monkeypatch.setenv(runner.FAIL_ENV, ",".join(failing))
  with pytest.raises(results.RunFailed):
    mt.run(config, workdir)
  first = capsys.readouterr().out
  assert all(f"[{name}] FAILED: ForcedFailure" in first for name in failing), first[-3000:]
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  assert "[cellwise_moe_anchor] test accuracy" in first, first[-3000:]  # the other method trained to the end
  monkeypatch.delenv(runner.FAIL_ENV)
  out = mt.run(config, workdir)
  second = capsys.readouterr().out
  assert re.search(r"\[cellwise_moe_anchor\] resuming from the checkpoint at epoch (\d+)/\1", second), second[-3000:]
  assert "[lora] resuming" not in second, second[-3000:]  # the failed method trains from its start
  saved = json.load(open(os.path.join(workdir, "results.json")))
  methods = saved["methods"]
  assert list(methods) == ["zero_shot", "few_shot", "linear_probe", "lora", "cellwise_moe_anchor"]
  assert config_module.get_config("quick").method_names == "lora,cellwise_moe_anchor"  # CI's 2 methods
  for name, s in methods.items():
    assert s["status"] == "ok" and 0 <= s["accuracy/mean"]["mean"] <= 1, name
  assert methods["lora"]["adapter_params"] == 8 * sum(i + o for i, o in SHAPES)
  assert set(methods["lora"]["exact_match"]) == set(methods["zero_shot"]["exact_match"]) == set(instructions.TEMPLATES)
  assert methods["few_shot"]["prefix_tokens"] > methods["few_shot"]["adapter_params"] == 0
  anchor = methods["cellwise_moe_anchor"]
  assert anchor["entropy_nats_init"] == pytest.approx(np.log(4), abs=1e-2)  # U(-1e-3, 1e-3) start
  assert anchor["task_separation_end"] > anchor["task_separation_init"]  # the routers moved
  assert out["paired_differences"]["cellwise_moe_anchor"]["vs_lora"]["mean"] is not None
  for name in ("results.md", "history.csv", "accuracy.png", "routing_cellwise_moe_anchor.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
