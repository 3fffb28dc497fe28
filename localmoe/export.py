"""Export for PyTorch users: PEFT LoRA/DoRA adapter files and merged Hugging Face-layout weights.

  export_peft("runs/x/peft", adapted, trainable, family="bert")     # adapter_model.safetensors + adapter_config.json
  export_merged_bert("runs/x/merged", model, merged_params)         # model.safetensors (BertModel names)

The one name map per model family (`HF_NAMES`) turns a localmoe module path into the Hugging Face module
name:

  bert / minilm   "encoder/layer_0/attention/self/query"  ->  "encoder.layer.0.attention.self.query"
  gemma3          "layers/0/attn/q_proj"                  ->  "model.layers.0.self_attn.q_proj"  (not yet wired)

PEFT keys are `base_model.model.<hf module>.lora_A.weight` [r, in] = A^T and `...lora_B.weight` [out, r] = B;
`lora_alpha` is localmoe's alpha (alpha=None is a scale of 1, written as lora_alpha = r). DoRA adds
`...lora_magnitude_vector` [out] and `use_dora: true`. localmoe kernels are [in, out] with DenseGeneral
axes flattened row-major, which is HF's Linear [out, in] transposed (q/k/v [d, heads, head_dim] is
[heads*head_dim, d] there). An adapter that is not plain LoRA/DoRA (grids, routed experts) has no PEFT form:
merge it per context (`AdaptedModel.merge(..., context=t)`) and export the merged weights.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np

from localmoe import adapt_core
from localmoe import inject

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
MERGED_WEIGHTS = "model.safetensors"


def _bert_name(path: str) -> str:
  return re.sub(r"layer_(\d+)", r"layer.\1", path).replace("/", ".")


def _gemma3_name(path: str) -> str:
  return "model." + path.replace("/", ".").replace(".attn.", ".self_attn.")


HF_NAMES: dict[str, Callable[[str], str]] = {"bert": _bert_name, "minilm": _bert_name, "gemma3": _gemma3_name}


def peft_tensors(adapted: inject.AdaptedModel, trainable: Mapping[str, Any],
                 family: str = "bert") -> tuple[dict[str, np.ndarray], dict]:
  """({PEFT key: float32 array}, adapter_config dict) of a LoRA or DoRA adapted model."""
  if family not in HF_NAMES:
    raise ValueError(f"export_peft: family={family!r} is not one of {sorted(HF_NAMES)}.")
  if not isinstance(adapted.adapter, adapt_core.PerLayer) or callable(adapted.adapter.build):
    raise ValueError("export_peft: only plain LoRA/DoRA adapters have a PEFT form; export merged weights instead.")
  name = HF_NAMES[family]
  tensors: dict[str, np.ndarray] = {}
  ranks, alphas, doras, modules = set(), set(), set(), []
  for layer in adapted.layers:
    spec = dict(adapted.adapter.spec_for(layer))
    method = spec.get("method")
    if method not in ("lora", "dora"):
      raise ValueError(f"export_peft: layer {layer.path!r} has a {method!r} adapter, which PEFT cannot hold: merge "
                       "it per context (adapted.merge(..., context=t)) and use export_merged_bert instead.")
    params = trainable["adapter"][layer.path]
    hf = name(layer.path)
    modules.append(hf)
    a = np.asarray(jax.device_get(params["A"]), np.float32)          # [d_in, r]
    b = np.asarray(jax.device_get(params["B"]), np.float32)          # [d_out, r]
    tensors[f"base_model.model.{hf}.lora_A.weight"] = np.ascontiguousarray(a.T)   # [r, in]
    tensors[f"base_model.model.{hf}.lora_B.weight"] = np.ascontiguousarray(b)     # [out, r]
    if method == "dora":
      tensors[f"base_model.model.{hf}.lora_magnitude_vector"] = np.asarray(
        jax.device_get(params["magnitude"]), np.float32)              # [out]
    rank = int(spec["rank"])
    ranks.add(rank)
    alphas.add(float(rank if spec.get("alpha") is None else spec["alpha"]))
    doras.add(method == "dora")
  if len(ranks) != 1 or len(alphas) != 1 or len(doras) != 1:
    raise ValueError(f"export_peft: the layers differ in rank {sorted(ranks)}, alpha {sorted(alphas)} or DoRA; "
                     "this export writes one rank/alpha for all target modules.")
  rank, alpha, dora = ranks.pop(), alphas.pop(), doras.pop()
  config = {"peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
            "bias": "none", "use_dora": dora, "use_rslora": False, "fan_in_fan_out": False,
            "init_lora_weights": True, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
            "base_model_name_or_path": None, "inference_mode": True, "modules_to_save": None,
            "localmoe_family": family}
  return tensors, config


def export_peft(directory: str, adapted: inject.AdaptedModel, trainable: Mapping[str, Any],
                family: str = "bert") -> None:
  """Writes PEFT's adapter_model.safetensors and adapter_config.json for a LoRA/DoRA adapted model."""
  from safetensors.numpy import save_file     # pylint: disable=g-import-not-at-top
  tensors, config = peft_tensors(adapted, trainable, family)
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, PEFT_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(directory, PEFT_CONFIG), "w", encoding="utf-8") as f:
    f.write(json.dumps(config, indent=2) + "\n")


def bert_state_dict(params: Mapping[str, Any], num_heads: int) -> dict[str, np.ndarray]:
  """The inverse of `localmoe.models.bert.params_from_checkpoint`: BertModel names and [out, in] layouts."""
  out: dict[str, np.ndarray] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, "key", k)) for k in path]
    value = np.asarray(jax.device_get(leaf), np.float32)
    *modules, last = keys
    name = modules[-1]
    if last == "kernel":
      if value.ndim == 3 and name in ("query", "key", "value"):
        value = value.reshape(value.shape[0], -1)                     # [H, heads*head_dim]
      elif value.ndim == 3:
        value = value.reshape(-1, value.shape[-1])                    # [heads*head_dim, H]
      value, last = value.T, "weight"
    elif last == "bias" and value.ndim == 2:
      value = value.reshape(-1)
    elif last in ("scale", "embedding"):
      last = "weight"
    out[_bert_name("/".join(modules)) + "." + last] = np.ascontiguousarray(value)
  del num_heads
  return out


def export_merged_bert(directory: str, merged_params: Mapping[str, Any], num_heads: int,
                       config_note: str = "BertModel config of the backbone (e.g. all-MiniLM-L6-v2)") -> None:
  """Writes model.safetensors with BertModel tensor names (merged per context with AdaptedModel.merge)."""
  from safetensors.numpy import save_file     # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  save_file(bert_state_dict(merged_params, num_heads), os.path.join(directory, MERGED_WEIGHTS),
            metadata={"format": "pt", "fits_config": config_note})
