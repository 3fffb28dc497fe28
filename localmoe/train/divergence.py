"""The divergence guard's reading: which entries diverged, and the status line of each.

A non-finite loss freezes that entry inside `train_step` (its parameters stop changing) and records the
global step. A finite blow-up is flagged here: an entry whose epoch-mean training objective rose above
BLOWUP_FACTOR times its initial value (the objective of its very first step) at any epoch and ends above that
initial value, or whose final metrics are not finite, reads "diverged at epoch E (training loss grew from a
to b, ...)", E the first epoch past the factor.
"""

from __future__ import annotations

import numpy as np

from localmoe.train.state import FitState

BLOWUP_FACTOR = 100.0  # an epoch-mean training objective above this multiple of the initial one: "diverged"


def blowups(fit_state: FitState, entries: int, alive: np.ndarray) -> dict[int, str]:
  """Entries whose finite training objective blew up, {entry: status} (see the module docstring)."""
  out = {}
  loss = fit_state.train_history[:entries, :, 0]  # [entries, epochs]
  initial = fit_state.initial_loss
  final_metrics = fit_state.history[:entries, -1]
  for k in range(entries):
    if not alive[k]:
      continue
    ref = float(initial[k]) if initial is not None else float("nan")
    limit = BLOWUP_FACTOR * max(abs(ref), 1e-12)
    past = np.nonzero(loss[k] > limit)[0] if np.isfinite(ref) else np.zeros((0,), int)
    if len(past) and loss[k, -1] > ref:
      out[k] = (
        f"diverged at epoch {int(past[0]) + 1} (training loss grew from {ref:.3g} to "
        f"{float(loss[k, past[0]]):.3g}, ending at {float(loss[k, -1]):.3g})"
      )
    elif not np.all(np.isfinite(final_metrics[k])):
      out[k] = f"diverged at epoch {loss.shape[1]} (non-finite final metrics)"
  return out


def statuses(fit_state: FitState, seeds, diverged_step: np.ndarray, steps: int, name: str, log) -> list[str]:
  """ "ok" or "diverged at epoch E ..." per entry; each diverged entry is logged once."""
  flagged = blowups(fit_state, len(seeds), diverged_step < 0)
  status = []
  for k, (seed, step) in enumerate(zip(seeds, diverged_step)):
    if k in flagged:
      status.append(flagged[k])
      if log:
        log(f"  [{name}] seed {seed}: {flagged[k]}; flagged as diverged, the others carried on.")
    elif step < 0:
      status.append("ok")
    else:
      epoch = int(step) // steps + 1
      status.append(f"diverged at epoch {epoch}")
      if log:
        log(
          f"  [{name}] seed {seed}: non-finite loss at epoch {epoch}, step {int(step) % steps + 1} of {steps}; "
          "this entry stopped there, the others carried on."
        )
  return status
