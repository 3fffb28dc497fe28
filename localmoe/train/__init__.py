"""The trainer shared by every experiment: AdamW from `config.optim`, compiled epochs, vmap over seeds.

All seeds (or sweep entries) of one method train together in one compiled program: the train state carries
a leading entry axis and `jax.vmap` maps the epochs over it. Each entry has its own seed and, optionally, its
own learning rate and weight decay (they live in the optimiser state), so a learning-rate sweep compiles once.

One idea per module:

  settings.py     `Settings` (the `config.optim` block, validated once) and parameter groups (`GroupRule`,
                  `PRESETS`)
  task.py         `Task` (init, predict, loss, metrics, aux outputs, diagnostics) and `Data` (splits, frozen)
  optimizer.py    `make_optimizer`: AdamW, parameter groups (optax.partition), schedule, warmup, clipping
  step.py         `loss_and_aux`, `train_step` (the step a fork changes), epoch batches, the compiled epochs
  evaluation.py   chunked evaluation of whole splits, diagnostics
  initial.py      the vmapped initial train state and the empty histories
  divergence.py   the divergence guard's reading: non-finite losses and finite blow-ups -> status per entry
  memory.py       host-memory estimates that refuse what cannot fit
  loop.py         `fit`: resume, compiled calls, history, progress, checkpoints, preemption
  state.py        `FitState` (what a checkpoint holds) and `FitResult` (the outcome of one fit)
  probe.py        a converged linear probe (logistic regression, L-BFGS, L2 chosen on held-out rows)
  timing.py       `step_seconds`: wall time of the compiled step

Everything public is re-exported here: `from localmoe import train; train.fit(task, data, seeds, settings)`.
"""

from localmoe.train.divergence import BLOWUP_FACTOR, blowups
from localmoe.train.evaluation import chunked_means, chunked_metrics, evaluate, split_inputs
from localmoe.train.initial import (empty_diagnostics, empty_history, empty_train_history, entry_hyperparams,
                                    entry_state, init_state, initial_fit_state, seed_keys)
from localmoe.train.loop import fit, log_line, pad_entries, take_entries
from localmoe.train.memory import check_memory, history_bytes, physical_memory_bytes
from localmoe.train.optimizer import (describe_groups, group_labels, group_of, group_sizes, hyperparams,
                                      lr_multiplier, make_optimizer, set_hyperparams)
from localmoe.train.settings import PRESETS, REST, SCHEDULES, GroupRule, Settings, parse_groups
from localmoe.train.state import FitResult, FitState
from localmoe.train.step import build_epoch_fn, epoch_batches, loss_and_aux, total_steps, train_step
from localmoe.train.timing import step_seconds
from localmoe.train.task import METRICS, SPLITS, Batch, Data, Params, Task

# Names the earlier single-module trainer had (tests and forks use them).
_chunked_metrics = chunked_metrics
_chunked_means = chunked_means
_evaluate = evaluate
