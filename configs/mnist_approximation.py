r"""Truncated-SVD approximation of one MNIST digit: the Localized LoRA paper's Table I and Figure 1.

  python launch.py --config configs/mnist_approximation.py --workdir runs/mnist_approximation
  python launch.py --config configs/mnist_approximation.py:quick --workdir runs/mnist_approximation_quick  # CI

Prints the normalised Frobenius error ||W - W_approx||_F / ||W||_F of each method beside the paper's and the
wall time; writes results.json (methods.NAME.error), results.md and figure1.png (original and reconstructions).

Stated by the paper: the first test image of digit 2 as a 28x28 matrix; 2rd = 224 parameters with d = 28,
r = 4; LoRA rank 4; MELoRA 4 diagonal 7x7 blocks of rank 4; Localized LoRA a 2x2 grid of rank-2 blocks; every
block by truncated SVD. Deterministic: no seeds, no training; `quick` is the same computation.
Chosen here: pixels / 255 (the error is scale-invariant, so this does not matter); "first" is in the
official test-set order (test index 1).
"""

import ml_collections

from localmoe import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, quick=False, methods="lora,melora,localized_lora")
  config = ml_collections.ConfigDict()
  config.experiment = "mnist_approximation"
  config.method_names = arg.methods
  config.data = ml_collections.ConfigDict(
    dict(
      digit=2,  # which digit
      occurrence=0,  # 0: its first image in the official test order
    )
  )
  config.methods = ml_collections.ConfigDict(
    {
      "lora": dict(rank=4),  # 4 * (28 + 28)       = 224
      "melora": dict(num_blocks=4, rank=4),  # 4 * 4 * (7 + 7)     = 224
      "localized_lora": dict(k=2, rank=2),  # 2 * 2 * 2 * (14 + 14) = 224
    }
  )
  config.quick = arg.quick  # the full run already takes well under a second
  return config
