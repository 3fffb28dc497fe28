"""The four text tasks (`localmoe.data.text`) written as instructions for a decoder LM (Gemma 3's tokenizer).

    loaded = instructions.subsets(config.data, tasks)               # stratified subsets, sizes checked
    prompts = instructions.build(loaded, tokenizer, max_length=48, val_per_task=40, seed=0)
    prompts.train["tokens"]       # [N, 48] left-padded: BOS, template prefix, the text (cut), template suffix
    prompts.answer_ids            # [A] the first token of every class's answer word, task after task

Each task has a template (prefix, text, suffix) and an answer word per class (`ANSWERS`): the model is asked to
continue the prompt with " <word>". The first tokens of a task's answer words are distinct (checked when the
prompts are built), so the first answer token names the class: classification is a choice among those tokens
(restricted-choice log-likelihood) and training needs only their logits at the last prompt position.

A prompt is BOS + prefix + the text's first tokens + suffix, at most `max_length` tokens; `TEMPLATE_TOKENS` is the
fixed part's length per task (measured with the Gemma 3 tokenizer; `build` checks it), so a config can be checked
before the tokenizer is loaded. Rows of every split are interleaved round-robin over the tasks (any prefix of a
split is task-balanced); y [N, 3] = label, task, counted (1), the layout `localmoe.multitask` metrics read.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from localmoe import configlib
from localmoe.data import text

# (prefix, suffix) around the text of each task.
TEMPLATES = {
  "topic": ("Newsgroup post: ", "\nNewsgroup:"),
  "spam": ("Text message: ", "\nSpam or normal:"),
  "question": ("Question: ", "\nAnswer type:"),
  "sentiment": ("Movie review: ", "\nSentiment:"),
}
# BOS + prefix + suffix tokens of each template (Gemma 3 tokenizer).
TEMPLATE_TOKENS = {"topic": 10, "spam": 11, "question": 8, "sentiment": 8}
MIN_TEXT_TOKENS = 4  # a prompt keeps at least this many tokens of its text
# The answer word of every class, in `text.load(task).class_names` order.
ANSWERS = {
  "topic": {
    "alt.atheism": "atheism",
    "comp.graphics": "graphics",
    "comp.os.ms-windows.misc": "windows",
    "comp.sys.ibm.pc.hardware": "pc hardware",
    "comp.sys.mac.hardware": "mac hardware",
    "comp.windows.x": "x window",
    "misc.forsale": "for sale",
    "rec.autos": "cars",
    "rec.motorcycles": "motorcycles",
    "rec.sport.baseball": "baseball",
    "rec.sport.hockey": "hockey",
    "sci.crypt": "cryptography",
    "sci.electronics": "electronics",
    "sci.med": "medicine",
    "sci.space": "space",
    "soc.religion.christian": "christianity",
    "talk.politics.guns": "guns",
    "talk.politics.mideast": "middle east",
    "talk.politics.misc": "politics",
    "talk.religion.misc": "religion",
  },
  "spam": {"ham": "normal", "spam": "spam"},
  "question": {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "person",
    "LOC": "location",
    "NUM": "number",
  },
  "sentiment": {"rotten": "negative", "fresh": "positive"},
}


def min_length(tasks: Sequence[str]) -> int:
  """The shortest max_length that keeps MIN_TEXT_TOKENS of text in every task's prompt."""
  return max(TEMPLATE_TOKENS[t] for t in tasks) + MIN_TEXT_TOKENS


@dataclasses.dataclass(frozen=True)
class Prompts:
  tasks: tuple[str, ...]
  num_classes: tuple[int, ...]
  words: tuple[tuple[str, ...], ...]  # answer words per task
  answer_ids: np.ndarray  # [A] first token of each answer, task after task
  class_index: np.ndarray  # [tasks, max classes] into answer_ids (-1: no such class)
  train: dict  # tokens/mask [N, L], task [N], y [N, 3], text_ids (lists)
  val: dict  # held-out training rows (same keys)
  test: dict
  counts: dict  # per task: train / val / test rows


def subsets(data_config, tasks: Sequence[str]) -> dict:
  """{task: TextTask} with the config's stratified subsets (train_per_task / test_per_task, 0 = all); a size a
  task cannot give is one ValueError naming the field, the task and the largest valid value."""
  out = {}
  for name in tasks:
    task = text.load(name)
    for field, value, available in (
      ("train_per_task", data_config.train_per_task, len(task.train_texts)),
      ("test_per_task", data_config.test_per_task, len(task.test_texts)),
    ):
      if value > available:
        raise ValueError(
          f"config.data.{field}={value} is more than task {name!r} has ({available} rows): use at "
          f"most {available}, or 0 for all of them."
        )
    if data_config.train_per_task or data_config.test_per_task:
      task = text.subsample(
        task, data_config.train_per_task or None, data_config.test_per_task or None, seed=data_config.seed
      )
    if data_config.val_per_task >= len(task.train_texts):
      raise ValueError(
        f"config.data.val_per_task={data_config.val_per_task} leaves no training rows of task "
        f"{name!r} ({len(task.train_texts)} in all): use at most {len(task.train_texts) - 1}."
      )
    out[name] = task
  return out


def answer_tokens(tokenizer, tasks: Sequence[str], loaded: Mapping) -> tuple[tuple, np.ndarray, np.ndarray]:
  """(words per task, answer_ids [A], class_index [tasks, max classes]); refuses answer words of one task
  whose first tokens coincide (the first token would not name the class)."""
  words, ids = [], []
  for name in tasks:
    mine = tuple(ANSWERS[name][c] for c in loaded[name].class_names)
    first = [e[0] for e in tokenizer.encode([" " + w for w in mine], add_bos=False)]
    if len(set(first)) != len(first):
      raise ValueError(
        f"ANSWERS[{name!r}]: two answer words start with the same token ({mine}); choose words "
        "whose first tokens differ."
      )
    words.append(mine)
    ids += first
  index = np.full((len(tasks), max(len(w) for w in words)), -1, np.int32)
  start = 0
  for t, mine in enumerate(words):
    index[t, : len(mine)] = np.arange(start, start + len(mine))
    start += len(mine)
  return tuple(words), np.asarray(ids, np.int32), index


def prompt_ids(tokenizer, task: str, text_ids: Sequence[int], max_length: int) -> list[int]:
  """BOS + prefix + text (cut to fit) + suffix: at most max_length token ids."""
  prefix, suffix = TEMPLATES[task]
  head = tokenizer.encode([prefix])[0]
  tail = tokenizer.encode([suffix], add_bos=False)[0]
  if len(head) + len(tail) != TEMPLATE_TOKENS[task]:
    raise ValueError(
      f"TEMPLATE_TOKENS[{task!r}]={TEMPLATE_TOKENS[task]} but the tokenizer gives {len(head) + len(tail)}: update it."
    )
  return head + list(text_ids)[: max_length - len(head) - len(tail)] + tail


def left_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  tokens, mask = np.full((len(rows), width), pad_id, np.int32), np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    if r:
      tokens[i, -len(r) :], mask[i, -len(r) :] = r, 1
  return tokens, mask


def build(loaded: Mapping, tokenizer, max_length: int, val_per_task: int, seed: int) -> Prompts:
  """Prompts of every split: `val_per_task` random training rows per task held out, rows round-robin over
  tasks, left-padded to max_length."""
  tasks = tuple(loaded)
  words, answer_ids, class_index = answer_tokens(tokenizer, tasks, loaded)
  rng = np.random.default_rng(seed)
  held = {n: set(rng.permutation(len(loaded[n].train_texts))[:val_per_task].tolist()) for n in tasks}

  def split(source: str, keep):
    per_task = []
    for name in tasks:
      texts, labels = getattr(loaded[name], f"{source}_texts"), np.asarray(getattr(loaded[name], f"{source}_labels"))
      rows = [i for i in range(len(texts)) if keep(name, i)]
      per_task.append(([texts[i] for i in rows], labels[rows]))
    orders = [rng.permutation(len(t)) for t, _ in per_task]
    picked = [
      (t, per_task[t][0][o[i]], int(per_task[t][1][o[i]]))
      for i in range(max(map(len, orders)))
      for t, o in enumerate(orders)
      if i < len(o)
    ]
    text_ids = tokenizer.encode([p[1] for p in picked], add_bos=False)
    ids = [prompt_ids(tokenizer, tasks[t], tid, max_length) for (t, _, _), tid in zip(picked, text_ids)]
    tokens, mask = left_pad(ids, max_length)
    task = np.asarray([p[0] for p in picked], np.int32)
    y = np.stack([np.asarray([p[2] for p in picked], np.int32), task, np.ones(len(picked), np.int32)], 1)
    return {"tokens": tokens, "mask": mask, "task": task, "y": y}

  train = split("train", lambda n, i: i not in held[n])
  val = split("train", lambda n, i: i in held[n])
  test = split("test", lambda n, i: True)
  counts = {
    n: {"train": len(loaded[n].train_texts) - len(held[n]), "val": len(held[n]), "test": len(loaded[n].test_texts)}
    for n in tasks
  }
  return Prompts(tasks, tuple(len(w) for w in words), words, answer_ids, class_index, train, val, test, counts)


def few_shot_prefixes(prompts: Prompts, tokenizer, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """One demonstration prefix per task: k training rows per class (random, seeded; classes interleaved), each
  its prompt + " <answer word>" + a blank line, BOS once at the start. Left-padded [tasks, S] and mask."""
  rng = np.random.default_rng(seed)
  train = prompts.train
  rows = []
  for t, words in enumerate(prompts.words):
    picks = [
      rng.permutation(np.flatnonzero((train["task"] == t) & (train["y"][:, 0] == c)))[:k] for c in range(len(words))
    ]
    ids = [tokenizer.bos_id]
    for j in range(k):
      for c, pick in enumerate(picks):
        if j < len(pick):
          row = train["tokens"][pick[j]][train["mask"][pick[j]] > 0][1:].tolist()  # without BOS
          ids += row + tokenizer.encode([" " + words[c] + "\n\n"], add_bos=False)[0]
    rows.append(ids)
  return left_pad(rows, max(map(len, rows)))


def task_logits(answer_logits, task, class_index, neg: float = -1e9):
  """[B, A] logits of every answer token -> [B, max classes] of each row's task (absent classes: neg)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  index = jnp.asarray(class_index)[task]  # [B, max classes]
  picked = jnp.take_along_axis(answer_logits, jnp.maximum(index, 0), axis=1)
  return jnp.where(index >= 0, picked, neg)


def check_tasks(value: str) -> list[str]:
  """config.data.tasks -> names; unknown or repeated names are one ValueError."""
  tasks = configlib.split_names(value)
  bad = [t for t in tasks if t not in text.TASKS]
  if bad:
    raise ValueError(f"config.data.tasks={value!r}: unknown task(s) {bad}; valid: {list(text.TASKS)}.")
  if len(set(tasks)) != len(tasks) or len(tasks) < 2:
    raise ValueError(f"config.data.tasks={value!r}: name at least two distinct tasks among {list(text.TASKS)}.")
  return tasks
