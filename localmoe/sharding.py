"""Placing work on devices and hosts: one Mesh/NamedSharding over the local devices, JAX's own multi-host
runtime, and each process's slice of a sweep.

Two placements of the trainer's vmapped state (`train.fit(..., placement=...)`):

  entries()        the leading ENTRY axis (seeds, learning rates, ...) is split over the local devices,
                   mesh axis "entries": with 8 devices an 8-entry group runs one entry per device; other
                   counts are padded to a multiple of the device count (repeats of the last entry, dropped
                   from the results), so entries spread evenly.
  data_parallel()  one large run: every training batch is split over the local devices (mesh axis "data",
                   `with_sharding_constraint` on the batch axis); parameters and data are replicated, and
                   XLA inserts the gradient all-reduce.

Both are plain `jax.jit` with NamedShardings (no pmap). Each entry's computation is independent of the
others, so an entry's result does not depend on how many devices or processes share the sweep (up to
float rounding).

Multi-host (`initialize`): `jax.distributed.initialize()` runs only when asked (`--multihost`) or when a
cluster's environment says there are several processes (JAX_COORDINATOR_ADDRESS, or SLURM / Open MPI with
more than one task). Every process then trains only its own slice of the sweep (`owned`) on its own local
devices, so no collective runs during training; `allgather_json` brings the per-entry summaries to every
process at the end, and only process 0 writes the sweep summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ENTRY_AXIS = "entries"
DATA_AXIS = "data"
MODES = ("entries", "data")


def local_mesh(axis_name: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over this process's devices (or `devices`), axis `axis_name`."""
  devices = list(jax.local_devices() if devices is None else devices)
  return Mesh(np.array(devices), (axis_name,))


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the trainer puts the entry axis and the batch axis. Build it with `entries()` / `data_parallel()`."""

  mesh: Mesh  # 1-D, axis ENTRY_AXIS or DATA_AXIS
  mode: str  # "entries" or "data"

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"Placement.mode={self.mode!r} must be one of {MODES}.")

  @property
  def size(self) -> int:
    return int(self.mesh.devices.size)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def entry_sharding(self) -> NamedSharding:
    """Sharding of arrays with a leading entry axis: split over devices ("entries") or replicated ("data")."""
    if self.mode == "entries":
      return NamedSharding(self.mesh, PartitionSpec(ENTRY_AXIS))
    return self.replicated()

  def padded(self, entries: int) -> int:
    """Entries after padding to a multiple of the device count ("entries" mode)."""
    if self.mode != "entries":
      return entries
    return math.ceil(entries / self.size) * self.size

  def check_batch(self, batch_size: int) -> None:
    if self.mode == "data" and batch_size % self.size:
      raise ValueError(
        f"config.optim.batch_size={batch_size} must be divisible by the {self.size} devices of "
        f"data-parallel training: use a multiple of {self.size}."
      )

  def place_data(self, data):
    """Puts a `train.Data` on the mesh: per-entry arrays split like the entries, shared ones replicated."""
    per_entry = self.entry_sharding() if data.per_seed else self.replicated()
    put = lambda tree: (
      None if tree is None else jax.device_put(dict(tree) if hasattr(tree, "keys") else tree, per_entry)
    )
    return dataclasses.replace(
      data, train=put(data.train), test=put(data.test), val=put(data.val), frozen=put(data.frozen)
    )

  def constrain_batch(self, tree: Any) -> Any:
    """Inside the (vmapped) step: splits the batch axis of every leaf over the devices ("data" mode)."""
    if self.mode != "data":
      return tree
    batch = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
    return jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, batch), tree)


def entries(devices: Sequence[jax.Device] | None = None) -> Placement:
  """The entry axis over all local devices (or `devices`)."""
  return Placement(local_mesh(ENTRY_AXIS, devices), "entries")


def data_parallel(devices: Sequence[jax.Device] | None = None) -> Placement:
  """Every training batch split over all local devices (or `devices`)."""
  return Placement(local_mesh(DATA_AXIS, devices), "data")


def from_config(mode: str | None) -> Placement | None:
  """`config.sharding` ("entries", "data", or "none"/None) -> a Placement (None: default device only)."""
  if mode in (None, "", "none"):
    return None
  if mode == "entries":
    return entries()
  if mode == "data":
    return data_parallel()
  raise ValueError(
    f"config.sharding={mode!r} is not known; valid: 'entries' (sweep entries over devices), "
    "'data' (batch axis over devices, one large run) or 'none'."
  )


# ------------------------------------------------------------------------------------------- multi-host


def cluster_requested(environ: dict | None = None) -> bool:
  """Does the environment describe a multi-process job? (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI.)"""
  env = os.environ if environ is None else environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if count in env and int(env[count]) > 1 and ("SLURM_JOB_ID" in env or count.startswith("OMPI")):
      return True
  return False


def initialize(multihost: bool = False) -> bool:
  """Starts JAX's distributed runtime when asked or when the cluster environment calls for it.

  Must run before any other JAX call. Arguments come from the environment: on a TPU pod slice, SLURM or
  Open MPI, `jax.distributed.initialize()` detects them itself; elsewhere set JAX_COORDINATOR_ADDRESS
  (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process. On CPU the collectives
  go through gloo. Returns True if the runtime was initialised.
  """
  if not (multihost or cluster_requested()):
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if os.environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  return True


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_main() -> bool:
  """Process 0 writes summaries; other processes write only the files of the entries they own."""
  return jax.process_index() == 0


def owned(num_items: int, index: int | None = None, count: int | None = None) -> list[int]:
  """Indices 0..num_items-1 owned by process `index` of `count`: contiguous, sizes differing by at most 1."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f"process index {index} is outside 0..{count - 1}.")
  return [int(i) for i in np.array_split(np.arange(num_items), count)[index]]


def allgather_json(obj: Any) -> list[Any]:
  """Every process's `obj` (JSON-serialisable), in process order, on every process (one process: [obj])."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  payload = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: payload.size] = payload
  gathered = np.asarray(multihost_utils.process_allgather(padded))  # [processes, max_bytes]
  return [json.loads(bytes(row[:size]).decode()) for row, size in zip(gathered, sizes)]


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
