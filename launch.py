r"""Runs an experiment from its config file.

  python launch.py --config configs/svd_simulation.py --workdir runs/svd
  python launch.py --config configs/svd_simulation.py:quick --workdir runs/q --config.optim.lr=3e-3

Intentionally kept short: parse flags, look the experiment up by `config.experiment`, call it.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

import experiments

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with an argument: path.py[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, history, TensorBoard events.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  run = experiments.get(config.experiment)
  run(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
