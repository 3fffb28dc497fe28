r"""Sweeps: a config's `get_sweep(arg)` overrides, grouped by shape, trained vmapped, summarised.

  python launch.py --config configs/svd_simulation.py:quick --sweep --workdir runs/svd_sweep
  python -m localmoe.sweep runs/svd_sweep --sort test_r2 --top 10       # re-sort a finished sweep

A config module may define `get_sweep(arg) -> list[dict]`: each dict overrides dotted config fields,
e.g. {"optim.lr": 1e-3, "seed": 2, "methods.lora.rank": 8} (a typo fails loudly, like a command-line
override); a key "_name" names the entry. Every entry is its own run with its own sub-workdir
`<workdir>/entries/<index>_<name>/` (results.json and the experiment's other files, plus sweep_entry.json,
the entry's row of the summary).

Vectorised groups: an experiment module that defines `sweep_job(config) -> Job` says what one entry trains
(task, data, settings, seed, learning rate, weight decay). Entries whose configs agree in every field but
GROUP_FREE (seed, optim.lr, optim.weight_decay: what may differ inside one vmapped program) share a
`group_key` and are trained together by one `train.fit` call, one compiled program vmapped over the
entries, whose entry axis is sharded over the local devices (`sharding.entries()`). Entries with other
configs form other groups and compile separately. An experiment without `sweep_job` still sweeps: each
entry runs `run(config, workdir)` on its own.

Checkpoints and preemption: every group trains with a `checkpoint.Policy` under
<workdir>/checkpoints/group_<hash of its entries' configs>, so SIGTERM stops a sweep with exit 75 and the
same command resumes the group bit-identically. A finished entry belongs to its config: re-running with
another base config (or other overrides) refuses before any compute, naming the entry and the differing
fields (`--overwrite` re-runs everything, or use another workdir). A truncated sweep_entry.json is an
error naming the file.

Hosts: under `jax.distributed` every process trains a contiguous slice of every group (`sharding.owned`)
and writes its own entries' files; the rows are gathered, and process 0 alone writes sweep.json and
sweep.md (one row per entry; the best entry per group when the config has a `sweep` block with `select`
and `group_by`). A sweep re-run in the same workdir skips finished entries (--overwrite re-runs them).

Driver hooks (all optional but `run`; see experiments/README.md): `validate(config)`, `sweep_job(config)`,
`summarize_sweep(summary, config, workdir)`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from localmoe import checkpoint
from localmoe import results
from localmoe import runner
from localmoe import sharding
from localmoe import train
from localmoe import workdir as workdir_lib

ENTRY_FILE = "sweep_entry.json"
ENTRIES_DIR = "entries"
ROW_FIELDS = ("index", "name", "group", "status", "wall_time_s")  # every row has these, then metrics
GROUP_FREE = ("seed", "optim.lr", "optim.weight_decay")  # config fields that may differ inside one group


@dataclasses.dataclass(frozen=True)
class Job:
  """One sweep entry as the trainer sees it; built by an experiment's `sweep_job(config)`.

  Entries are grouped by `group_key(entry config)` (not by anything in the Job), so a Job says only what
  one entry trains and how its files are written.
  """

  task: train.Task
  data: train.Data | Callable[[], train.Data]  # per_seed=True: leading entry axis of size 1
  settings: train.Settings
  seed: int
  learning_rate: float
  weight_decay: float
  finish: Callable[[str, train.FitResult], Mapping[str, Any]]  # (entry workdir, its FitResult) -> row
  label: str = ""  # short name of the group for progress lines
  key: str = ""  # unused (groups come from group_key); kept for forks

  def get_data(self) -> train.Data:
    return self.data() if callable(self.data) else self.data


@dataclasses.dataclass
class Entry:
  """One expanded sweep entry."""

  index: int  # position in get_sweep's list
  name: str  # from "_name" or the overrides
  overrides: dict[str, Any]  # dotted config keys -> values
  config: Any  # base config with the overrides applied
  workdir: str  # <sweep workdir>/entries/<index>_<slug>


# ------------------------------------------------------------------------------------------- expanding


def load_get_sweep(config_path: str) -> Callable[[], list]:
  """`get_sweep` of the config file `path.py[:arg]`, bound to its arg (call it with no argument); a
  ValueError if there is none."""
  path, _, arg = config_path.partition(":")
  spec = importlib.util.spec_from_file_location(f"_sweep_config_{abs(hash(path))}", path)
  if spec is None or spec.loader is None:
    raise ValueError(f"--config={config_path}: cannot import {path}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(
      f"--sweep: {path} has no get_sweep(arg); add one returning a list of override dicts "
      "(e.g. [{'optim.lr': 1e-3, 'seed': 0}, ...]) or run without --sweep."
    )
  return lambda: module.get_sweep(arg or None)


def apply_overrides(config, overrides: Mapping[str, Any], where: str = "sweep entry"):
  """A deep copy of `config` with dotted-key overrides applied; unknown keys fail with the key's name."""
  config = copy.deepcopy(config)
  for dotted, value in overrides.items():
    if dotted.startswith("_"):
      continue
    *parents, leaf = dotted.split(".")
    node = config
    try:
      for part in parents:
        node = _child(node, part)
      if leaf not in node:
        raise KeyError(leaf)
      node[leaf] = value
    except (KeyError, AttributeError, TypeError) as error:
      raise ValueError(
        f"{where}: override {dotted!r}={value!r} does not fit the config ({error}); "
        "use an existing dotted field, e.g. 'optim.lr'."
      ) from None
  return config


def _child(node, part: str):
  """node[part]; inside a list (e.g. `optim.groups`) `part` is an index or the `name` of a dict item."""
  if isinstance(node, (list, tuple)):
    if part.isdigit():
      return node[int(part)]
    named = [item for item in node if isinstance(item, dict) and item.get("name") == part]
    if not named:
      raise KeyError(part)
    return named[0]
  return node[part]


def entry_name(overrides: Mapping[str, Any]) -> str:
  if "_name" in overrides:
    return str(overrides["_name"])
  return ",".join(f"{k}={v}" for k, v in overrides.items() if not k.startswith("_")) or "base"


def group_key(config) -> str:
  """Entries with equal keys train as one vmapped program: the config without GROUP_FREE fields."""
  data = workdir_lib.comparable(config)
  for dotted in GROUP_FREE:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
      node = node.get(part, {})
    node.pop(leaf, None)
  return json.dumps(data, sort_keys=True)


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text)[:100]


def expand(config, overrides_list: Sequence[Mapping[str, Any]], workdir: str) -> list[Entry]:
  """Entries of a sweep: every override dict applied to `config`, each with its sub-workdir."""
  if not overrides_list:
    raise ValueError("get_sweep returned no entries: return a non-empty list of override dicts.")
  entries = []
  for index, overrides in enumerate(overrides_list):
    if not isinstance(overrides, Mapping):
      raise ValueError(f"get_sweep entry {index} is {type(overrides).__name__}, not a dict of overrides.")
    name = entry_name(overrides)
    cfg = apply_overrides(config, overrides, where=f"sweep entry {index} ({name})")
    path = os.path.join(workdir, ENTRIES_DIR, f"{index:04d}_{_slug(name)}")
    entries.append(Entry(index, name, dict(overrides), cfg, path))
  return entries


# ------------------------------------------------------------------------------------------- running


def stack_data(datas: Sequence[train.Data]) -> train.Data:
  """Per-entry data (leading axis 1 each) stacked along the entry axis; shared data: the first one."""
  first = datas[0]
  if not first.per_seed:
    return first
  cat = lambda *xs: np.concatenate([np.asarray(x) for x in xs], axis=0)
  tree = lambda get: None if get(first) is None else jax.tree_util.tree_map(cat, *[get(d) for d in datas])
  return train.Data(
    train=tree(lambda d: dict(d.train)),
    test=tree(lambda d: dict(d.test)),
    frozen=tree(lambda d: d.frozen),
    per_seed=True,
    val=tree(lambda d: None if d.val is None else dict(d.val)),
  )


def _row(entry: Entry, group: int, status: str, wall: float, metrics: Mapping[str, Any]) -> dict[str, Any]:
  row = {"index": entry.index, "name": entry.name, "group": group, "status": status, "wall_time_s": wall}
  row.update({k: v for k, v in metrics.items() if k not in row})
  row["overrides"] = {k: v for k, v in entry.overrides.items()}
  return results.json_ready(row)


def _write_entry_row(entry: Entry, row: Mapping[str, Any]) -> None:
  results.write_json(os.path.join(entry.workdir, ENTRY_FILE), row)


def _finished_row(entry: Entry) -> dict | None:
  """The row of a finished entry (None if unfinished); refuses one made under another config."""
  path = os.path.join(entry.workdir, ENTRY_FILE)
  if not (workdir_lib.is_finished(entry.workdir) and os.path.exists(path)):
    return None
  try:
    with open(path) as f:
      row = json.load(f)
    with open(os.path.join(entry.workdir, "results.json")) as f:
      stored = json.load(f).get("config")
  except (OSError, ValueError) as error:
    raise workdir_lib.WorkdirError(
      f"sweep entry {entry.index} ({entry.name}): {path} or its results.json is "
      f"truncated or unreadable ({error}). Delete {entry.workdir} to retrain that "
      "entry, or pass --overwrite to re-run the sweep."
    ) from None
  if stored is not None:
    workdir_lib.check_same_config(
      stored, entry.config, f"the finished sweep entry {entry.index} ({entry.name}) in {entry.workdir}"
    )
  return row


def _format_s(seconds: float) -> str:
  return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def group_policy(entries: Sequence[Entry], workdir: str | None, every_epochs: int) -> checkpoint.Policy:
  """The checkpoint policy of one group: a directory named by a hash of its entries' configs."""
  configs = [{"index": e.index, "config": workdir_lib.comparable(e.config)} for e in entries]
  digest = hashlib.sha1(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:12]
  directory = None if workdir is None else os.path.join(workdir, "checkpoints", f"group_{digest}")
  return checkpoint.Policy(directory, every_epochs, config={"entries": configs})


def _train_group(
  jobs: Sequence[Job], entries: Sequence[Entry], group: int, placement, log, policy: checkpoint.Policy | None = None
) -> list[dict]:
  """One vmapped fit over the group's entries (checkpointed by `policy`), then each entry's files and row."""
  start = time.perf_counter()
  first = jobs[0]

  def fit_group():
    data = stack_data([job.get_data() for job in jobs])
    return train.fit(
      first.task,
      data,
      [job.seed for job in jobs],
      first.settings,
      name=first.label or f"group {group}",
      learning_rate=[job.learning_rate for job in jobs],
      weight_decay=[job.weight_decay for job in jobs],
      placement=placement,
      log=log,
      checkpoints=policy,
    )

  fit, reason = runner.isolated(fit_group, f"[sweep] group {group} ({first.label})", log)
  if fit is None:  # one broken group must not lose the others
    return [_row(e, group, reason, time.perf_counter() - start, {}) for e in entries]
  share = fit.wall_time_s / len(jobs)
  rows = []
  for k, (job, entry) in enumerate(zip(jobs, entries)):
    os.makedirs(entry.workdir, exist_ok=True)
    with workdir_lib.guard(entry.workdir, overwrite=True):
      metrics = dict(job.finish(entry.workdir, fit.entry(k)))
      row = _row(entry, group, fit.status[k], share, metrics)
      _write_entry_row(entry, row)
    rows.append(row)
  return rows


def _run_alone(module, entry: Entry, group: int, log, overwrite: bool = False) -> dict:
  """Fallback for experiments without sweep_job: the entry's own run(config, workdir), which checkpoints
  in the entry's workdir (resumed unless overwrite)."""
  start = time.perf_counter()

  def run_entry():
    with workdir_lib.guard(entry.workdir, overwrite=overwrite, config=entry.config):
      return module.run(entry.config, entry.workdir) or {}

  out, reason = runner.isolated(run_entry, f"[sweep] entry {entry.index} ({entry.name})", log)
  if reason is not None:
    return _row(entry, group, reason, time.perf_counter() - start, {})
  metrics = {}
  for method, summary in (out or {}).get("methods", {}).items():
    for key, value in summary.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        metrics[f"{method}/{key}"] = value
  row = _row(entry, group, "ok", time.perf_counter() - start, metrics)
  _write_entry_row(entry, row)
  return row


def check(config, overrides_list: Sequence[Mapping[str, Any]], workdir: str, module) -> list[Entry]:
  """Every entry's config error (the driver's `validate`), before any compute or file; returns the entries."""
  entries = expand(config, overrides_list, workdir)
  validate = getattr(module, "validate", None)
  if validate is not None:
    for entry in entries:
      try:
        validate(entry.config)
      except ValueError as error:
        raise ValueError(f"sweep entry {entry.index} ({entry.name}): {error}") from None
  return entries


def run(
  config,
  overrides_list: Sequence[Mapping[str, Any]],
  workdir: str,
  module,
  *,
  overwrite: bool = False,
  placement: sharding.Placement | None | str = "auto",
  log: Callable[[str], None] = print,
) -> dict:
  """Runs every entry of a sweep (this process's slice of it) and, on process 0, writes the summary.

  module: the experiment's driver module (its `validate`, `sweep_job` or `run`, optional `summarize_sweep`).
  placement: "auto" = the entry axis over all local devices (`config.sharding` may say "data" or "none").
  Finished entries are checked against their configs before anything trains (see the module docstring).
  Returns the summary (also on processes other than 0).
  """
  start = time.perf_counter()
  entries = check(config, overrides_list, workdir, module)
  if placement == "auto":
    placement = sharding.from_config(config.get("sharding", "entries"))

  make_job = getattr(module, "sweep_job", None)
  jobs = [make_job(e.config) for e in entries] if make_job else [None] * len(entries)
  groups: dict[str, list[int]] = {}
  for entry in entries:
    groups.setdefault(group_key(entry.config) if make_job else f"entry{entry.index}", []).append(entry.index)
  me, processes = sharding.process_index(), sharding.process_count()
  mine = {
    g: [members[i] for i in sharding.owned(len(members), me, processes)] for g, members in enumerate(groups.values())
  }
  total_mine = sum(len(v) for v in mine.values())
  devices = placement.size if placement is not None else 1
  log(
    f"[sweep] {len(entries)} entries in {len(groups)} compiled group(s); process {me} of {processes} runs "
    f"{total_mine} of them on {devices} local device(s) ({'entry axis sharded' if placement and placement.mode == 'entries' else placement.mode + ' parallel' if placement else 'one device'})"
  )

  finished = {}  # every finished entry checked before any compute
  for members in mine.values():
    for i in members:
      row = None if overwrite else _finished_row(entries[i])
      if row is not None:
        finished[i] = row
  every = checkpoint.every_epochs(config)
  rows, done, timed_entries, timed_s = [], 0, 0, 0.0
  for group, members in mine.items():
    todo = [i for i in members if i not in finished]
    rows += [finished[i] for i in members if i in finished]
    done += len(members) - len(todo)
    if todo:
      t0 = time.perf_counter()
      if make_job:
        group_entries = [entries[i] for i in todo]
        rows += _train_group(
          [jobs[i] for i in todo], group_entries, group, placement, log, group_policy(group_entries, workdir, every)
        )
      else:
        rows += [_run_alone(module, entries[i], group, log, overwrite) for i in todo]
      timed_entries += len(todo)
      timed_s += time.perf_counter() - t0
      done += len(todo)
    if members:
      left = total_mine - done
      eta = timed_s / max(timed_entries, 1) * left
      label = (jobs[members[0]].label if make_job else entries[members[0]].name) or f"group {group}"
      log(
        f"[sweep] {done}/{total_mine} entries done (group {group + 1}/{len(groups)}: {label}, "
        f"{len(todo)} trained, {len(members) - len(todo)} already finished); "
        f"{_format_s(time.perf_counter() - start)} elapsed, about {_format_s(eta)} left"
      )

  all_rows = sorted((r for part in sharding.allgather_json(rows) for r in part), key=lambda r: r["index"])
  summary = summarize(
    all_rows, config, wall_time_s=time.perf_counter() - start, processes=processes, devices_per_process=devices
  )
  if sharding.is_main():
    write_summary(workdir, summary, config, module, log)
  sharding.barrier("sweep_summary_written")
  return summary


# ------------------------------------------------------------------------------------------- summaries


def sweep_options(config) -> dict[str, Any]:
  """The config's optional `sweep` block: select (metric), mode (max/min), group_by, sort_by, columns."""
  block = config.get("sweep") if hasattr(config, "get") else None
  options = dict(block.to_dict() if hasattr(block, "to_dict") else (block or {}))
  for key in ("group_by", "columns"):
    value = options.get(key, "")
    options[key] = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
  options.setdefault("mode", "max")
  if options["mode"] not in ("max", "min"):
    raise ValueError(f"config.sweep.mode={options['mode']!r} must be 'max' or 'min'.")
  return options


def field_names(rows: Sequence[Mapping[str, Any]], numeric_only: bool = False) -> list[str]:
  """Fields of the rows other than the bookkeeping ones, in first-seen order (numeric ones only if asked)."""
  names = []
  for row in rows:
    for key, value in row.items():
      if key in ROW_FIELDS or key == "overrides" or key in names:
        continue
      if not numeric_only or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        names.append(key)
  return names


def metric_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """Numeric fields of the rows (metrics and numeric hyperparameters): what a sweep can be sorted by."""
  return field_names(rows, numeric_only=True)


def default_sort(metrics: Sequence[str]) -> str:
  """The first validation metric, else the first test metric, else the first numeric field."""
  for prefix in ("val_", "test_"):
    for name in metrics:
      if name.startswith(prefix):
        return name
  return metrics[0] if metrics else "index"


def sort_rows(rows: Sequence[Mapping[str, Any]], metric: str, descending: bool = True) -> list[Mapping]:
  """Rows sorted by `metric` (missing / None last)."""
  known = [r for r in rows if isinstance(r.get(metric), (int, float))]
  missing = [r for r in rows if not isinstance(r.get(metric), (int, float))]
  return sorted(known, key=lambda r: r[metric], reverse=descending) + missing


def best_per_group(
  rows: Sequence[Mapping[str, Any]], select: str, group_by: Sequence[str], mode: str = "max"
) -> list[Mapping[str, Any]]:
  """For each distinct value of the `group_by` fields, the ok row with the best `select` metric."""
  best: dict[tuple, Mapping[str, Any]] = {}
  for row in rows:
    value = row.get(select)
    if row.get("status") != "ok" or not isinstance(value, (int, float)) or not math.isfinite(value):
      continue
    key = tuple(json.dumps(row.get(g), sort_keys=True) for g in group_by)
    old = best.get(key)
    if old is None or (value > old[select] if mode == "max" else value < old[select]):
      best[key] = row
  return [best[k] for k in sorted(best, key=lambda k: [json.loads(v) if v != "null" else "" for v in k])]


def summarize(
  rows: Sequence[Mapping[str, Any]], config, *, wall_time_s: float, processes: int = 1, devices_per_process: int = 1
) -> dict[str, Any]:
  options = sweep_options(config)
  summary = {
    "experiment": config.experiment,
    "entries": list(rows),
    "metrics": metric_names(rows),
    "options": options,
    "wall_time_s": float(wall_time_s),
    "processes": processes,
    "devices_per_process": devices_per_process,
    "failed": [r["index"] for r in rows if r.get("status") != "ok"],
  }
  if options.get("select") and options.get("group_by"):
    summary["best"] = [
      r["index"] for r in best_per_group(rows, options["select"], options["group_by"], options["mode"])
    ]
  return summary


def _cell(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, (dict, list)):
    return json.dumps(value)
  return "" if value is None else str(value)


def markdown_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def markdown(
  summary: Mapping[str, Any], sort_by: str | None = None, descending: bool | None = None, top: int | None = None
) -> str:
  """sweep.md: every entry sorted by a metric, then the best entry per group if the config asked."""
  options = summary["options"]
  rows, metrics = summary["entries"], summary["metrics"]
  sort_by = sort_by or options.get("sort_by") or options.get("select") or default_sort(metrics)
  if descending is None:
    descending = options.get("mode", "max") == "max"
  columns = [
    "index",
    "name",
    *options.get("group_by", []),
    *[m for m in (options.get("columns") or field_names(rows)) if m not in options.get("group_by", [])],
    "status",
    "wall_time_s",
  ]
  ordered = sort_rows(rows, sort_by, descending)[:top]
  text = [
    f"# Sweep: {summary['experiment']}",
    "",
    f"{len(rows)} entries, {summary['processes']} process(es) x {summary['devices_per_process']} "
    f"device(s), {summary['wall_time_s']:.1f} s. Sorted by {sort_by} "
    f"({'descending' if descending else 'ascending'}); re-sort with "
    f"`python -m localmoe.sweep <workdir> --sort <metric>`. wall_time_s is the entry's share of its "
    "group's vmapped fit.",
    "",
    markdown_rows(ordered, columns),
  ]
  if summary.get("best"):
    by_index = {r["index"]: r for r in rows}
    text += [
      "",
      f"## Best entry per {' x '.join(options['group_by'])} (by {options['select']}, {options['mode']})",
      "",
      markdown_rows([by_index[i] for i in summary["best"]], columns),
    ]
  if summary.get("failed"):
    text += ["", f"Failed entries: {summary['failed']} (see their status above)."]
  return "\n".join(text) + "\n"


def write_summary(workdir: str, summary: dict, config, module=None, log: Callable[[str], None] = print) -> None:
  """sweep.json and sweep.md (plus whatever the experiment's summarize_sweep adds)."""
  extra_md = ""
  hook = getattr(module, "summarize_sweep", None)
  if hook is not None:  # the table of entries is written even if it fails
    extra, reason = runner.isolated(lambda: dict(hook(summary, config, workdir) or {}), "[sweep] summarize_sweep", log)
    if reason is not None:
      summary["summarize_error"] = reason.removeprefix("failed: ")
    else:
      extra_md = extra.pop("markdown", "")
      summary.update(extra)
  results.atomic_write_text(
    os.path.join(workdir, "sweep.md"), markdown(summary) + ("\n" + extra_md if extra_md else "")
  )
  results.write_json(os.path.join(workdir, "sweep.json"), summary)
  log(
    f"[sweep] wrote {os.path.join(workdir, 'sweep.json')} and sweep.md "
    f"({len(summary['entries'])} entries, {len(summary['failed'])} failed)"
  )


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m localmoe.sweep WORKDIR --sort METRIC [--ascending] [--top N]`: prints a sorted table."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("workdir")
  parser.add_argument("--sort", default=None, help="metric to sort by (default: the config's select metric)")
  parser.add_argument("--ascending", action="store_true")
  parser.add_argument("--top", type=int, default=None)
  args = parser.parse_args(argv)
  with open(os.path.join(args.workdir, "sweep.json")) as f:
    summary = json.load(f)
  if args.sort and args.sort not in summary["metrics"] and args.sort not in ROW_FIELDS:
    raise SystemExit(f"--sort={args.sort!r} is not a metric of this sweep; valid: {summary['metrics']}.")
  print(markdown(summary, args.sort, not args.ascending if args.sort else None, args.top))


if __name__ == "__main__":
  main()
