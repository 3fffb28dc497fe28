r"""SVD multi-field simulation: the paper's Table 1 (Section 3.1).

  python launch.py --config configs/svd_simulation.py --workdir runs/svd
  python launch.py --config configs/svd_simulation.py:quick --workdir runs/svd_quick       # seconds, CI
  python launch.py --config configs/svd_simulation.py:methods=lora+cellwise_moe,seeds=3 --workdir runs/x

Prints per-method progress, then for each singular-value spectrum the table (test MSE and R^2, mean +- std
over seeds, beside the paper's), whether the paper's ordering cell-wise > global > static > MELoRA holds,
and the wall time. Writes results.json, results.md, history.csv and TensorBoard events (tb/) to --workdir.

Stated by the paper: d = 64, K = 4 fields of 16, D = 3 contexts (block-diagonal, checkerboard, upper
shift), Haar U, V, spectrum scaled by 1/sqrt(16), W0 ~ N(0, 0.01^2), N = 10,000, x ~ N(0, I), context
uniform per sample, AdamW lr 1e-3, 30 epochs, ranks/experts giving 2,048/2,048/2,048/2,054/2,144 params.

Left open by the paper, chosen here (each overridable, e.g. --config.optim.batch_size=128):
  * spectrum: its shape is not given. We run three, all with mean square singular value 1, so that each
    active block preserves the variance of its input field:
      "gaussian" (default): the singular values of G / sqrt(16), G a 16x16 standard Gaussian matrix drawn
        per block. This is the reading we find most literal: "a singular value spectrum scaled by
        1/sqrt(d_k) to preserve variance bounds" is what makes a Gaussian matrix's O(sqrt(d_k)) singular
        values variance-preserving; it also gives targets of about unit variance per coordinate, which is
        what the paper's Table 1 implies (MSE / (1 - R^2) = 0.839 / 0.793 = 1.06).
      "flat": all singular values 1 (each block a random orthogonal matrix).
      "decaying": s_k ~ exp(-(k-1)/4), rescaled to mean square 1.
    data.block_scale multiplies every block (1.0: no extra scaling). With a much smaller target scale
    (e.g. 0.25: flat singular values of 1/sqrt(16)), the frozen W0 ~ N(0, 0.01^2) carries ~8% of the target
    variance and costs every method several R^2 points.
  * blocks: drawn independently for every (context, cell) (data.share_blocks=False); the paper writes
    W_block^(i,j) in several contexts without saying whether they are the same matrix.
  * split: 80% train / 20% test, random per seed. Batch size 64. AdamW weight decay 0.01 (PyTorch's default).
  * init: standard LoRA (A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0); routers W_g ~ N(0, 1/D), no bias.
  * seeds: each seed is a full replicate (its own targets, W0, samples, split and initialisation).
  * alpha: None, i.e. scale alpha / r = 1 for every method.
"""

import ml_collections

from localmoe import configlib

ALL_METHODS = "melora,localized_lora,lora,blockwise_moe,cellwise_moe"


def get_config(arg=None):
  arg = configlib.parse_arg(arg, quick=False, methods=ALL_METHODS, seeds=5, spectra="gaussian,flat,decaying")
  config = ml_collections.ConfigDict()
  config.experiment = "svd_simulation"
  config.method_names = arg.methods
  config.seed = 0  # seeds are seed, seed+1, ..., seed+num_seeds-1
  config.num_seeds = arg.seeds
  config.checkpoint_every_epochs = 10  # orbax checkpoints in <workdir>/checkpoints; re-running resumes

  config.data = ml_collections.ConfigDict(
    dict(
      d=64,
      k=4,
      num_samples=10_000,
      test_fraction=0.2,
      contexts="block_diagonal,checkerboard,upper_shift",
      spectra=arg.spectra,  # the first one is the default reported in results.json "methods"
      spectrum_decay=4.0,  # "decaying": s_k ~ exp(-(k-1)/spectrum_decay)
      block_scale=1.0,  # multiplies every target block
      share_blocks=False,
      w0_std=0.01,
    )
  )
  config.optim = ml_collections.ConfigDict(
    dict(
      epochs=30,
      batch_size=64,
      lr=1e-3,
      weight_decay=0.01,
      eval_batch_size=8192,
      log_every=0,
      groups=configlib.groups_field(),  # parameter groups (localmoe.train.settings): PRESETS names joined by "+",
      # e.g. poly_router, a list of rules or a dict of named rules; "" none
    )
  )
  config.adapter = ml_collections.ConfigDict(dict(a_init="lora", b_init="zeros", alpha=None))
  config.adapter.alpha = ml_collections.config_dict.placeholder(float)
  config.methods = ml_collections.ConfigDict(
    {
      "lora": dict(method="lora", rank=16),
      "melora": dict(method="melora", num_blocks=4, rank=16),
      "localized_lora": dict(method="localized_lora", k_y=4, k_x=4, rank=4),
      "blockwise_moe": dict(method="blockwise_moe", k_y=4, k_x=4, rank=2, num_experts=2, router_input="context"),
      "cellwise_moe": dict(method="cellwise_moe", k_y=4, k_x=4, rank=2, num_experts=2, router_input="context"),
    }
  )
  if arg.quick:
    config.num_seeds = min(arg.seeds, 2)
    config.data.num_samples = 1000
    config.data.spectra = "gaussian,flat"
    config.optim.epochs = 2
  return config


def get_sweep(arg=None):
  """Override dicts for `launch.py --sweep`: methods x learning rates x seeds, one entry each.

    python launch.py --config configs/svd_simulation.py --sweep --workdir runs/svd_sweep      # 75 entries
    python launch.py --config configs/svd_simulation.py:quick --sweep --workdir runs/svd_sq  # 8, seconds

  Entries of one method differ only in seed and learning rate, so each method trains as one vmapped,
  compiled program (5 groups of 15, on the first spectrum of `spectra`). Takes get_config's arguments.
  """
  arg = configlib.parse_arg(arg, quick=False, methods=ALL_METHODS, seeds=5, spectra="gaussian,flat,decaying")
  methods, lrs, seeds = configlib.split_names(arg.methods), [3e-4, 1e-3, 3e-3], range(arg.seeds)
  if arg.quick:
    methods, lrs, seeds = ["lora", "cellwise_moe"], [1e-3, 3e-3], range(2)
  return [
    {
      "method_names": m,
      "num_seeds": 1,
      "seed": s,
      "optim.lr": lr,
      "data.spectra": configlib.split_names(arg.spectra)[0],
    }
    for m in methods
    for lr in lrs
    for s in seeds
  ]
