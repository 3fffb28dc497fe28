"""The one per-method runner every experiment trains its methods through.

    def train_one(method: runner.Method):                     # the experiment's own part
      task, data = build(method.name)
      fit = method.fit(task, data, seeds, settings)            # train.fit with this method's checkpoints and
      return fit, results.method_summary(params, seeds, fit)   # live files, named after the method

    summaries, fits = runner.run_methods(names, train_one, failed=lambda name, reason: {...}, live=live,
                                         checkpoints=checkpoint.policy(config, workdir))
    results.write_run(workdir, ..., summaries, ...)             # results.json only if every method finished

What it guarantees, for every experiment alike:
- Failure isolation: any exception in one method (building its task, training, summarising) is printed
  with its traceback, recorded as that method's summary (status "failed: <type>: <message>") and the other
  methods carry on. `results.write_run` then writes results.md / history.csv but not results.json and raises
  `results.RunFailed` (launch.py: exit 1), so the run is not marked finished. A config that disagrees with
  an existing checkpoint (`workdir.ConfigMismatchError`) and a stop request (`checkpoint.Preempted`) are not
  failures of one method: they end the run.
- Checkpoints: each method's fit saves to and resumes from `<checkpoints.directory>/<method>`; finished
  methods keep their final checkpoint, so re-running the same command retrains only what failed.
- Live files: history.csv and TensorBoard events are rewritten at every evaluation (`results.Live`).
- A stop request (SIGTERM/SIGINT) that arrives after a method's last evaluation ends the run before the
  next method starts (`checkpoint.Preempted`), instead of compiling and training it first.
- A test hook: the environment variable LOCALMOE_FAIL_METHODS="name,..." makes those methods raise
  `ForcedFailure` before they train (the failure, preemption and resume tests of every experiment use it).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import traceback
from typing import Any, Callable, Mapping, Sequence, TypeVar

from localmoe import checkpoint as checkpoint_lib
from localmoe import results, train
from localmoe import workdir as workdir_lib

FAIL_ENV = "LOCALMOE_FAIL_METHODS"
T = TypeVar("T")


class ForcedFailure(RuntimeError):
  """Raised for a method named in $LOCALMOE_FAIL_METHODS (a test hook)."""


def check_forced_failure(name: str) -> None:
  """Raises ForcedFailure when `name` is listed in $LOCALMOE_FAIL_METHODS."""
  names = [n.strip() for n in os.environ.get(FAIL_ENV, "").split(",") if n.strip()]
  if name in names:
    raise ForcedFailure(f"{name} was asked to fail (${FAIL_ENV}={os.environ[FAIL_ENV]})")


def isolated(fn: Callable[[], T], label: str, log: Callable[[str], None] | None = print) -> tuple[T | None, str | None]:
  """Failure isolation, the one helper for every part of a run that may fail alone (a method, a sweep group,
  a sweep entry): fn() -> (its value, None), or, when it raises, (None, "failed: <Type>: <message>") after
  logging "<label> FAILED: <Type>: <message>" and the traceback. A config that disagrees with an existing
  checkpoint (`workdir.ConfigMismatchError`) and a stop request (`checkpoint.Preempted`, a BaseException)
  are not failures of one part: they propagate and end the run."""
  try:
    return fn(), None
  except workdir_lib.ConfigMismatchError:
    raise
  except Exception as error:  # one broken part must not lose the others' results
    if log:
      log(f"{label} FAILED: {type(error).__name__}: {error}\n{traceback.format_exc()}")
    return None, f"failed: {type(error).__name__}: {error}"


@dataclasses.dataclass(frozen=True)
class Method:
  """What the runner hands one method's training function: its name, checkpoint policy, live files, log."""

  name: str
  checkpoints: checkpoint_lib.Policy | None = None
  live: results.Live | None = None
  log: Callable[[str], None] | None = print

  def fit(
    self,
    task: train.Task,
    data: train.Data,
    seeds: Sequence[int],
    settings: train.Settings,
    *,
    name: str | None = None,
    live_name: str | None = None,
    on_epoch_end: Callable[[train.FitState], None] | None = None,
    checkpoint_name: str | None = None,
    **kwargs,
  ) -> train.FitResult:
    """`train.fit` with this method's checkpoints and live history. name: the fit's name in progress lines
    (default the method's); live_name: its name in history.csv / TensorBoard (default `name`);
    checkpoint_name: a sub-directory of the method's checkpoints, for a method that trains several fits."""
    name = name or self.name
    live_name = live_name or name
    hooks = [
      hook
      for hook in (
        None if self.live is None else self.live.hook(live_name, seeds, data.splits, task.metric_names),
        on_epoch_end,
      )
      if hook is not None
    ]

    def on_epoch(fit_state):
      for hook in hooks:
        hook(fit_state)

    policy = self.checkpoints
    if policy is not None and checkpoint_name:
      policy = policy.child(checkpoint_name)
    log = kwargs.pop("log", self.log)
    return train.fit(
      task,
      data,
      seeds,
      settings,
      name=name,
      log=log,
      checkpoints=policy,
      on_epoch_end=on_epoch if hooks else None,
      **kwargs,
    )


def run_methods(
  names: Sequence[str],
  train_one: Callable[[Method], tuple[Any, Mapping[str, Any]]],
  *,
  failed: Callable[[str, str], Mapping[str, Any]],
  checkpoints: checkpoint_lib.Policy | None = None,
  live: results.Live | None = None,
  log: Callable[[str], None] = print,
  parallel: int = 1,
) -> tuple[dict, dict]:
  """Runs `train_one(Method)` -> (fit, summary) for every name; returns ({name: summary}, {name: fit}).

  failed(name, reason) -> the summary of a method that raised (reason: "failed: <type>: <message>"); it has
  no fit. `parallel` methods train at once in threads (XLA compiles and runs outside the GIL; results do
  not depend on it, each method being its own program). See the module docstring for the guarantees.
  """

  def one(name: str):
    if checkpoint_lib.stop_requested():  # a stop request between two methods: do not start the next
      raise checkpoint_lib.Preempted(f"[{name}] stopped before it started (a stop was requested)")
    method = Method(name, None if checkpoints is None else checkpoints.child(name), live, log)

    def attempt():
      check_forced_failure(name)
      return train_one(method)

    outcome, reason = isolated(attempt, f"[{name}]", log)
    if outcome is None:
      return name, None, dict(failed(name, reason))
    fit, summary = outcome
    return name, fit, dict(summary)

  if parallel > 1 and len(names) > 1:
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
      outcomes = list(pool.map(one, names))
  else:
    outcomes = [one(name) for name in names]
  summaries = {name: summary for name, _, summary in outcomes}
  fits = {name: fit for name, fit, _ in outcomes if fit is not None}
  return summaries, fits
