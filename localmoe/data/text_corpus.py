"""A tokenised multi-task text corpus (`localmoe.data.text` tasks) and its frozen-encoder features.

    loaded = text_corpus.subsets(config.data, ("topic", "spam"))        # sizes checked before any model loads
    corpus = text_corpus.load_corpus(config.data, tokenizer, loaded)
    hidden = text_corpus.lower_features(backbone, params, corpus.train, layers=2)   # computed once
    pooled = text_corpus.pooled_features(bert.Upper(backbone, 2), upper_params, hidden)

Each split interleaves the tasks round-robin, so any prefix of it is a fixed, task-balanced subset. y [N, 3] =
label, task, counted. `config.data` fields: tasks, train_per_task, test_per_task (0: all rows), val_per_task
(training rows held out per task), max_length, seed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from localmoe import configlib
from localmoe.data import text
from localmoe.models import bert, minilm


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Tokenised splits of a multi-task stream (after `lower_features`, "hidden" replaces "input_ids")."""

  tasks: tuple[str, ...]
  num_classes: tuple[int, ...]
  train: dict  # input_ids/attention_mask [N, L], task [N], y [N, 3]
  val: dict  # held-out training rows, same keys
  test: dict
  counts: dict  # per task: train / val / test sizes


def subsets(data_config, tasks: Sequence[str]) -> dict:
  """{task: TextTask} with the config's stratified subsets; a size the task cannot give is one error naming
  the field, the task and the valid range."""
  loaded = {name: text.load(name) for name in tasks}
  out = {}
  for name, t in loaded.items():
    train_n, test_n = len(t.train_texts), len(t.test_texts)
    for field, value, available in (
      ("train_per_task", data_config.train_per_task, train_n),
      ("test_per_task", data_config.test_per_task, test_n),
    ):
      if value > available:
        raise ValueError(
          f"config.data.{field}={value} is more than task {name!r} has ({available} "
          f"{field.split('_')[0]} rows): use at most {available}, or 0 for all of them."
        )
    want_train = data_config.train_per_task or None
    want_test = data_config.test_per_task or None
    out[name] = text.subsample(t, want_train, want_test, seed=data_config.seed) if (want_train or want_test) else t
    kept = len(out[name].train_texts)
    if data_config.val_per_task >= kept:
      raise ValueError(
        f"config.data.val_per_task={data_config.val_per_task} leaves no training rows of task "
        f"{name!r} ({kept} in all): use at most {kept - 1}."
      )
  return out


def load_corpus(data_config, tokenizer, loaded: dict | None = None) -> Corpus:
  """Tokenised stream, held-out rows and test set, each interleaved round-robin over the tasks: any prefix of
  a split is a fixed, task-balanced subset (the trainer evaluates the first `config.optim.eval_train_rows`
  training rows; the router diagnostics read the first `eval.diagnostic_rows` test rows). The held-out rows
  are a random `val_per_task` of each task's training rows. y [N, 3] = label, task, counted (all 1)."""
  tasks = tuple(configlib.split_names(data_config.tasks))
  loaded = loaded if loaded is not None else subsets(data_config, tasks)
  num_classes = tuple(loaded[n].num_classes for n in tasks)
  rng = np.random.default_rng(data_config.seed)
  held = {n: set(rng.permutation(len(loaded[n].train_texts))[: data_config.val_per_task].tolist()) for n in tasks}

  def split(which: str, pick=None):
    texts, labels, task_ids = [], [], []
    per_task = []
    for n in tasks:
      source = "test" if which == "test" else "train"
      ts, ls = list(getattr(loaded[n], f"{source}_texts")), np.asarray(getattr(loaded[n], f"{source}_labels"))
      keep = [i for i in range(len(ts)) if pick is None or pick(n, i)]
      per_task.append(([ts[i] for i in keep], ls[keep]))
    orders = [rng.permutation(len(t)) for t, _ in per_task]
    # Round-robin over tasks, so every prefix of the split (an evaluated subset, a diagnostics chunk) mixes them.
    for i in range(max(len(o) for o in orders)):
      for t, ((ts, ls), order) in enumerate(zip(per_task, orders)):
        if i < len(order):
          texts.append(ts[order[i]])
          labels.append(int(ls[order[i]]))
          task_ids.append(t)
    tokens = minilm.tokenize(tokenizer, texts, max_length=data_config.max_length, padding="max_length")
    y = np.stack([np.asarray(labels, np.int32), np.asarray(task_ids, np.int32), np.ones(len(texts), np.int32)], 1)
    return {
      "input_ids": tokens["input_ids"],
      "attention_mask": tokens["attention_mask"],
      "task": np.asarray(task_ids, np.int32),
      "y": y,
    }

  train_split = split("train", lambda n, i: i not in held[n])
  val_split = split("val", lambda n, i: i in held[n])
  test_split = split("test")
  counts = {
    n: {"train": len(loaded[n].train_texts) - len(held[n]), "val": len(held[n]), "test": len(loaded[n].test_texts)}
    for n in tasks
  }
  return Corpus(tasks, num_classes, train_split, val_split, test_split, counts)


def lower_features(backbone: bert.Bert, params, split: dict, layers: int, chunk: int = 256) -> dict:
  """The split with input_ids replaced by the hidden states after the lower `layers` (computed once):
  {"hidden" [N, T, H] (the backbone's compute dtype), "attention_mask", "task", "y"}."""
  fn = functools.partial(_hidden_after, backbone, layers, params)
  ids, mask = split["input_ids"], split["attention_mask"]
  hidden = in_chunks(fn, (ids, mask), chunk)
  return {"hidden": hidden, "attention_mask": mask, "task": split["task"], "y": split["y"]}


def in_chunks(fn, arrays, chunk: int) -> np.ndarray:
  """fn over rows in chunks of `chunk` (the last one padded with repeated rows, so one shape compiles)."""
  n = len(arrays[0])
  out = []
  for s in range(0, n, chunk):
    index = np.minimum(np.arange(s, s + chunk), n - 1)
    out.append(np.asarray(fn(*(a[index] for a in arrays)))[: min(chunk, n - s)])
  return np.concatenate(out)


def pooled_features(upper: bert.Upper, params, split: dict, chunk: int = 256) -> np.ndarray:
  """Mean-pooled output of the frozen upper layers (no adapter): [N, H] float32, the probe's features."""
  fn = functools.partial(_pooled, upper, params)
  return in_chunks(fn, (split["hidden"], split["attention_mask"]), chunk)


# One program per backbone and shape, shared by the splits and by later runs in the process; the params are
# arguments, not constants folded into the program.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _hidden_after(backbone: bert.Bert, layers: int, params, ids, mask):
  return bert.hidden_after(backbone, params, ids, mask, layers)  # [B, T, H]


@functools.partial(jax.jit, static_argnums=0)
def _pooled(upper: bert.Upper, params, hidden, mask):
  return bert.mean_pool(upper.apply({"params": params}, hidden, mask), mask).astype(jnp.float32)  # [B, H]
