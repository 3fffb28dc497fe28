"""Gemma 3's tokenizer, rebuilt from the GGUF vocabulary with Hugging Face `tokenizers`.

    tok = gemma3_tokenizer.Tokenizer.from_vocab(gemma3_weights.read_vocab())
    ids = tok.encode(["Hello  world"])               # [[2, ...]]: BOS first (the GGUF's add_bos_token)
    tok.decode(ids[0])                               # "Hello  world" (control tokens dropped)
    tok.token_id("<start_of_turn>")                  # 105: control tokens are inserted by id, never parsed

The GGUF (`tokenizer.ggml.model = llama`) is a SentencePiece BPE model: 262,144 pieces with scores and types
(normal, control, user-defined, byte), byte fallback, no dummy prefix, spaces written as U+2581, and no merge
list. SentencePiece's BPE merges, at each step, the adjacent pair whose concatenation is the piece of highest
score (Kudo & Richardson 2018, `bpe_model.cc`); a merge list ranked by the merged piece's score gives the same
result in `tokenizers`' BPE, which is how Hugging Face converts SentencePiece models (`SentencePieceExtractor`).
User-defined pieces (runs of spaces, newlines, tabs; stored in the GGUF with literal spaces) are matched whole
before BPE, as SentencePiece's prefix matcher does. The built tokenizer is cached as `tokenizer.json` beside the
cached weights, so it is built once (~10 s).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from localmoe.data import cache
from localmoe.models import gemma3_weights

SPACE = "\u2581"  # SentencePiece's whitespace symbol
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types
TOKENIZER_FILE = "tokenizer.json"


def build(vocab: dict):
  """A `tokenizers.Tokenizer` equivalent to the SentencePiece BPE model the vocabulary describes."""
  from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers  # pylint: disable=import-outside-toplevel

  tokens, scores, types = vocab["tokens"], vocab["scores"], vocab["types"]
  pieces = [t.replace(" ", SPACE) if k == USER_DEFINED else t for t, k in zip(tokens, types)]
  ids = {}
  for i, piece in enumerate(pieces):
    ids.setdefault(piece, i)
  mergeable = {p: i for i, p in enumerate(pieces) if types[i] == NORMAL}
  merges = []
  for piece, i in mergeable.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in mergeable and right in mergeable:
        merges.append((-scores[i], i, mergeable[left], mergeable[right], left, right))
  merges.sort()
  model = models.BPE(
    vocab=ids,
    merges=[(m[4], m[5]) for m in merges],
    unk_token=tokens[vocab["unk_id"]],
    byte_fallback=True,
    fuse_unk=True,
  )
  tokenizer = HFTokenizer(model)
  tokenizer.normalizer = normalizers.Replace(" ", SPACE)
  if vocab.get("add_space_prefix"):
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
  tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
  tokenizer.add_tokens(
    [
      AddedToken(pieces[i], normalized=True, special=False, single_word=False)
      for i, k in enumerate(types)
      if k == USER_DEFINED
    ]
  )
  return tokenizer


class Tokenizer:
  """Text <-> Gemma 3 token ids: `encode` (BOS first, as the GGUF asks), `decode`, special ids by name."""

  def __init__(self, hf_tokenizer, vocab: dict):
    self.hf = hf_tokenizer  # the `tokenizers.Tokenizer`
    self.vocab_size = len(vocab["tokens"])
    self.bos_id, self.eos_id = int(vocab["bos_id"]), int(vocab["eos_id"])
    self.pad_id, self.unk_id = int(vocab["pad_id"]), int(vocab["unk_id"])
    self.add_bos = bool(vocab["add_bos"])
    types = np.asarray(vocab["types"])
    self.control_ids = frozenset(np.flatnonzero(types == CONTROL).tolist())
    self._tokens = vocab["tokens"]
    self._by_name = {t: i for i, t in enumerate(self._tokens) if types[i] in (CONTROL, USER_DEFINED)}

  @classmethod
  def from_vocab(cls, vocab: dict | None = None, data_dir: str | os.PathLike[str] | None = None) -> "Tokenizer":
    """Builds the tokenizer (or reads it from `tokenizer.json` in the weights' cache folder)."""
    from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel

    vocab = gemma3_weights.read_vocab(data_dir) if vocab is None else vocab
    path = cache.data_dir(data_dir) / gemma3_weights.SUBDIR / TOKENIZER_FILE
    hf = None
    if path.exists():
      try:
        hf = HFTokenizer.from_file(str(path))
        if hf.get_vocab_size(with_added_tokens=True) != len(vocab["tokens"]):
          hf = None
      except Exception:  # pylint: disable=broad-except  -- an unreadable cache file is rebuilt below
        hf = None
    if hf is None:
      hf = build(vocab)
      _save(hf, path)
    return cls(hf, vocab)

  def token_id(self, token: str) -> int:
    """The id of a control or user-defined token by its text, e.g. "<start_of_turn>" -> 105."""
    if token not in self._by_name:
      raise ValueError(
        f"token={token!r} is not a control or user-defined token of the vocabulary (e.g. "
        "'<start_of_turn>', '<end_of_turn>', '<eos>')."
      )
    return self._by_name[token]

  def encode(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
    """Token ids of each text (BOS first unless add_bos=False); control-token text is not parsed."""
    if isinstance(texts, str):
      raise TypeError("texts must be a sequence of strings, got one string; wrap it in a list.")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
      raise TypeError(f"texts[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a str.")
    bos = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []
    return [bos + e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Sequence[int], skip_control: bool = True) -> str:
    """Text of the ids; control tokens (BOS, EOS, pad, <start_of_turn>, ...) are dropped unless skip_control=False."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1}).")
    if skip_control:
      ids = [i for i in ids if i not in self.control_ids]
    return self.hf.decode(ids, skip_special_tokens=False)

  def tokens(self, ids: Sequence[int]) -> list[str]:
    """The pieces of the ids, as the GGUF writes them."""
    return [self._tokens[int(i)] for i in ids]


def _save(hf, path: Path) -> None:
  try:
    cache.atomic_write_bytes(path, hf.to_str().encode("utf-8"))
  except OSError as err:
    cache.progress(f"warning: could not cache {path} ({err}); the tokenizer will be rebuilt next time")
