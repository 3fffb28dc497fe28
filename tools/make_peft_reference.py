"""Writes tests/fixtures/peft_reference.json: localmoe's MiniLM LoRA/DoRA exports loaded back with PyTorch PEFT
and transformers, and the largest differences from localmoe's own outputs, for tests/test_export.py.

Two steps in two environments (torch, transformers and peft are never dependencies of localmoe):

    python tools/make_peft_reference.py export --work WORK            # the project's environment (jax)
    python3.11 -m venv /tmp/ptvenv
    /tmp/ptvenv/bin/pip install torch==2.13.0 peft transformers safetensors numpy
    /tmp/ptvenv/bin/python tools/make_peft_reference.py compare --work WORK [--out PATH]

`export` loads the first 2 layers of all-MiniLM-L6-v2 from localmoe's data cache, attaches LoRA and DoRA
(rank 4, alpha 8) to every layer's q, k, v, attention output and FFN projections with perturbed params,
writes `export_peft` and `export_merged_bert` files and localmoe's hidden states on fixed token ids into
WORK. `compare` builds a BertModel from the cached checkpoint (num_hidden_layers=2), wraps it with
`PeftModel.from_pretrained` for each adapter, loads each merged model.safetensors into a plain BertModel, and
records max |torch - localmoe| per case with the library versions.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

NUM_LAYERS = 2
METHODS = ("lora", "dora")
FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "peft_reference.json"


def _ids() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 30000, size=(2, 9)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 101, 102
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  return ids, mask


def export(work: Path) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  from localmoe import export as export_lib, inject  # pylint: disable=g-import-not-at-top
  from localmoe.data import cache  # pylint: disable=g-import-not-at-top
  from localmoe.models import bert, minilm  # pylint: disable=g-import-not-at-top

  model, frozen, _ = minilm.load(num_layers=NUM_LAYERS)
  ids, mask = _ids()
  out = {"ids": ids, "mask": mask, "base": np.asarray(model.apply({"params": frozen}, ids, mask))}
  for method in METHODS:
    adapted, trainable = inject.inject(
      model,
      frozen,
      {"method": method, "rank": 4, "alpha": 8.0},
      ids[:1],
      mask[:1],
      target_modules=bert.ADAPTER_TARGETS,
      key=jax.random.PRNGKey(1),
    )
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    trained = jax.tree_util.tree_unflatten(
      treedef, [a + 0.02 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    )
    export_lib.export_peft(str(work / f"peft_{method}"), adapted, trained, family="minilm")
    export_lib.export_merged_bert(str(work / f"merged_{method}"), adapted.merge(frozen, trained), model.num_heads)
    out[method] = np.asarray(adapted.apply(frozen, trained, ids, mask))
  np.savez(work / "localmoe_outputs.npz", **out)
  meta = {"jax": jax.__version__, "flax": flax.__version__, "minilm_dir": str(Path(cache.data_dir()) / minilm.SUBDIR)}
  (work / "meta.json").write_text(json.dumps(meta) + "\n")


def compare(work: Path, out_path: Path) -> None:
  import peft  # pylint: disable=g-import-not-at-top
  import safetensors  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top

  meta = json.loads((work / "meta.json").read_text())
  ref = np.load(work / "localmoe_outputs.npz")
  folder = Path(meta["minilm_dir"])
  config = transformers.BertConfig.from_pretrained(folder, num_hidden_layers=NUM_LAYERS)

  def base_model():
    model = transformers.BertModel(config, add_pooling_layer=False)
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("pooler.")}
    model.load_state_dict(state, strict=False)
    return model.eval()

  ids, mask = torch.tensor(ref["ids"], dtype=torch.long), torch.tensor(ref["mask"])
  keep = ref["mask"].astype(bool)

  def run(model):
    with torch.no_grad():
      return model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()

  diffs, values = {}, {}
  diffs["base"] = float(np.abs(run(base_model())[keep] - ref["base"][keep]).max())
  for method in METHODS:
    wrapped = peft.PeftModel.from_pretrained(base_model(), str(work / f"peft_{method}")).eval()
    got = run(wrapped)
    diffs[f"peft_{method}"] = float(np.abs(got[keep] - ref[method][keep]).max())
    merged = base_model()
    missing = merged.load_state_dict(load_file(str(work / f"merged_{method}" / "model.safetensors")), strict=False)
    assert not [k for k in missing.missing_keys if "position_ids" not in k], missing.missing_keys
    diffs[f"merged_{method}"] = float(np.abs(run(merged)[keep] - ref[method][keep]).max())
    diffs[f"{method}_changes_output"] = float(np.abs(ref[method][keep] - ref["base"][keep]).max())
    values[method] = [round(float(v), 6) for v in got[0, 0, :4]]
  fixture = {
    "model": f"all-MiniLM-L6-v2, first {NUM_LAYERS} layers, LoRA/DoRA rank 4 alpha 8 on bert.ADAPTER_TARGETS",
    "versions": {
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "peft": peft.__version__,
      "safetensors": safetensors.__version__,
      "numpy": np.__version__,
      "jax": meta["jax"],
      "flax": meta["flax"],
    },
    "max_abs_diff": {k: v for k, v in diffs.items() if not k.endswith("_changes_output")},
    "adapter_effect": {k: v for k, v in diffs.items() if k.endswith("_changes_output")},
    "peft_hidden_values[0,0,:4]": values,
  }
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(fixture, indent=2) + "\n")
  print(json.dumps(fixture, indent=2))


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
