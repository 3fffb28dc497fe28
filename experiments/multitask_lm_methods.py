"""Methods of the Gemma 3 multi-task experiment: the baselines, the adapter task (`build_task`) and the probe's L2
grid. The run is `experiments/multitask_lm.py`; its tables and figures `experiments/multitask_lm_report.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from localmoe import inject, multitask, nnx_functional, nnx_inject, routing, train
from localmoe.data import instructions
from localmoe.models import gemma3

BASELINES = ("zero_shot", "few_shot", "linear_probe")
METHODS = BASELINES + multitask.ADAPTER_METHODS
LABELS = {
  "zero_shot": "Frozen model, zero-shot",
  "few_shot": "Frozen model, few-shot",
  "linear_probe": "Linear probe (converged)",
  **multitask.LABELS,
}
WIDTH, HEADS_DIM, FFN = 640, 1024, 2048
TARGET_SHAPES = ((WIDTH, HEADS_DIM), (WIDTH, 256), (HEADS_DIM, WIDTH), (WIDTH, FFN), (FFN, WIDTH))


def build_task(name: str, config, upper, prompts, data_example):
  """(train.Task, nnx_functional.Functional, frozen dict, adapter parameter count) of one adapter method."""
  spec = multitask.adapter_spec(name, config.adapter, config.router, len(prompts.tasks))
  nnx_inject.inject(
    upper, spec, data_example["hidden"], data_example["mask"], target_modules=gemma3.TARGETS, key=jax.random.PRNGKey(0)
  )
  fn, frozen = nnx_functional.split(upper)
  routed, w = name in multitask.ROUTED, config.router

  def predict(p, frozen, inputs):
    logits, traces = fn.apply(p, frozen, inputs["hidden"], inputs["mask"], context=inputs["task"], capture_routing=True)
    logits = instructions.task_logits(logits, inputs["task"], prompts.class_index)
    if not routed:
      return logits
    losses = inject.router_losses(traces, load_balance=w.load_balance, z_loss=w.z_loss, mask=inputs["mask"])
    return logits, {k: losses[k] for k in ("aux_loss", "load_balance", "router_z")}

  def diagnostics(p, frozen, inputs):
    rows = {k: v[: config.eval.diagnostic_rows] for k, v in inputs.items()}
    _, traces = fn.apply(p, frozen, rows["hidden"], rows["mask"], context=rows["task"], capture_routing=True)
    diag = inject.routing_diagnostics(traces, groups=rows["task"], num_groups=len(prompts.tasks), mask=rows["mask"])
    return {
      "usage": diag["usage"],
      "entropy_nats": jnp.mean(diag["entropy"]),
      "task_separation": jnp.mean(routing.task_separation(diag["usage"])),
    }

  def loss(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[:, :1], axis=-1)[:, 0]

  task = train.Task(
    init=fn.init,
    predict=predict,
    loss=loss,
    metric_names=multitask.metric_names(prompts.tasks, prompts.num_classes),
    per_example_metrics=multitask.per_example_metrics(prompts.num_classes),
    aux_names=("load_balance", "router_z") if routed else (),
    diagnostics=diagnostics if routed else None,
  )
  return task, fn, frozen, nnx_inject.num_params(upper)
