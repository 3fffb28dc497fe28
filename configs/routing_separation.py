r"""Parity and separation of block-wise and cell-wise routing (paper Section 4, Theorems 1 and 2).

  python launch.py --config configs/routing_separation.py --workdir runs/separation          # ~1 min, 2 CPU cores
  python launch.py --config configs/routing_separation.py:quick --workdir runs/separation_q  # seconds, CI

Prints, per target family, the table (test MSE and R², mean ± std over seeds) and the paired difference
cell-wise minus block-wise test R² per seed. Theorem 1: on a routing-uniform target ("uniform": every cell
switches candidate in lockstep) with E >= D the two routers reach the same error. Theorem 2: on a spatially
heterogeneous target ("heterogeneous": four contexts, two of which pick different candidates at different
cells) the block-wise router keeps an error floor that the cell-wise router does not have. The theorems are
about reachable sets; this run shows what AdamW reaches from the standard initialisation.

Chosen here: d = 32, a 2 x 2 grid, candidates of rank 2 (so a rank-2 expert can hold one exactly), E = 2
experts of rank 2 per cell for both routers (the routers differ; the experts do not), LoRA of rank 4 and
Localized LoRA of rank 2 per cell as static references, W0 = 0, 8,000 training and 2,000 test samples.
"""

import ml_collections

from localmoe import configlib

ALL_METHODS = "lora,localized_lora,blockwise_moe,cellwise_moe"


def get_config(arg=None):
  arg = configlib.parse_arg(arg, quick=False, methods=ALL_METHODS, seeds=3)
  config = ml_collections.ConfigDict()
  config.experiment = "routing_separation"
  config.method_names = arg.methods
  config.seed = 0
  config.num_seeds = arg.seeds
  config.checkpoint_every_epochs = 10
  config.data = ml_collections.ConfigDict(
    dict(d=32, k=2, rank=2, num_samples=10_000, num_test=2_000, families="uniform,heterogeneous")
  )
  config.optim = ml_collections.ConfigDict(
    dict(
      epochs=20,
      batch_size=64,
      lr=3e-3,
      weight_decay=0.0,
      eval_batch_size=4096,
      log_every=0,
      groups=configlib.groups_field(),  # parameter groups (localmoe.train.settings): PRESETS names joined by "+",
      # e.g. poly_router, a list of rules or a dict of named rules; "" none
    )
  )
  config.adapter = ml_collections.ConfigDict(dict(a_init="lora", b_init="zeros"))
  config.methods = ml_collections.ConfigDict(
    {
      "lora": dict(method="lora", rank=4),
      "localized_lora": dict(method="localized_lora", k_y=2, k_x=2, rank=2),
      "blockwise_moe": dict(method="blockwise_moe", k_y=2, k_x=2, rank=2, num_experts=2, router_input="context"),
      "cellwise_moe": dict(method="cellwise_moe", k_y=2, k_x=2, rank=2, num_experts=2, router_input="context"),
    }
  )
  if arg.quick:
    config.num_seeds = min(arg.seeds, 2)
    config.data.num_samples, config.data.num_test = 1_000, 200
    config.optim.epochs = 2
  return config
