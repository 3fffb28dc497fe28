r"""MNIST adaptation 0-4 -> 5-9: the Localized LoRA paper's Experiment 2 and Figure 2.

  python launch.py --config configs/mnist_adaptation.py --workdir runs/mnist            # one budget, 6 methods
  python launch.py --config configs/mnist_adaptation.py --sweep --workdir runs/mnist_sweep   # Figure 2 grid
  python launch.py --config configs/mnist_adaptation.py:cpu --sweep --workdir runs/mnist_cpu # reduced, CPU
  python launch.py --config configs/mnist_adaptation.py:quick --workdir runs/mnist_q    # seconds, CI

A run prints the pretraining accuracy, per-method progress and a table (params, fraction of the 50,565 of
full fine-tuning, validation loss, test accuracy beside the paper's 97.59% for full fine-tuning). A sweep
writes every entry to <workdir>/entries/, then sweep.md / sweep.json with the best configuration per
method and parameter budget (on validation loss), its test accuracy and accuracy drop from full
fine-tuning, and figures/figure2_accuracy_drop.png.

Stated by the paper: MLP 784-64(ReLU)-5 pretrained on digits 0-4, frozen; adapters on the first layer
before the ReLU; learning rates {1e-4, 2e-4, 5e-4}; LoRA r in {2..32}; MELoRA r in {2..32} x N in
{2, 4, 8, 16}; Localized LoRA r in {2..16} x K in {2, 4, 8, 16}; ranks at or above the block size skipped;
best configuration per budget on validation loss. Full fine-tuning: 50,565 parameters, 97.59%.

Left open by the paper, chosen here (each overridable, e.g. --config.optim.epochs=20):
  * optimiser AdamW (weight decay 0.01, PyTorch's default), batch 64, 10 adaptation epochs; pretraining
    5 epochs, batch 128, lr 1e-3, no weight decay.
  * validation: 10% of the MNIST training images of digits 5-9; test: the MNIST test images of 5-9.
  * pixels scaled to [0, 1]; PyTorch's default init for the MLP; standard LoRA init (B = 0) for adapters.
  * Localized LoRA's K x K grid splits the 784 inputs into K contiguous fields and the 64 hidden units into
    K segments (the library's grid). Block-wise / Cell-wise LoRA-MoE (not in the paper's Figure 2) use
    E = 2 experts of rank r/2 on the same grids, routed by the input (router_input="activation"); their
    routers' parameters are counted in their budget.
  * one seed per configuration (sweep `seeds=3` for more).

Sweep variants (the same argument goes to get_config and get_sweep):
  (default)  the full grid for accelerators: 42 configurations x 3 learning rates = 126 entries, full data.
  cpu        REDUCED for a 2-core CPU: 12,000 training images per domain, 5 epochs; same grid.
  quick      CI: 2,000 images, 1 epoch, 8 entries.
"""

import ml_collections

from localmoe import configlib

ALL_METHODS = "full_finetune,lora,melora,localized_lora,blockwise_moe,cellwise_moe"
LRS = (1e-4, 2e-4, 5e-4)
HIDDEN, D_IN = 64, 784


def get_config(arg=None):
  arg = configlib.parse_arg(arg, quick=False, cpu=False, methods=ALL_METHODS, seeds=1)
  config = ml_collections.ConfigDict()
  config.experiment = "mnist_adaptation"
  config.method_names = arg.methods
  config.seed = 0  # seeds are seed, ..., seed+num_seeds-1 (a sweep entry: one seed)
  config.num_seeds = arg.seeds
  config.sharding = "entries"  # sweeps only: entry axis over the local devices ("data": batch axis; "none")
  config.checkpoint_every_epochs = 5  # orbax checkpoints in <workdir>/checkpoints; re-running resumes

  config.data = ml_collections.ConfigDict(
    dict(
      source_digits="0,1,2,3,4",
      target_digits="5,6,7,8,9",
      val_fraction=0.1,  # of the target digits' training images
      max_train=0,
      max_test=0,  # per domain; 0: all images
      split_seed=0,
    )
  )
  config.pretrain = ml_collections.ConfigDict(dict(epochs=5, batch_size=128, lr=1e-3, weight_decay=0.0, seed=0))
  config.optim = ml_collections.ConfigDict(
    dict(
      epochs=10,
      batch_size=64,
      lr=2e-4,
      weight_decay=0.01,
      eval_batch_size=8192,
      log_every=0,
      groups=configlib.groups_field(),  # parameter groups (localmoe.train.settings): PRESETS names joined by "+",
      # e.g. poly_router, a list of rules or a dict of named rules; "" none
    )
  )
  config.adapter = ml_collections.ConfigDict(dict(a_init="lora", b_init="zeros"))
  config.adapter.alpha = ml_collections.config_dict.placeholder(float)
  # One budget (3,392 adapter parameters = 6.7% of full fine-tuning) for a plain run; sweeps override these.
  config.methods = ml_collections.ConfigDict(
    {
      "full_finetune": dict(method="full_finetune"),
      "lora": dict(method="lora", rank=4),
      "melora": dict(method="melora", num_blocks=4, rank=4),
      "localized_lora": dict(method="localized_lora", k_y=2, k_x=2, rank=2),
      "blockwise_moe": dict(method="blockwise_moe", k_y=2, k_x=2, rank=1, num_experts=2, router_input="activation"),
      "cellwise_moe": dict(method="cellwise_moe", k_y=2, k_x=2, rank=1, num_experts=2, router_input="activation"),
    }
  )
  # Sweep summary: best entry per (method, budget) on validation loss.
  config.sweep = ml_collections.ConfigDict(
    dict(
      select="val_loss",
      mode="min",
      group_by="method,params",
      columns="rank,blocks,experts,fraction,lr,seed,val_loss,val_accuracy,test_accuracy",
    )
  )
  if arg.cpu:
    config.data.max_train = 12_000
    config.optim.epochs = 5
  if arg.quick:
    config.data.max_train = 2_000
    config.data.max_test = 1_000
    config.pretrain.epochs = 1
    config.optim.epochs = 1
    config.optim.batch_size = 32
    config.method_names = "full_finetune,localized_lora"
  return config


def grid():
  """(method, {field: value}) of the paper's grid plus the LoRA-MoE grids; ranks below the block size."""
  out = [("full_finetune", {})]
  out += [("lora", {"rank": r}) for r in (2, 4, 8, 16, 32)]
  out += [("melora", {"rank": r, "num_blocks": n}) for n in (2, 4, 8, 16) for r in (2, 4, 8, 16, 32) if r < HIDDEN // n]
  out += [
    ("localized_lora", {"rank": r, "k_y": k, "k_x": k}) for k in (2, 4, 8, 16) for r in (2, 4, 8, 16) if r < HIDDEN // k
  ]
  for moe in ("blockwise_moe", "cellwise_moe"):  # E=2 experts of rank r/2: Localized LoRA's expert budget
    out += [(moe, {"rank": r, "k_y": k, "k_x": k}) for k in (2, 4) for r in (1, 2, 4, 8) if r < HIDDEN // k]
  return out


def get_sweep(arg=None):
  """Override dicts: every grid configuration x learning rate x seed (one entry each)."""
  arg = configlib.parse_arg(arg, quick=False, cpu=False, methods=ALL_METHODS, seeds=1)
  methods, lrs, configs = configlib.split_names(arg.methods), LRS, grid()
  if arg.quick:
    lrs = (2e-4, 5e-4)
    configs = [
      ("full_finetune", {}),
      ("lora", {"rank": 2}),
      ("lora", {"rank": 4}),
      ("localized_lora", {"rank": 2, "k_y": 2, "k_x": 2}),
    ]
  entries = []
  for method, fields in configs:
    if method not in methods:
      continue
    for lr in lrs:
      for seed in range(arg.seeds):
        entry = {"method_names": method, "num_seeds": 1, "seed": seed, "optim.lr": lr}
        entry.update({f"methods.{method}.{k}": v for k, v in fields.items()})
        entries.append(entry)
  return entries
