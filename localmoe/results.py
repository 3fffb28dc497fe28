"""Writing results: results.json, results.md, history.csv, TensorBoard events, and the paper-vs-ours table.

Every file is written atomically (temp file in the same directory, then os.replace), so a crash never
leaves a half-written result that a later run or script would trust; files get the usual permissions of
the user's umask (readable by the group where the umask allows it).

A run in which a method failed is not finished: `write_run` writes results.md, history.csv and TensorBoard
events (so the failure can be read) but not results.json, and raises `RunFailed` (launch.py: exit 1).
The finished methods keep their final checkpoints, so re-running the same command retrains only the
failed ones.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from localmoe import atomic, train

# ------------------------------------------------------------------------------------------- atomic files


class RunFailed(RuntimeError):
  """At least one method of a run failed; the message names them. The run is not marked finished."""


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` via a temp file and os.replace (readers see the old or the new file)."""
  atomic.write_text(path, text)


def json_ready(value: Any) -> Any:
  """JSON-safe: numpy scalars to Python, NaN/inf to None."""
  if isinstance(value, dict):
    return {str(k): json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(v) for v in value]
  if isinstance(value, np.ndarray):
    return json_ready(value.tolist())
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return value if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_json(path: str, payload: Mapping[str, Any]) -> None:
  atomic_write_text(path, json.dumps(json_ready(payload), indent=2) + "\n")


# ------------------------------------------------------------------------------------------- summaries


def method_summary(
  params: int,
  seeds: Sequence[int],
  fit: train.FitResult,
  paper: Mapping[str, Any] | None = None,
  splits: Sequence[str] | None = None,
  extra: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
  """One method's entry of results.json, over the fit's own metric names (R^2 and accuracy as fractions).

  For every split in `splits` (None: the fit's splits but "train"; () for none) and metric in fit.metric_names:
  "<split>_<metric>" per seed, and its "_mean" / "_std" over the seeds whose status is "ok" (diverged
  seeds are None and left out). extra: more per-seed values summarised the same way ({"train_loss": ...}).
  """
  ok = np.array([s == "ok" for s in fit.status])
  values = {
    f"{split}_{metric}": fit.final(split, metric)
    for split in (splits if splits is not None else [s for s in fit.splits if s != "train"])
    for metric in fit.metric_names
  }
  values.update(extra or {})
  out: dict[str, Any] = {"params": int(params), "seeds": [int(s) for s in seeds]}
  values = {key: np.asarray(v, np.float64) for key, v in values.items()}
  for key, v in values.items():  # per-seed lists first, then the summaries (key order)
    out[key] = [float(a) if good else None for a, good in zip(v, ok)]
  for key, v in values.items():
    out[f"{key}_mean"] = float(np.mean(v[ok])) if ok.any() else None
    out[f"{key}_std"] = float(np.std(v[ok])) if ok.any() else None
  failed = [f"seed {seed}: {status}" for seed, status in zip(seeds, fit.status) if status != "ok"]
  out.update(
    {"paper": dict(paper or {}), "status": "ok" if not failed else "; ".join(failed), "wall_time_s": fit.wall_time_s}
  )
  return out


def failed_summary(
  params: int, seeds: Sequence[int], reason: str, paper: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """Entry for a method that could not run at all (the table shows the reason)."""
  return {
    "params": int(params),
    "seeds": [int(s) for s in seeds],
    "test_r2": [],
    "test_mse": [],
    "test_r2_mean": None,
    "test_r2_std": None,
    "test_mse_mean": None,
    "test_mse_std": None,
    "paper": dict(paper or {}),
    "status": reason,
  }


# ------------------------------------------------------------------------------------------- tables


def _pm(mean, std, scale=1.0, digits=4) -> str:
  if mean is None:
    return "n/a"
  return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _fmt(value, fmt: str, scale: float = 1.0) -> str:
  if value is None:
    return "n/a"
  return format(value * scale if scale != 1.0 else value, fmt)


def markdown_table(methods: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str] | None = None) -> str:
  """Paper-vs-ours table: params, test MSE and R^2 (mean ± std over seeds, R^2 in %)."""
  labels = labels or {}
  lines = [
    "| Method | Params (ours / paper) | Test MSE (ours) | MSE (paper) | R² % (ours) | R² % (paper) | Status |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, m in methods.items():
    paper = m.get("paper") or {}
    lines.append(
      f"| {labels.get(name, name)} | {m['params']:,} / {_fmt(paper.get('params'), ',')} "
      f"| {_pm(m['test_mse_mean'], m['test_mse_std'])} | {_fmt(paper.get('mse'), '.4f')} "
      f"| {_pm(m['test_r2_mean'], m['test_r2_std'], 100.0, 2)} | {_fmt(paper.get('r2'), '.2f', 100.0)} "
      f"| {m['status']} |"
    )
  return "\n".join(lines)


def ordering_check(
  methods: Mapping[str, Mapping[str, Any]], groups: Sequence[Sequence[str]], labels: Mapping[str, str] | None = None
) -> tuple[bool, str]:
  """Does mean test R^2 fall group by group (every member of a group above every member of the next)?

  groups: e.g. [["cellwise_moe"], ["blockwise_moe"], ["lora", "localized_lora"], ["melora"]].
  Returns (holds, a sentence with the margins).
  """
  labels = labels or {}
  r2 = {name: methods[name]["test_r2_mean"] for group in groups for name in group if name in methods}
  parts, holds = [], True
  for upper, lower in zip(groups, groups[1:]):
    upper = [n for n in upper if r2.get(n) is not None]
    lower = [n for n in lower if r2.get(n) is not None]
    if not upper or not lower:
      continue
    margin = min(r2[n] for n in upper) - max(r2[n] for n in lower)
    holds &= margin > 0
    parts.append(
      f"{'/'.join(labels.get(n, n) for n in upper)} {'>' if margin > 0 else 'NOT >'} "
      f"{'/'.join(labels.get(n, n) for n in lower)} by {margin * 100:+.2f} R² points"
    )
  if not parts:
    return False, "not checked (the run lacks methods from at least two of the groups)"
  return holds, "; ".join(parts)


# ------------------------------------------------------------------------------------------- history


def history_rows(method: str, seeds: Sequence[int], fit: train.FitResult):
  """Rows (method, seed, epoch, split, *metrics in fit.metric_names order), epochs counted from 1."""
  for s, seed in enumerate(seeds):
    for epoch in range(fit.history.shape[1]):
      for k, split in enumerate(fit.splits):
        values = fit.history[s, epoch, k]
        if np.all(np.isnan(values)):
          continue
        yield (method, seed, epoch + 1, split, *(float(v) for v in values))


def write_history_csv(path: str, rows, metric_names: Sequence[str] = train.METRICS) -> None:
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(["method", "seed", "epoch", "split", *metric_names])
  for row in rows:
    writer.writerow(row)
  atomic_write_text(path, buffer.getvalue())


class ScalarWriter:
  """The live metric writer, clu `metric_writers` style: `write_scalars(step, {tag: value})` adds one
  TensorBoard scalar per tag at `step` to the event files in `logdir` (tensorboardX, no TensorFlow);
  `flush()`, `close()`. No-op when `logdir` is None or tensorboardX is missing (results files are written
  regardless). The first write removes the directory's earlier event files, so a restarted or resumed run
  leaves one stream. Non-finite values are left out (a diverged seed has no point at that step) instead of
  being written as NaN with a warning per value.

    writer = results.ScalarWriter(os.path.join(workdir, "tb", "lora"))
    writer.write_scalars(epoch, {"test/mse": 0.12, "test/r2": 0.9})
  """

  def __init__(self, logdir: str | None):
    self.logdir = logdir
    self._writer = None

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self.logdir is None:
      return
    if self._writer is None:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:  # optional
        self.logdir = None
        return
      shutil.rmtree(self.logdir, ignore_errors=True)
      self._writer = SummaryWriter(self.logdir)
    for tag, value in scalars.items():
      if math.isfinite(float(value)):
        self._writer.add_scalar(tag, float(value), int(step))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def epoch_scalars(seeds, history, splits, metric_names, epoch: int) -> dict[str, float]:
  """The TensorBoard scalars of one evaluated epoch of a trainer history [seeds, epochs, splits, metrics]:
  "<split>/<metric>" the mean over seeds, "<split>_per_seed/<metric>/seed<s>" each seed; a metric no seed
  has yet (NaN everywhere) is left out."""
  scalars = {}
  for k, split in enumerate(splits):
    for m, metric in enumerate(metric_names):
      values = history[:, epoch, k, m]
      if np.all(np.isnan(values)):
        continue
      scalars[f"{split}/{metric}"] = float(np.nanmean(values))
      for seed, value in zip(seeds, values):
        scalars[f"{split}_per_seed/{metric}/seed{seed}"] = float(value)
  return scalars


def write_tensorboard(logdir: str, method: str, seeds: Sequence[int], fit: train.FitResult) -> None:
  """TensorBoard scalars per epoch (`epoch_scalars`, steps counted from 1) under logdir/method.

  Replaces the method's previous event files (a streamed or resumed run's), so there is one per method.
  """
  writer = ScalarWriter(os.path.join(logdir, method))
  for epoch in range(fit.history.shape[1]):
    writer.write_scalars(epoch + 1, epoch_scalars(seeds, fit.history, fit.splits, fit.metric_names, epoch))
  writer.close()


class Live:
  """Streams history.csv and TensorBoard scalars while fits train (`train.fit(..., on_epoch_end=...)`).

    live = results.Live(workdir)
    fit = train.fit(..., on_epoch_end=live.hook("lora", seeds, data.splits, task.metric_names))
    results.write_run(workdir, ..., live=live)     # closes the writers; the final files replace the live ones

  Every evaluation rewrites history.csv (all methods so far, atomically) and appends the new epochs to
  tb/<name>; a resumed fit's first evaluation rewrites its TensorBoard events from the restored history,
  so no event file is duplicated. Thread-safe (single_layer.run_methods trains methods in threads).
  """

  def __init__(self, workdir: str | None):
    self.workdir = workdir
    self._lock = threading.Lock()
    self._histories: dict[str, tuple] = {}
    self._writers: dict[str, Any] = {}
    self._written: dict[str, int] = {}

  def hook(self, name: str, seeds: Sequence[int], splits: Sequence[str], metric_names: Sequence[str]):
    """An on_epoch_end callable for the fit of method `name`."""

    def on_epoch_end(fit_state) -> None:
      if self.workdir is None:
        return
      with self._lock:
        self._histories[name] = (list(seeds), fit_state.history, tuple(splits), tuple(metric_names))
        self._write_csv()
        self._write_tb(name, fit_state.epoch)

    return on_epoch_end

  def _write_csv(self) -> None:
    names = {h[3] for h in self._histories.values()}
    if len(names) != 1:
      return
    rows = []
    for name, (seeds, history, splits, metric_names) in self._histories.items():
      fit = train.FitResult(
        params=None,
        history=history,
        status=[],
        diverged_step=np.zeros(0),
        wall_time_s=0.0,
        splits=splits,
        metric_names=metric_names,
      )
      rows += list(history_rows(name, seeds, fit))
    write_history_csv(os.path.join(self.workdir, "history.csv"), rows, names.pop())

  def _write_tb(self, name: str, epoch: int) -> None:
    seeds, history, splits, metric_names = self._histories[name]
    if name not in self._writers:  # a resumed fit rewrites its events from the history
      self._writers[name] = ScalarWriter(os.path.join(self.workdir, "tb", name))
      self._written[name] = 0
    for e in range(self._written[name], epoch):
      self._writers[name].write_scalars(e + 1, epoch_scalars(seeds, history, splits, metric_names, e))
    self._writers[name].flush()
    self._written[name] = epoch

  def close(self) -> None:
    with self._lock:
      for writer in self._writers.values():
        writer.close()
      self._writers.clear()


class LiveLong:
  """history.csv in long format (method, seed, evaluation, split, metric, value) and TensorBoard scalars
  (tb/<method>), rewritten at every evaluation, for experiments whose per-epoch metrics are derived (e.g.
  accuracy and macro-F1 per task from per-task counts) rather than the trainer's raw history columns.

    live = results.LiveLong(workdir)
    live.record("lora", rows, {"val/accuracy/mean": 0.77}, step=epoch)   # from an on_epoch_end hook
    results.write_run(..., history_csv=live.csv_text(), live=live)      # closes the writers

  rows: (seed, evaluation, split, metric, value) of every evaluation so far of that method (they replace its
  earlier rows); scalars: {tag: value} of this evaluation. Thread-safe.
  """

  HEADER = "method,seed,evaluation,split,metric,value"

  def __init__(self, workdir: str | None):
    self.workdir = workdir
    self._lock = threading.Lock()
    self._rows: dict[str, list[str]] = {}
    self._writers: dict[str, Any] = {}

  def record(self, method: str, rows, scalars: Mapping[str, float], step: int) -> None:
    with self._lock:
      self._rows[method] = [
        f"{method},{seed},{evaluation},{split},{metric},{value:.6f}" for seed, evaluation, split, metric, value in rows
      ]
      if self.workdir is None:
        return
      atomic_write_text(os.path.join(self.workdir, "history.csv"), self.csv_text())
      self._write_tb(method, scalars, step)

  def csv_text(self) -> str:
    return "\n".join([self.HEADER] + [row for rows in self._rows.values() for row in rows]) + "\n"

  def _write_tb(self, method: str, scalars: Mapping[str, float], step: int) -> None:
    if method not in self._writers:
      self._writers[method] = ScalarWriter(os.path.join(self.workdir, "tb", method))
    self._writers[method].write_scalars(step, scalars)
    self._writers[method].flush()

  def close(self) -> None:
    with self._lock:
      for writer in self._writers.values():
        writer.close()
      self._writers.clear()


# ------------------------------------------------------------------------------------------- one run


def write_run(
  workdir: str,
  experiment: str,
  config: Any,
  methods: Mapping[str, Any],
  histories: Mapping[str, tuple[Sequence[int], train.FitResult]],
  wall_time_s: float,
  markdown: str,
  extra: Mapping[str, Any] | None = None,
  live: "Live | LiveLong | None" = None,
  history_csv: str | None = None,
) -> None:
  """Writes results.json, results.md, history.csv and TensorBoard events (tb/) of one run.

  histories: {name: (seeds, FitResult)}; a name may carry a variant prefix ("decaying/lora"). live: the
  run's `Live` streamer, closed here (the final files replace what it streamed). history_csv: an
  experiment's own history.csv text, written instead of the rows of `histories` (whose TensorBoard events
  are then the experiment's too: none is written here).
  """
  if live is not None:
    live.close()
  config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  payload = {"experiment": experiment, "config": config_dict, "wall_time_s": float(wall_time_s), "methods": methods}
  payload.update(extra or {})
  metric_names = {tuple(fit.metric_names) for _, fit in histories.values()} or {train.METRICS}
  if len(metric_names) > 1:
    raise ValueError(f"history.csv needs one set of metrics for every method; got {sorted(metric_names)}.")
  if history_csv is not None:
    atomic_write_text(os.path.join(workdir, "history.csv"), history_csv)
  else:
    rows = [row for name, (seeds, fit) in histories.items() for row in history_rows(name, seeds, fit)]
    write_history_csv(os.path.join(workdir, "history.csv"), rows, metric_names.pop())
  for name, (seeds, fit) in histories.items():
    write_tensorboard(os.path.join(workdir, "tb"), name, seeds, fit)
  atomic_write_text(os.path.join(workdir, "results.md"), markdown)
  failed = failed_methods(methods)
  if failed:
    raise RunFailed(
      f"{len(failed)} of {len(methods)} method(s) failed ({'; '.join(failed)}); see "
      f"{os.path.join(workdir, 'results.md')}. The run is not marked finished: fix the cause and "
      "re-run the same command (finished methods resume from their final checkpoints)."
    )
  write_json(os.path.join(workdir, "results.json"), payload)  # last: its presence marks a finished run


def failed_methods(methods: Mapping[str, Any]) -> list[str]:
  """'name: reason' for every method whose status says it failed (diverged seeds are results, not failures)."""
  return [
    f"{name}: {m.get('status')}"
    for name, m in methods.items()
    if isinstance(m, Mapping) and str(m.get("status", "")).startswith("failed")
  ]
