"""Caption tokenizer: a thin, picklable wrapper around a `tokenizers.Tokenizer`.

The demo builds a word-level tokenizer from the StoryWorld vocabulary (lower-cased,
split at whitespace and punctuation; "<pad>" = 0, "<unk>" = 1, then the words). A real
text encoder's ``tokenizer.json`` (umT5 for Wan2.1) goes through the same class via
:meth:`CaptionTokenizer.from_file`, so the rest of the code sees one interface:
``encode(texts) -> int32 [N, max_len]`` padded with ``pad_id``.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers

from onestory_jax.data import storyworld

PAD = "<pad>"
UNK = "<unk>"


class CaptionTokenizer:
  """Fixed-length caption tokenizer.

  Grain workers are spawned processes, so instances pickle through the tokenizer's
  JSON string.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, max_len: int):
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
      raise ValueError(f"CaptionTokenizer max_len must be an int >= 1, got {max_len!r}")
    pad_id = tokenizer.token_to_id(PAD)
    if pad_id is None:
      raise ValueError(f"CaptionTokenizer: the tokenizer has no {PAD!r} token")
    self._tokenizer = tokenizer
    self._max_len = max_len
    self._pad_id = int(pad_id)

  @classmethod
  def from_vocabulary(cls, words: Sequence[str], max_len: int) -> CaptionTokenizer:
    """Word-level tokenizer: "<pad>" = 0, "<unk>" = 1, then `words` in order."""
    words = list(words)
    for w in words:
      if not isinstance(w, str) or not w or w != w.lower() or any(ch.isspace() for ch in w):
        raise ValueError("vocabulary words must be non-empty lower-case strings without "
                         f"whitespace, got {w!r}")
    if len(set(words)) != len(words):
      raise ValueError("vocabulary words must be unique")
    if PAD in words or UNK in words:
      raise ValueError(f"vocabulary words must not contain {PAD!r} or {UNK!r}")
    vocab = {PAD: 0, UNK: 1}
    vocab.update({w: i + 2 for i, w in enumerate(words)})
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([PAD, UNK])
    return cls(tok, max_len)

  @classmethod
  def from_file(cls, path: str, max_len: int) -> CaptionTokenizer:
    """Loads a ``tokenizer.json`` (e.g. one written by :meth:`save`, or umT5's)."""
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer file {path!r} does not exist (expected a tokenizer.json)")
    return cls(tokenizers.Tokenizer.from_file(path), max_len)

  def save(self, path: str) -> None:
    """Writes the tokenizer as ``tokenizer.json``."""
    self._tokenizer.save(path)

  @property
  def max_len(self) -> int:
    return self._max_len

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def unk_id(self) -> int | None:
    return self._tokenizer.token_to_id(UNK)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Token ids int32 [len(texts), max_len], truncated and padded with pad_id."""
    if isinstance(texts, str):
      raise ValueError("CaptionTokenizer.encode expects a sequence of strings, got one str")
    texts = list(texts)
    for t in texts:
      if not isinstance(t, str):
        raise ValueError(f"CaptionTokenizer.encode: every text must be a str, got {t!r}")
    out = np.full((len(texts), self._max_len), self._pad_id, dtype=np.int32)
    for i, enc in enumerate(self._tokenizer.encode_batch(texts)):
      ids = enc.ids[: self._max_len]
      out[i, : len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of a 1-D id sequence; padding and other special tokens are dropped."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
      raise ValueError(f"CaptionTokenizer.decode expects a 1-D id sequence, got shape {ids.shape}")
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def __getstate__(self) -> dict[str, Any]:
    return {"tokenizer_json": self._tokenizer.to_str(), "max_len": self._max_len}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(tokenizers.Tokenizer.from_str(state["tokenizer_json"]), state["max_len"])


def storyworld_tokenizer(max_len: int) -> CaptionTokenizer:
  """The word-level tokenizer of the StoryWorld caption vocabulary."""
  return CaptionTokenizer.from_vocabulary(storyworld.vocabulary(), max_len)
