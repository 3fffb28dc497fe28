"""Export for PyTorch users: PEFT LoRA/DoRA adapter files and merged Hugging Face-layout weights.

  export_peft("runs/x/peft", adapted, trainable, family="bert")     # adapter_model.safetensors + adapter_config.json
  export_merged_bert("runs/x/merged", model, merged_params)         # model.safetensors (BertModel names)

The one name map per model family (`HF_NAMES`) turns a localmoe module path into the Hugging Face module
name:

  bert / minilm   "encoder/layer_0/attention/self/query"  ->  "encoder.layer.0.attention.self.query"
  gemma3          "layers/0/attn/q_proj"                  ->  "model.layers.0.self_attn.q_proj"

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


def _peft(entries, family: str) -> tuple[dict[str, np.ndarray], dict]:
  """PEFT tensors and config from [(module path, linen adapter definition, its params)]."""
  from localmoe.adapters import dora as dora_lib, lora as lora_lib  # pylint: disable=g-import-not-at-top

  if family not in HF_NAMES:
    raise ValueError(f"export_peft: family={family!r} is not one of {sorted(HF_NAMES)}.")
  name = HF_NAMES[family]
  tensors: dict[str, np.ndarray] = {}
  ranks, alphas, doras, modules = set(), set(), set(), []
  for path, definition, params in entries:
    if type(definition) not in (lora_lib.LoRA, dora_lib.DoRA):
      raise ValueError(
        f"export_peft: layer {path!r} has a {type(definition).__name__} adapter, which PEFT cannot "
        "hold (only LoRA/DoRA): merge it per context (merge(..., context=t)) and export the merged "
        "weights (export_merged_bert / export_merged_gemma3) instead."
      )
    hf = name(path)
    modules.append(hf)
    a = np.asarray(jax.device_get(params["A"]), np.float32)  # [d_in, r]
    b = np.asarray(jax.device_get(params["B"]), np.float32)  # [d_out, r]
    tensors[f"base_model.model.{hf}.lora_A.weight"] = np.ascontiguousarray(a.T)  # [r, in]
    tensors[f"base_model.model.{hf}.lora_B.weight"] = np.ascontiguousarray(b)  # [out, r]
    dora = isinstance(definition, dora_lib.DoRA)
    if dora:
      tensors[f"base_model.model.{hf}.lora_magnitude_vector"] = np.asarray(
        jax.device_get(params["magnitude"]), np.float32
      )  # [out]
    ranks.add(int(definition.rank))
    alphas.add(float(definition.rank if definition.alpha is None else definition.alpha))
    doras.add(dora)
  if not modules:
    raise ValueError("export_peft: the model has no adapted layers.")
  if len(ranks) != 1 or len(alphas) != 1 or len(doras) != 1:
    raise ValueError(
      f"export_peft: the layers differ in rank {sorted(ranks)}, alpha {sorted(alphas)} or DoRA; "
      "this export writes one rank/alpha for all target modules."
    )
  rank, alpha, dora = ranks.pop(), alphas.pop(), doras.pop()
  config = {
    "peft_type": "LORA",
    "task_type": None,
    "r": rank,
    "lora_alpha": alpha,
    "lora_dropout": 0.0,
    "bias": "none",
    "use_dora": dora,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "init_lora_weights": True,
    "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
    "base_model_name_or_path": None,
    "inference_mode": True,
    "modules_to_save": None,
    "localmoe_family": family,
  }
  return tensors, config


def peft_tensors(
  adapted, trainable: Mapping[str, Any] | None = None, family: str = "bert"
) -> tuple[dict[str, np.ndarray], dict]:
  """({PEFT key: float32 array}, adapter_config dict) of a LoRA/DoRA model: a linen `AdaptedModel` with its
  `trainable`, or an NNX model adapted by `localmoe.nnx_inject` (trainable=None)."""
  if isinstance(adapted, inject.AdaptedModel):
    if not isinstance(adapted.adapter, adapt_core.PerLayer):
      raise ValueError("export_peft: only plain LoRA/DoRA adapters have a PEFT form; export merged weights instead.")
    entries = [
      (layer.path, adapted.adapter.module(layer), trainable["adapter"][layer.path]) for layer in adapted.layers
    ]
  else:
    from localmoe import nnx_inject  # pylint: disable=g-import-not-at-top

    entries = [
      (info.path, adapter.definition, adapter.linen_params()) for _, info, adapter, _, _ in nnx_inject.entries(adapted)
    ]  # pylint: disable=protected-access
  return _peft(entries, family)


def export_peft(directory: str, adapted, trainable: Mapping[str, Any] | None = None, family: str = "bert") -> None:
  """Writes PEFT's adapter_model.safetensors and adapter_config.json for a LoRA/DoRA adapted model (linen
  `AdaptedModel` + trainable, or an NNX model from `nnx_inject.inject`, e.g. Gemma 3 with family="gemma3")."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

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
        value = value.reshape(value.shape[0], -1)  # [H, heads*head_dim]
      elif value.ndim == 3:
        value = value.reshape(-1, value.shape[-1])  # [heads*head_dim, H]
      value, last = value.T, "weight"
    elif last == "bias" and value.ndim == 2:
      value = value.reshape(-1)
    elif last in ("scale", "embedding"):
      last = "weight"
    out[_bert_name("/".join(modules)) + "." + last] = np.ascontiguousarray(value)
  del num_heads
  return out


def export_merged_bert(
  directory: str,
  merged_params: Mapping[str, Any],
  num_heads: int,
  config_note: str = "BertModel config of the backbone (e.g. all-MiniLM-L6-v2)",
) -> None:
  """Writes model.safetensors with BertModel tensor names (merged per context with AdaptedModel.merge)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  os.makedirs(directory, exist_ok=True)
  save_file(
    bert_state_dict(merged_params, num_heads),
    os.path.join(directory, MERGED_WEIGHTS),
    metadata={"format": "pt", "fits_config": config_note},
  )


_GEMMA3_NORMS = {
  "pre_attn_norm": "input_layernorm",
  "post_attn_norm": "post_attention_layernorm",
  "pre_ffn_norm": "pre_feedforward_layernorm",
  "post_ffn_norm": "post_feedforward_layernorm",
  "final_norm": "norm",
}


def gemma3_state_dict(model) -> dict[str, np.ndarray]:
  """Gemma3ForCausalLM tensor names and layouts of a (merged) `localmoe.models.gemma3.Gemma3`.

  Linear kernels [in, out] become weights [out, in]; RMSNorm scales, stored by localmoe as 1 + w (the GGUF
  convention), are written as HF's w; the embedding is `model.embed_tokens.weight` (tied to the LM head).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  out: dict[str, np.ndarray] = {}
  for path, variable in flat:
    keys = [str(k) for k in path]
    value = np.asarray(jax.device_get(variable.get_value()), np.float32)
    *modules, leaf = keys
    if leaf == "kernel":
      value, leaf = value.T, "weight"
    elif leaf == "scale":
      value, leaf = value - 1.0, "weight"
      modules[-1] = _GEMMA3_NORMS.get(modules[-1], modules[-1])
    elif leaf == "embedding":
      modules, leaf = ["embed_tokens"], "weight"
    out[_gemma3_name("/".join(modules)) + "." + leaf] = np.ascontiguousarray(value)
  return out


def export_merged_gemma3(
  directory: str, merged_model, config_note: str = "Gemma3ForCausalLM, google/gemma-3-270m config"
) -> None:
  """Writes model.safetensors (Gemma3ForCausalLM names) of a model merged with `nnx_inject.merge(model, context=t)`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  os.makedirs(directory, exist_ok=True)
  save_file(
    gemma3_state_dict(merged_model),
    os.path.join(directory, MERGED_WEIGHTS),
    metadata={"format": "pt", "fits_config": config_note},
  )
