"""Adapters: LoRA, MELoRA, Localized LoRA, and the routed grids of Localized LoRA-MoE, one LoRA per task."""

from localmoe.adapters.common import INITIALIZERS, lora_a_init, zeros_init
from localmoe.adapters.dense import delta_weight, merge
from localmoe.adapters.factory import ADAPTERS, make, register
from localmoe.adapters.localized import LocalizedLoRA
from localmoe.adapters.lora import LoRA
from localmoe.adapters.melora import MELoRA
from localmoe.adapters.moe import BlockWiseLoRAMoE, CellWiseLoRAMoE
from localmoe.adapters.per_task import PerTaskLoRA

__all__ = [
  "INITIALIZERS",
  "lora_a_init",
  "zeros_init",
  "delta_weight",
  "merge",
  "ADAPTERS",
  "make",
  "register",
  "LocalizedLoRA",
  "LoRA",
  "MELoRA",
  "BlockWiseLoRAMoE",
  "CellWiseLoRAMoE",
  "PerTaskLoRA",
]
