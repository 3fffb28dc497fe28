r"""Runs an experiment from its config file.

  python launch.py --config configs/svd_simulation.py --workdir runs/svd
  python launch.py --config configs/svd_simulation.py:quick --workdir runs/q --config.optim.lr=3e-3

Intentionally kept short: parse flags, validate the config, guard the workdir, look the experiment up by
`config.experiment`, call it.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

import experiments
from localmoe import checkpoint
from localmoe import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with an argument: path.py[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, history, TensorBoard events.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a finished run in --workdir.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    experiment = experiments.get(config.experiment)
    experiments.validate(config)                          # before anything is written or computed
    with workdir_lib.guard(_WORKDIR.value, overwrite=_OVERWRITE.value), checkpoint.preemption_guard():
      experiment(config, _WORKDIR.value)
  except (ValueError, workdir_lib.WorkdirError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except checkpoint.Preempted as stop:
    print(f"\n[preemption] stopped cleanly ({stop}).\nResume with the same command:\n  python "
          + " ".join(sys.argv), file=sys.stderr, flush=True)
    sys.exit(checkpoint.EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main)
