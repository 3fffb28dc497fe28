"""Export for PyTorch (localmoe.export): PEFT LoRA/DoRA files and merged Hugging Face-layout weights, checked
with numpy re-computations of PEFT's forward (no torch at test time)."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from localmoe import export, inject
from localmoe.models import bert

TINY = dict(
  num_hidden_layers=2,
  hidden_size=16,
  num_attention_heads=4,
  intermediate_size=32,
  vocab_size=50,
  max_position_embeddings=16,
  type_vocab_size=2,
  layer_norm_eps=1e-12,
)


def _adapted(spec):
  model = bert.from_hf_config(TINY)
  ids = jax.random.randint(jax.random.PRNGKey(0), (2, 7), 0, 50)
  mask = jnp.ones((2, 7), jnp.int32)
  frozen = model.init(jax.random.PRNGKey(1), ids, mask)["params"]
  adapted, trainable = inject.inject(
    model, frozen, spec, ids[:1], mask[:1], target_modules=bert.ADAPTER_TARGETS, key=jax.random.PRNGKey(2)
  )
  leaves, treedef = jax.tree_util.tree_flatten(trainable)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  trained = jax.tree_util.tree_unflatten(
    treedef, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
  )
  return model, frozen, ids, mask, adapted, trained


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_files_keys_shapes_and_config(tmp_path, method):
  _, _, _, _, adapted, trained = _adapted({"method": method, "rank": 2, "alpha": 4.0})
  export.export_peft(str(tmp_path), adapted, trained, family="minilm")
  tensors = load_file(str(tmp_path / export.PEFT_WEIGHTS))
  config = json.loads((tmp_path / export.PEFT_CONFIG).read_text())
  assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4.0
  assert config["use_dora"] == (method == "dora")
  assert set(config["target_modules"]) == {"query", "key", "value", "dense"}
  a = tensors["base_model.model.encoder.layer.1.attention.self.query.lora_A.weight"]
  b = tensors["base_model.model.encoder.layer.1.intermediate.dense.lora_B.weight"]
  assert a.shape == (2, 16) and b.shape == (32, 2)
  assert len(tensors) == 2 * 6 * (3 if method == "dora" else 2)
  if method == "dora":
    assert tensors["base_model.model.encoder.layer.0.output.dense.lora_magnitude_vector"].shape == (16,)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_numpy_peft_forward_equals_the_merged_layer(tmp_path, method):
  """PEFT's Linear forward from the exported tensors and the merged HF weight equals localmoe's merge."""
  model, frozen, _, _, adapted, trained = _adapted({"method": method, "rank": 2, "alpha": 4.0})
  export.export_peft(str(tmp_path), adapted, trained, family="bert")
  tensors = load_file(str(tmp_path / export.PEFT_WEIGHTS))
  base = export.bert_state_dict(frozen, model.num_heads)
  merged = export.bert_state_dict(adapted.merge(frozen, trained), model.num_heads)
  x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
  s = 4.0 / 2
  for module in ("encoder.layer.0.attention.self.key", "encoder.layer.1.attention.output.dense"):
    w0, bias = base[module + ".weight"], base[module + ".bias"]  # [out, in]
    x_in = x if w0.shape[1] == 16 else np.random.default_rng(1).normal(size=(5, w0.shape[1])).astype(np.float32)
    a = tensors[f"base_model.model.{module}.lora_A.weight"]
    b = tensors[f"base_model.model.{module}.lora_B.weight"]
    if method == "lora":
      y = x_in @ w0.T + bias + s * (x_in @ a.T) @ b.T
    else:  # PEFT's DoRA (weight-norm over in)
      m = tensors[f"base_model.model.{module}.lora_magnitude_vector"]
      w = w0 + s * b @ a
      y = x_in @ (m[:, None] * w / np.linalg.norm(w, axis=1, keepdims=True)).T + bias
    want = x_in @ merged[module + ".weight"].T + merged[module + ".bias"]
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_merged_export_round_trips_to_the_merged_params(tmp_path):
  model, frozen, ids, mask, adapted, trained = _adapted({"method": "lora", "rank": 2})
  merged = adapted.merge(frozen, trained)
  export.export_merged_bert(str(tmp_path), merged, model.num_heads)
  tensors = load_file(str(tmp_path / export.MERGED_WEIGHTS))
  assert tensors["encoder.layer.0.attention.self.query.weight"].shape == (16, 16)
  assert tensors["embeddings.word_embeddings.weight"].shape == (50, 16)
  back = bert.params_from_checkpoint(tensors, model)
  for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(merged)):
    np.testing.assert_array_equal(x, np.asarray(y))
  np.testing.assert_allclose(
    model.apply({"params": back}, ids, mask), adapted.apply(frozen, trained, ids, mask), atol=1e-5
  )


def test_grid_adapter_is_refused_with_one_line_pointing_to_merge(tmp_path):
  spec = {"method": "localized_lora", "k_y": 2, "k_x": 2, "rank": 1}
  _, _, _, _, adapted, trained = _adapted(spec)
  with pytest.raises(ValueError, match="merge") as error:
    export.export_peft(str(tmp_path), adapted, trained)
  assert "\n" not in str(error.value)


def test_fixture_recorded_differences_are_small():
  path = os.path.join(os.path.dirname(__file__), "fixtures", "peft_reference.json")
  if not os.path.exists(path):
    pytest.skip("tests/fixtures/peft_reference.json not produced yet (tools/make_peft_reference.py)")
  with open(path, encoding="utf-8") as f:
    fixture = json.load(f)
  assert "versions" in fixture and "torch" in fixture["versions"]
  assert {"torch", "transformers", "peft", "jax", "flax"} <= set(fixture["versions"])
  for name, diff in fixture["max_abs_diff"].items():
    assert diff < 1e-4, name
  for method in ("lora", "dora"):  # the adapters moved the output far more than the differences
    assert fixture["adapter_effect"][f"{method}_changes_output"] > 100 * fixture["max_abs_diff"][f"peft_{method}"]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_gemma3_peft_and_merged_exports(tmp_path, method):
  from flax import nnx
  from localmoe import nnx_inject
  from localmoe.models import gemma3

  config = gemma3.Config(
    num_layers=2, width=24, ffn_width=48, num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=64
  )  # every size distinct (see _fixture_names)
  model = gemma3.Gemma3(config, rngs=nnx.Rngs(0))
  nnx_inject.inject(
    model,
    {"method": method, "rank": 2, "alpha": 4.0},
    jnp.zeros((1, 4), jnp.int32),
    target_modules=gemma3.TARGETS,
    key=jax.random.PRNGKey(1),
  )
  for _, _, adapter, _, _ in nnx_inject.entries(model):  # move B off zero
    adapter.params["B"].set_value(adapter.params["B"].get_value() + 0.1)
  export.export_peft(str(tmp_path / "peft"), model, family="gemma3")
  tensors = load_file(str(tmp_path / "peft" / export.PEFT_WEIGHTS))
  config_json = json.loads((tmp_path / "peft" / export.PEFT_CONFIG).read_text())
  assert set(config_json["target_modules"]) == {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
  }
  a = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"]
  b = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
  assert a.shape == (2, 24) and b.shape == (16, 2)
  merged = nnx_inject.merge(model)
  export.export_merged_gemma3(str(tmp_path / "merged"), merged)
  state = load_file(str(tmp_path / "merged" / export.MERGED_WEIGHTS))
  assert state["model.embed_tokens.weight"].shape == (64, 24)
  assert "model.layers.0.input_layernorm.weight" in state and "model.norm.weight" in state
  w = state["model.layers.1.self_attn.k_proj.weight"]  # [out, in]
  np.testing.assert_allclose(w, np.asarray(merged.layers[1].attn.k_proj.kernel.get_value()).T)
  if method == "lora":  # merged = W0 + (alpha/r) B A
    w0 = np.asarray(model.layers[1].attn.k_proj.base.kernel.get_value()).T
    np.testing.assert_allclose(w, w0 + 2.0 * b @ a, rtol=1e-5, atol=1e-6)
  _fixture_names(f"peft_{method}", tensors)
  _fixture_names("merged", state)


GEMMA3_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "peft_reference_gemma3.json")


def _gemma3_fixture():
  if not os.path.exists(GEMMA3_FIXTURE):
    pytest.skip("tests/fixtures/peft_reference_gemma3.json not produced yet (tools/make_gemma3_peft_reference.py)")
  with open(GEMMA3_FIXTURE, encoding="utf-8") as f:
    return json.load(f)


def _fixture_names(name, tensors):
  """The Gemma 3 270M files checked in PyTorch (the fixture's names, block index as {i}, and shapes) are what the
  tiny model of test_gemma3_peft_and_merged_exports exports today, its sizes mapped to 270M's."""
  from localmoe.models import gemma3

  if not os.path.exists(GEMMA3_FIXTURE):
    return
  full, fixture = gemma3.Config(), _gemma3_fixture()
  sizes = {
    24: full.width,
    48: full.ffn_width,
    32: full.num_heads * full.head_dim,
    8: full.head_dim,
    16: full.num_kv_heads * full.head_dim,
    64: full.vocab_size,
    2: 4,
  }  # tiny -> 270M (rank 2 -> 4)
  got = {}
  for key, value in tensors.items():  # every block: the same names and shapes
    shape = [sizes[s] for s in value.shape]
    assert got.setdefault(re.sub(r"\.layers\.\d+\.", ".layers.{i}.", key), shape) == shape, key
  assert got == fixture["tensors"][name], name
  per_block = sum("{i}" in k for k in got)
  assert fixture["tensor_counts"][name] == per_block * fixture["num_layers"] + len(got) - per_block, name
  assert fixture["num_layers"] == full.num_layers


def test_gemma3_fixture_torch_differences_are_small():
  """tests/fixtures/peft_reference_gemma3.json: Gemma 3 270M's base, PEFT LoRA/DoRA and merged exports, loaded by
  transformers and PEFT, gave localmoe's logits to float32 rounding, far below what the adapters changed."""
  fixture = _gemma3_fixture()
  assert {"torch", "transformers", "peft", "jax", "flax"} <= set(fixture["versions"])
  diffs, scale = fixture["max_abs_diff"], fixture["logit_scale"]
  assert {"base", "peft_lora", "merged_lora", "peft_dora", "merged_dora"} <= set(diffs)
  for name, diff in diffs.items():
    assert diff < 2e-5 * scale, name  # float32 rounding over 18 blocks
    if name != "base":  # the adapters moved the logits far more
      assert fixture["adapter_effect"][f"{name.split('_')[1]}_changes_logits"] > 1e4 * diff, name
