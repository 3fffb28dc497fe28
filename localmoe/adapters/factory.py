"""Builds adapters from plain specs (dicts or ConfigDicts), with errors that name the bad field."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn

from localmoe.adapters import common
from localmoe.adapters.dora import DoRA
from localmoe.adapters.localized import LocalizedLoRA
from localmoe.adapters.lora import LoRA
from localmoe.adapters.melora import MELoRA
from localmoe.adapters.moe import BlockWiseLoRAMoE, CellWiseLoRAMoE
from localmoe.adapters.per_task import PerTaskLoRA

# Method names are the same everywhere: results keys, configs, tables.
ADAPTERS: dict[str, type[nn.Module]] = {
  "lora": LoRA,
  "dora": DoRA,
  "melora": MELoRA,
  "localized_lora": LocalizedLoRA,
  "blockwise_moe": BlockWiseLoRAMoE,
  "cellwise_moe": CellWiseLoRAMoE,
  "per_task_lora": PerTaskLoRA,
}

# Flax's own dataclass fields, not adapter hyperparameters.
_FLAX_FIELDS = {"parent", "name"}


def register(name: str, cls: type[nn.Module]) -> None:
  """Adds an adapter class under `name` (for forks that define new adapters)."""
  ADAPTERS[name] = cls


def adapter_fields(cls: type[nn.Module]) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if f.name not in _FLAX_FIELDS]


def make(spec: Mapping[str, Any], **overrides) -> nn.Module:
  """Builds an adapter: make({"method": "cellwise_moe", "d_in": 64, ...}) -> CellWiseLoRAMoE(...).

  `spec["method"]` picks the class; the other keys are its fields. Extra keyword arguments override spec
  entries (e.g. d_in/d_out filled in by an experiment).
  """
  spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  spec.update(overrides)
  method = spec.pop("method", None)
  if method not in ADAPTERS:
    raise ValueError(f"method={method!r} is not a known adapter; valid: {sorted(ADAPTERS)}.")
  cls = ADAPTERS[method]
  valid = adapter_fields(cls)
  unknown = sorted(set(spec) - set(valid))
  if unknown:
    raise ValueError(f"{method}: unknown field(s) {unknown}; {cls.__name__} takes {valid}.")
  module = cls(**spec)
  for field in ("a_init", "b_init"):  # fail at construction, not at first init
    if hasattr(module, field):
      common.resolve_init(getattr(module, field), field)
  return module
