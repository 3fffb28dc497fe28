"""The methods of the multi-task text experiment: adapter specs at parity, parameter groups, one train.Task each.

    task, adapted, count, heads = multitask_text_methods.build_task("cellwise_moe_anchor", config, upper, frozen,
                                                                    corpus, heads0)

Specs come from `localmoe.multitask.adapter_spec` (parity with LoRA of rank r); `heads_only` and `linear_probe`
carry no adapter. The `_anchor` and `_oracle` methods put their own router group before the config's rules.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from localmoe import inject, multitask, routing, train
from localmoe.data.text_corpus import Corpus
from localmoe.models import bert
from localmoe.models.heads import BACKBONE_PREFIX, HIDDEN, MultiTaskClassifier, random_heads
from localmoe.multitask import (
  ANCHORED,
  ROUTED,
  method_groups,
  metric_names,
  per_example_metrics,
)
from localmoe.train import optimizer

METHODS = (
  "heads_only",
  "linear_probe",
  "lora",
  "localized_lora",
  "blockwise_moe",
  "cellwise_moe",
  "blockwise_moe_anchor",
  "cellwise_moe_anchor",
  "cellwise_moe_oracle",
  "cellwise_moe_activation",
  "per_task_lora",
)
LABELS = {"heads_only": "Frozen backbone, heads only", "linear_probe": "Linear probe (converged)", **multitask.LABELS}


def adapter_spec(method: str, adapter_config, router_config, num_tasks: int) -> dict | None:
  """The adapter spec of `method` at parity with LoRA of rank r (None: no adapter)."""
  if method in ("heads_only", "linear_probe"):
    return None
  if method not in METHODS:
    raise ValueError(f"config.method_names: {method!r} is not a method of this experiment; valid: {METHODS}.")
  return multitask.adapter_spec(method, adapter_config, router_config, num_tasks)


def parity_rank(method: str, adapter_config, num_tasks: int) -> int:
  """The rank per expert / cell / task of `method` (rounded down where the rank does not split)."""
  k, e = adapter_config.grid, adapter_config.num_experts
  return adapter_config.rank // {"lora": 1, "localized_lora": k, "per_task_lora": num_tasks}.get(method, k * e)


_SHAPES: dict[str, dict] = {}  # trainable_shapes' results by what they depend on


def trainable_shapes(method: str, config, num_tasks: int) -> dict | None:
  """The shapes (`jax.ShapeDtypeStruct`) of one entry's trainable params of `method` ({"adapter": ...,
  "extras": {"head_<t>": ...}}), built as `build_task` builds them but on abstract backbone weights: no
  weight is read and nothing is computed. None for the linear probe (not trained by the trainer). Task heads
  are given two classes each: the paths, which is what parameter groups match, do not depend on it."""
  if method == "linear_probe":
    return None
  m, spec = config.model, adapter_spec(method, config.adapter, config.router, num_tasks)
  key = json.dumps([method, spec, m.num_layers, m.frozen_layers, num_tasks, m.heads], sort_keys=True)
  if key not in _SHAPES:
    upper = bert.Upper(bert.Bert(num_layers=m.num_layers), m.frozen_layers)
    classes = (2,) * num_tasks
    rows = {
      "hidden": np.zeros((1, 8, HIDDEN), np.float32),
      "attention_mask": np.ones((1, 8), np.int32),
      "task": np.zeros((1,), np.int32),
      "y": np.zeros((1, 3), np.int32),
    }
    corpus = Corpus(tuple(f"task{t}" for t in range(num_tasks)), classes, rows, rows, rows, {})
    model = MultiTaskClassifier(upper, classes)
    frozen = jax.eval_shape(
      lambda k: model.init(k, rows["hidden"], rows["attention_mask"], rows["task"]), jax.random.PRNGKey(0)
    )["params"]

    def init(frozen):
      heads0 = {name: value for name, value in frozen.items() if name != "backbone"}
      task = build_task(method, config, upper, frozen, corpus, heads0)[0]
      return task.init(jax.random.PRNGKey(0), frozen)

    _SHAPES[key] = jax.eval_shape(init, frozen)
  return _SHAPES[key]


def check_method_groups(config, names: Sequence[str], settings: train.Settings, num_tasks: int) -> None:
  """Every method's parameter groups resolved against its own trainable params (`optimizer.group_sizes`:
  a rule matching nothing, a shadowed rule, everything frozen), before any data is read: one ValueError."""
  for name in names:
    rules = train.parse_groups(method_groups(name, config))
    shapes = trainable_shapes(name, config, num_tasks) if rules else None
    if shapes is None:
      continue
    added = (
      {"router": f"method {name} adds before the config's rules (config.router.anchor_lr_mult, anchor_weight_decay)"}
      if name in ANCHORED
      else None
    )
    optimizer.group_sizes(dataclasses.replace(settings, groups=rules), shapes, where=f" (method {name})", added=added)


def build_task(method: str, config, upper: bert.Upper, frozen_example, corpus: Corpus, heads0: dict):
  """(train.Task, adapted model or None, adapter param count, head param count) of one method.

  heads0: the heads every entry starts from (the probe's under LP-FT; else drawn per seed)."""
  tasks, num_classes = corpus.tasks, corpus.num_classes
  model = MultiTaskClassifier(upper, num_classes)
  example = {k: jnp.asarray(v[:1]) for k, v in corpus.train.items() if k != "y"}
  args = (example["hidden"], example["attention_mask"], example["task"])
  spec = adapter_spec(method, config.adapter, config.router, len(tasks))
  heads = sum(np.size(l) for l in jax.tree_util.tree_leaves(random_heads(jax.random.PRNGKey(0), num_classes)))
  weights = config.router
  routed = method in ROUTED
  diag_rows = config.eval.diagnostic_rows

  def start_heads(key):
    return heads0 if config.model.heads == "probe" else random_heads(jax.random.fold_in(key, 7), num_classes)

  if spec is None:

    def init(key, frozen):
      return {"extras": start_heads(key)}

    def predict(p, frozen, inputs):  # only the heads are differentiated (p)
      return model.apply(
        {"params": {**frozen, **p["extras"]}}, inputs["hidden"], inputs["attention_mask"], inputs["task"]
      )

    adapted, count, aux_names, diagnostics = None, 0, (), None
  else:
    adapted, _ = inject.inject(
      model,
      frozen_example,
      spec,
      *args,
      target_modules=BACKBONE_PREFIX + bert.ADAPTER_TARGETS,
      key=jax.random.PRNGKey(0),
      trainable_extras=r"head_\d+",
    )
    count = adapted.num_params()

    def init(key, frozen):
      trainable = adapted.init_adapter(key, frozen)
      trainable["extras"] = start_heads(key)
      return trainable

    def predict(p, frozen, inputs):
      logits, traces = adapted.apply(
        frozen,
        p,
        inputs["hidden"],
        inputs["attention_mask"],
        inputs["task"],
        context=inputs["task"],
        capture_routing=True,
      )
      if not routed:
        return logits
      losses = inject.router_losses(
        traces, load_balance=weights.load_balance, z_loss=weights.z_loss, mask=inputs["attention_mask"]
      )
      return logits, {
        "aux_loss": losses["aux_loss"],
        "load_balance": losses["load_balance"],
        "router_z": losses["router_z"],
      }

    aux_names = ("load_balance", "router_z") if routed else ()
    diagnostics = functools.partial(router_diagnostics, adapted, len(tasks), diag_rows) if routed else None

  def loss(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[:, :1], axis=-1)[:, 0]  # [B]

  task = train.Task(
    init=init,
    predict=predict,
    loss=loss,
    metric_names=metric_names(tasks, num_classes),
    per_example_metrics=per_example_metrics(num_classes),
    aux_names=aux_names,
    diagnostics=diagnostics,
  )
  return task, adapted, count, heads


def router_diagnostics(adapted, num_tasks: int, rows: int, params, frozen, inputs) -> dict:
  """Routing on the first `rows` test rows (round-robin over tasks): "usage" [layers, tasks, routers, E],
  "entropy_nats" [] (mean per-token gate entropy, averaged over layers, tasks and routers; log E = uniform)
  and "task_separation" [] (`routing.task_separation`, averaged over layers)."""
  rows = {k: v[:rows] for k, v in inputs.items()}
  _, traces = adapted.apply(
    frozen, params, rows["hidden"], rows["attention_mask"], rows["task"], context=rows["task"], capture_routing=True
  )
  diag = inject.routing_diagnostics(traces, groups=rows["task"], num_groups=num_tasks, mask=rows["attention_mask"])
  return {
    "usage": diag["usage"],
    "entropy_nats": jnp.mean(diag["entropy"]),
    "task_separation": jnp.mean(routing.task_separation(diag["usage"])),
  }
