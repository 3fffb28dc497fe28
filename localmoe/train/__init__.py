"""The trainer shared by every experiment: AdamW from `config.optim`, compiled epochs, vmap over seeds.

All seeds (or sweep entries) of one method train together in one compiled program: the train state carries
a leading entry axis and `jax.vmap` maps the epochs over it. Each entry has its own seed and, optionally, its
own learning rate and weight decay (they live in the optimiser state), so a learning-rate sweep compiles once.

One idea per module:

  settings.py     `Settings` (the `config.optim` block, validated once) and parameter groups (`GroupRule`,
                  `PRESETS`)
  task.py         `Task` (init, predict, loss, metrics, aux outputs, diagnostics, the rng streams and global
                  step its predict takes in training) and `Data` (splits, frozen)
  optimizer.py    `make_optimizer`: AdamW, parameter groups (optax.partition), schedule, warmup, clipping
  step.py         `loss_and_aux`, `train_step` (the default step; a fork passes its own as `step_fn`), epoch
                  batches, the per-step keys of a task's rngs, the compiled epochs
  evaluation.py   chunked evaluation of whole splits, diagnostics
  initial.py      the vmapped initial train state and the empty histories
  divergence.py   the divergence guard's reading: non-finite losses and finite blow-ups -> status per entry
  memory.py       host-memory estimates that refuse what cannot fit
  loop.py         `fit`: resume, compiled calls, history, progress, checkpoints, preemption
  state.py        `FitState` (what a checkpoint holds) and `FitResult` (the outcome of one fit)
  probe.py        a converged linear probe (logistic regression, L-BFGS, L2 chosen on held-out rows)
  timing.py       `step_seconds`: wall time of the compiled step

A driver needs the names below: `from localmoe import train; train.fit(task, data, seeds, settings)`. A fork
of the step passes it explicitly, `train.fit(..., step_fn=my_step)` (and `train.step_seconds(...,
step_fn=my_step)`), which changes that fit and no other. Everything else is imported from its module
(`from localmoe.train import optimizer, evaluation`).
"""

from localmoe.train.loop import fit
from localmoe.train.memory import check_memory, history_bytes
from localmoe.train.settings import PRESETS, Settings, parse_groups
from localmoe.train.state import FitResult, FitState
from localmoe.train.step import loss_and_aux, train_step
from localmoe.train.task import METRICS, Data, Task
from localmoe.train.timing import step_seconds

__all__ = [
  "fit",
  "Task",
  "Data",
  "Settings",
  "FitResult",
  "FitState",
  "train_step",
  "loss_and_aux",
  "step_seconds",
  "parse_groups",
  "PRESETS",
  "check_memory",
  "history_bytes",
  "METRICS",
]

# Still read through the package by files outside the trainer that have not moved to module imports yet
# (tests/test_train_groups.py, tests/test_sharding.py, benchmarks/model_step.py); not part of the API.
from localmoe.train.initial import entry_state, init_state  # noqa: E402,F401
from localmoe.train.optimizer import group_of, make_optimizer, set_hyperparams  # noqa: E402,F401
from localmoe.train.settings import REST, GroupRule  # noqa: E402,F401
