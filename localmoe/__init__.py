"""localmoe: Localized LoRA-MoE (block-wise and cell-wise low-rank experts with routing) in JAX/Flax."""

from localmoe.adapters import (
  ADAPTERS,
  BlockWiseLoRAMoE,
  CellWiseLoRAMoE,
  LocalizedLoRA,
  LoRA,
  MELoRA,
  delta_weight,
  make,
  merge,
  register,
)
from localmoe.adapter_io import load_adapter, save_adapter
from localmoe.inject import routing_diagnostics
from localmoe.nnx_inject import AdapterParam, ExtraParam, routing_context
from localmoe.params import count_params, trainable_params
from localmoe.routing import (
  Router,
  collect_router_outputs,
  expert_usage,
  load_balancing_loss,
  router_z_loss,
  routing_entropy,
  usage_entropy,
)

__version__ = "0.1.0"

__all__ = [
  "ADAPTERS",
  "BlockWiseLoRAMoE",
  "CellWiseLoRAMoE",
  "LocalizedLoRA",
  "LoRA",
  "MELoRA",
  "delta_weight",
  "make",
  "merge",
  "register",
  "load_adapter",
  "save_adapter",
  "routing_diagnostics",
  "AdapterParam",
  "ExtraParam",
  "routing_context",
  "count_params",
  "trainable_params",
  "Router",
  "collect_router_outputs",
  "expert_usage",
  "load_balancing_loss",
  "router_z_loss",
  "routing_entropy",
  "usage_entropy",
]
