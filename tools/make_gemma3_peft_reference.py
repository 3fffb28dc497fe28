"""Writes tests/fixtures/peft_reference_gemma3.json: localmoe's Gemma 3 270M LoRA/DoRA exports loaded back with
PyTorch PEFT and transformers' Gemma3ForCausalLM, and the largest logit differences from localmoe's own, for
tests/test_export.py.

Two steps in two environments (torch, transformers and peft are never dependencies of localmoe), as for
tools/make_peft_reference.py:

    python tools/make_gemma3_peft_reference.py export --work WORK            # the project's environment (jax)
    /tmp/ptvenv/bin/python tools/make_gemma3_peft_reference.py compare --work WORK [--out PATH]

`export` loads all 18 blocks of Gemma 3 270M (float32) with `localmoe.models.gemma3.load`, writes
`export_merged_gemma3` of the unadapted model (the base weights for torch), then, for LoRA and DoRA (rank 4,
alpha 8 on q/k/v/o and gate/up/down of every block, `gemma3.TARGETS`, params perturbed by 0.02 * N(0, 1) so
B != 0), `export_peft(family="gemma3")` and `export_merged_gemma3` of `nnx_inject.merge`, and localmoe's logits
on fixed token ids (2 x 8, BOS first) for base / lora / dora into WORK (about 3.3 GB). `compare` builds a
text-only Gemma3ForCausalLM (eager attention, float32) whose Gemma3TextConfig is written from localmoe's
`gemma3.Config`, loads the base model.safetensors, wraps it with `PeftModel.from_pretrained` for each adapter
(checking that PEFT holds exactly the exported tensors), loads each merged model.safetensors into a plain
Gemma3ForCausalLM, and records max |torch - localmoe| over the logits, also relative to the logits' scale and
to the adapter's effect max |adapted - base|, with the library versions and the exported tensor names (block
index as {i}) and shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np

METHODS = ("lora", "dora")
SPEC = {"rank": 4, "alpha": 8.0}
FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "peft_reference_gemma3.json"


def _ids() -> np.ndarray:
  ids = np.random.default_rng(0).integers(1000, 200_000, size=(2, 8)).astype(np.int32)
  ids[:, 0] = 2  # BOS
  return ids


def templates(tensors) -> dict[str, list[int]]:
  """{tensor name with the block index written {i}: shape} (the same shape in every block)."""
  out: dict[str, list[int]] = {}
  for name, value in tensors.items():
    key = re.sub(r"\.layers\.\d+\.", ".layers.{i}.", name)
    shape = [int(s) for s in value.shape]
    if out.setdefault(key, shape) != shape:
      raise ValueError(f"{name}: shape {shape} differs from another block's {out[key]}")
  return dict(sorted(out.items()))


def export(work: Path) -> None:
  import flax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from localmoe import export as export_lib, nnx_inject  # pylint: disable=import-outside-toplevel
  from localmoe.models import gemma3  # pylint: disable=import-outside-toplevel

  model, _ = gemma3.load()
  ids = jnp.asarray(_ids())
  out = {"ids": np.asarray(ids), "base": np.asarray(model(ids))}
  export_lib.export_merged_gemma3(str(work / "base"), model)
  for method in METHODS:
    adapted = nnx.clone(model)
    nnx_inject.inject(
      adapted, {"method": method, **SPEC}, ids[:1], target_modules=gemma3.TARGETS, key=jax.random.PRNGKey(1)
    )
    params = [
      p
      for _, _, adapter, _, _ in nnx_inject.entries(adapted)
      for p in jax.tree_util.tree_leaves(adapter.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    ]
    for p, k in zip(params, jax.random.split(jax.random.PRNGKey(2), len(params))):
      p.set_value(p.get_value() + 0.02 * jax.random.normal(k, p.get_value().shape))
    export_lib.export_peft(str(work / f"peft_{method}"), adapted, family="gemma3")
    out[method] = np.asarray(adapted(ids))
    merged = nnx_inject.merge(adapted)
    export_lib.export_merged_gemma3(str(work / f"merged_{method}"), merged)
    out[f"{method}_merged_localmoe"] = np.asarray(merged(ids))
    del adapted, merged
  np.savez(work / "localmoe_outputs.npz", **out)
  meta = {"jax": jax.__version__, "flax": flax.__version__, "config": dataclasses.asdict(model.config)}
  (work / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def hf_config(c: dict):
  """transformers' Gemma3TextConfig of localmoe's gemma3.Config (its values, as exported in meta.json)."""
  import transformers  # pylint: disable=import-outside-toplevel

  layer_types = [
    "full_attention" if (i + 1) % c["global_every"] == 0 else "sliding_attention" for i in range(c["num_layers"])
  ]
  return transformers.Gemma3TextConfig(
    vocab_size=c["vocab_size"],
    hidden_size=c["width"],
    intermediate_size=c["ffn_width"],
    num_hidden_layers=c["num_layers"],
    num_attention_heads=c["num_heads"],
    num_key_value_heads=c["num_kv_heads"],
    head_dim=c["head_dim"],
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=c["max_context"],
    rms_norm_eps=c["rms_eps"],
    tie_word_embeddings=True,
    query_pre_attn_scalar=c["head_dim"],
    sliding_window=c["sliding_window"],
    layer_types=layer_types,
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    rope_parameters={
      "full_attention": {"rope_type": "default", "rope_theta": c["global_rope_base"]},
      "sliding_attention": {"rope_type": "default", "rope_theta": c["local_rope_base"]},
    },
    attn_implementation="eager",
    dtype="float32",
  )


def compare(work: Path, out_path: Path) -> None:
  import peft  # pylint: disable=import-outside-toplevel
  import safetensors  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  meta = json.loads((work / "meta.json").read_text())
  ref = np.load(work / "localmoe_outputs.npz")
  config = hf_config(meta["config"])

  def plain(weights: Path):
    model = transformers.Gemma3ForCausalLM(config).eval()
    result = model.load_state_dict(load_file(str(weights / "model.safetensors")), strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys, result
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    return model

  ids = torch.tensor(ref["ids"], dtype=torch.long)

  def run(model):
    with torch.no_grad():
      return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float().numpy()

  scale = float(np.abs(ref["base"]).max())
  diffs, effects, values = {"base": float(np.abs(run(plain(work / "base")) - ref["base"]).max())}, {}, {}
  names, counts = {}, {}
  for method in METHODS:
    folder = work / f"peft_{method}"
    wrapped = peft.PeftModel.from_pretrained(plain(work / "base"), str(folder)).eval()
    exported = load_file(str(folder / "adapter_model.safetensors"))
    held = peft.get_peft_model_state_dict(wrapped)  # the tensors PEFT loaded, under their file names
    assert set(held) == set(exported), sorted(set(held) ^ set(exported))[:5]
    assert all(torch.equal(held[k], exported[k]) for k in exported)
    got = run(wrapped)
    del wrapped
    diffs[f"peft_{method}"] = float(np.abs(got - ref[method]).max())
    diffs[f"merged_{method}"] = float(np.abs(run(plain(work / f"merged_{method}")) - ref[method]).max())
    diffs[f"merged_{method}_localmoe"] = float(np.abs(ref[f"{method}_merged_localmoe"] - ref[method]).max())
    effects[f"{method}_changes_logits"] = float(np.abs(ref[method] - ref["base"]).max())
    values[method] = [round(float(v), 5) for v in got[0, -1, :4]]
    names[f"peft_{method}"], counts[f"peft_{method}"] = templates(exported), len(exported)
  merged = load_file(str(work / "merged_lora" / "model.safetensors"))
  names["merged"], counts["merged"] = templates(merged), len(merged)
  fixture = {
    "model": "Gemma 3 270M (all 18 blocks, float32), LoRA/DoRA rank 4 alpha 8 on gemma3.TARGETS, params + 0.02 N(0,1);"
    " logits of 2 x 8 token ids (BOS first); torch: Gemma3ForCausalLM, eager attention, float32",
    "versions": {
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "peft": peft.__version__,
      "safetensors": safetensors.__version__,
      "numpy": np.__version__,
      "jax": meta["jax"],
      "flax": meta["flax"],
    },
    "notes": "max_abs_diff over all 2 x 8 x 262144 logits: base = the unadapted export in Gemma3ForCausalLM; "
    "peft_<m> = PeftModel.from_pretrained on it; merged_<m> = the merged export in Gemma3ForCausalLM; "
    "merged_<m>_localmoe = localmoe's merged model vs its adapted one (no torch). adapter_effect = max |adapted - "
    "base| of localmoe's logits; logit_scale = max |base logits|. 8 tokens do not reach the 512-token sliding "
    "window (tests/fixtures/gemma3_reference.json covers it for the base model). PEFT warns that "
    "adapter_config.json's extra key localmoe_family is unknown, and ignores it.",
    "logit_scale": scale,
    "max_abs_diff": diffs,
    "adapter_effect": effects,
    "relative_to_logit_scale": {k: v / scale for k, v in diffs.items()},
    "relative_to_adapter_effect": {
      k: v / effects[f"{k.split('_')[1]}_changes_logits"] for k, v in diffs.items() if k != "base"
    },
    "peft_logits[0,-1,:4]": values,
    "num_layers": meta["config"]["num_layers"],
    "tensor_counts": counts,
    "tensors": names,
  }
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(fixture, indent=1) + "\n")
  print(json.dumps({k: v for k, v in fixture.items() if k != "tensors"}, indent=1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("step", choices=("export", "compare"))
  parser.add_argument("--work", type=Path, required=True, help="a scratch directory shared by both steps")
  parser.add_argument("--out", type=Path, default=FIXTURE)
  args = parser.parse_args()
  os.makedirs(args.work, exist_ok=True)
  export(args.work) if args.step == "export" else compare(args.work, args.out)


if __name__ == "__main__":
  main()
