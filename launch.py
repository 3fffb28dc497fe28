r"""Runs an experiment from its config file.

  python launch.py --config configs/svd_simulation.py --workdir runs/svd
  python launch.py --config configs/svd_simulation.py:quick --workdir runs/q --config.optim.lr=3e-3
  python launch.py --config configs/svd_simulation.py --sweep --workdir runs/svd_sweep   # get_sweep(arg)
  python launch.py --config configs/mnist_adaptation.py --sweep --multihost --workdir /shared/runs/mnist

Intentionally kept short: parse flags, init multi-host if asked, validate the config, guard the workdir,
look the experiment up by `config.experiment`, call it (or, with --sweep, `localmoe.sweep.run` over the
config's get_sweep entries, each in <workdir>/entries/<index>_<name>/).
"""

import contextlib
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import experiments
from localmoe import checkpoint
from localmoe import compile_cache
from localmoe import configlib
from localmoe import results
from localmoe import sharding
from localmoe import sweep
from localmoe.train import settings as train_settings
from localmoe import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file, optionally with an argument: path.py[:arg].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, history, TensorBoard events.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a finished run in --workdir.")
_SWEEP = flags.DEFINE_bool(
  "sweep", False, "Run every entry of the config's get_sweep(arg); summary in <workdir>/sweep.json and sweep.md."
)
_MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "Call jax.distributed.initialize() (also done when the "
  "environment names a coordinator: JAX_COORDINATOR_ADDRESS, SLURM, Open MPI).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # quiet: library INFO logs (orbax, jax) off
    logging.set_verbosity(logging.WARNING)
  sharding.initialize(_MULTIHOST.value)  # before any other JAX call
  compile_cache.enable()  # re-runs load executables from disk
  config = _CONFIG.value
  main_process = sharding.is_main()
  try:
    experiment = experiments.get(config.experiment)
    experiments.validate(config)  # before anything is written or computed
    workdir_lib.check_path(_WORKDIR.value)
    # Process 0 guards the workdir; the others write only their own sweep entries' sub-workdirs.
    guard = (
      workdir_lib.guard(_WORKDIR.value, overwrite=_OVERWRITE.value, config=config)
      if main_process
      else contextlib.nullcontext()
    )
    if _SWEEP.value:
      overrides = sweep.load_get_sweep(config_flags.get_config_filename(flags.FLAGS["config"]))()
      groups = config.optim.get("groups") if "optim" in config else None
      for index, entry in enumerate(overrides if isinstance(overrides, (list, tuple)) else ()):
        if isinstance(entry, dict):
          train_settings.check_group_overrides(entry.get("optim.groups", groups), entry, where=f"sweep entry {index}")
      sweep.check(config, overrides, _WORKDIR.value, experiments.module(config.experiment))  # before writing
      with guard, checkpoint.preemption_guard():
        summary = sweep.run(
          config, overrides, _WORKDIR.value, experiments.module(config.experiment), overwrite=_OVERWRITE.value
        )
      failed = [r["index"] for r in summary["entries"] if str(r.get("status", "")).startswith("failed")]
      if failed:
        print(
          f"error: sweep entries {failed} failed (see {_WORKDIR.value}/sweep.md); re-run the same command "
          "to retry them (finished entries are kept).",
          file=sys.stderr,
        )
        sys.exit(1)
    elif main_process:
      with guard, checkpoint.preemption_guard():
        experiment(config, _WORKDIR.value)
    else:
      print(
        f"process {sharding.process_index()}: a run without --sweep uses process 0 only; use --sweep to "
        "spread entries over every host.",
        file=sys.stderr,
      )
  except (ValueError, workdir_lib.WorkdirError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except results.RunFailed as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  except checkpoint.Preempted as stop:
    print(
      f"\n[preemption] stopped cleanly ({stop}).\nResume with the same command:\n  "
      + shlex.join(["python", *sys.argv]),
      file=sys.stderr,
      flush=True,
    )
    sys.exit(checkpoint.EXIT_PREEMPTED)


def parse_flags(argv):
  """absl flag parsing, with one-line messages for a bad --config file and a --config override that names
  no field."""
  problem = configlib.check_config_file(argv)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    print(f"error: {error}\nPass --help to see the flags.", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as error:
    message = configlib.explain_bad_override(argv) or f"bad --config override: {error}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
