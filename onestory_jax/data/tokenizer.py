"""Caption tokenizer: a thin, picklable wrapper around a `tokenizers.Tokenizer`.

The demo builds a word-level tokenizer from the StoryWorld vocabulary (lower-cased,
split at whitespace and punctuation; "<pad>" = 0, "<unk>" = 1, then the words). A real
text encoder's ``tokenizer.json`` goes through the same interface
(:meth:`CaptionTokenizer.from_file` loads any file written by :meth:`CaptionTokenizer.save`):
``encode(texts) -> int32 [N, max_len]`` padded with ``pad_id``.

For Wan (umT5), :func:`load_umt5_tokenizer` loads the release's ``tokenizer/tokenizer.json``
into a :class:`UMT5Tokenizer`, which follows diffusers' Wan pipelines
(``_get_t5_prompt_embeds`` in pipeline_wan_i2v.py): each prompt is cleaned (:func:`clean_prompt`:
ftfy's text repair, HTML entities unescaped twice, whitespace runs collapsed), tokenized, cut
to ``max_len - 1`` pieces, given the EOS token ``</s>`` (as T5's tokenizer appends it) and
padded with ``<pad>`` (id 0) to ``max_len`` (512 in Wan); the attention mask marks the real
tokens, EOS included.
"""

from __future__ import annotations

import html
import os
import re
from typing import Any, Sequence

import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers

from onestory_jax.data import storyworld

PAD = "<pad>"
UNK = "<unk>"
EOS = "</s>"


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
        raise ValueError("vocabulary words must be non-empty lower-case strings without " f"whitespace, got {w!r}")
    if len(set(words)) != len(words):
      raise ValueError("vocabulary words must be unique")
    if PAD in words or UNK in words:
      raise ValueError(f"vocabulary words must not contain {PAD!r} or {UNK!r}")
    vocab = {PAD: 0, UNK: 1}
    vocab.update({w: i + 2 for i, w in enumerate(words)})
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
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

  def _checked(self, texts: Sequence[str]) -> list[str]:
    """``texts`` as a list; raises ValueError on one str or a non-str item."""
    who = f"{type(self).__name__}.encode"
    if isinstance(texts, str):
      raise ValueError(f"{who} expects a sequence of strings, got one str")
    texts = list(texts)
    for t in texts:
      if not isinstance(t, str):
        raise ValueError(f"{who}: every text must be a str, got {t!r}")
    return texts

  def _pieces(self, texts: Sequence[str]) -> list[list[int]]:
    """The untruncated token ids of each text (what :meth:`encode` cuts to :meth:`capacity`)."""
    return [enc.ids for enc in self._tokenizer.encode_batch(self._checked(texts))]

  def capacity(self) -> int:
    """How many of a text's tokens fit; the rest are dropped."""
    return self._max_len

  def dropped(self, texts: Sequence[str]) -> list[int]:
    """How many tokens of each text :meth:`encode` drops (0 where the text fits)."""
    return [max(len(ids) - self.capacity(), 0) for ids in self._pieces(texts)]

  def unknown_words(self, text: str) -> list[str]:
    """The words of ``text`` that the vocabulary lacks (each becomes ``<unk>``), in order, without repeats."""
    unk = self.unk_id
    if unk is None:
      return []
    (enc,) = self._tokenizer.encode_batch(self._checked([text]))
    words = [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk]
    return list(dict.fromkeys(words))

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Token ids int32 [len(texts), max_len], truncated and padded with pad_id."""
    pieces = self._pieces(texts)
    out = np.full((len(pieces), self._max_len), self._pad_id, dtype=np.int32)
    for i, ids in enumerate(pieces):
      ids = ids[: self._max_len]
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


# ---------------------------------------------------------------------------- umT5 (Wan)
def clean_prompt(text: str) -> str:
  """Wan's prompt cleaning: ftfy's text repair, HTML unescaped twice, whitespace collapsed.

  Same steps as diffusers' ``prompt_clean`` (``whitespace_clean(basic_clean(text))``) in the Wan
  pipelines. Needs the ``ftfy`` package (the Wan pipelines need it too).
  """
  if not isinstance(text, str):
    raise ValueError(f"clean_prompt: expected a str, got {text!r}")
  try:
    import ftfy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "clean_prompt needs the 'ftfy' package (Wan's prompt cleaning); " "pip install ftfy==6.3.1"
    ) from e
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer(CaptionTokenizer):
  """A T5-family ``tokenizer.json`` with Wan's prompt handling.

  ``encode`` / :meth:`encode_with_mask` clean each prompt (unless ``clean=False``), tokenize it
  without the file's post-processor, keep at most ``max_len - 1`` pieces, append EOS and pad
  with ``<pad>``. This is what transformers' T5 tokenizer returns for
  ``tokenizer(prompts, padding='max_length', max_length=max_len, truncation=True,
  add_special_tokens=True, return_attention_mask=True)``.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, max_len: int = 512, clean: bool = True):
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
      raise ValueError(f"UMT5Tokenizer: max_len must be an int >= 2 (room for EOS), got {max_len!r}")
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())  # private copy
    tokenizer.no_truncation()  # a tokenizer.json may carry its own; lengths are ours to set
    tokenizer.no_padding()
    super().__init__(tokenizer, max_len)
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None:
      raise ValueError(f"UMT5Tokenizer: the tokenizer has no {EOS!r} (EOS) token")
    self._eos_id = int(eos_id)
    self._clean = bool(clean)

  @property
  def eos_id(self) -> int:
    return self._eos_id

  def _pieces(self, texts: Sequence[str]) -> list[list[int]]:
    texts = self._checked(texts)
    if self._clean:
      texts = [clean_prompt(t) for t in texts]
    return [enc.ids for enc in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

  def capacity(self) -> int:
    return self._max_len - 1  # and EOS

  def encode_with_mask(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [N, max_len] and the attention mask bool [N, max_len]."""
    pieces = self._pieces(texts)
    ids = np.full((len(pieces), self._max_len), self._pad_id, dtype=np.int32)
    mask = np.zeros((len(pieces), self._max_len), dtype=bool)
    for i, piece in enumerate(pieces):
      row = piece[: self.capacity()] + [self._eos_id]
      ids[i, : len(row)] = row
      mask[i, : len(row)] = True
    return ids, mask

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Token ids int32 [N, max_len] (see :meth:`encode_with_mask`)."""
    return self.encode_with_mask(texts)[0]

  def __getstate__(self) -> dict[str, Any]:
    return {**super().__getstate__(), "clean": self._clean}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(tokenizers.Tokenizer.from_str(state["tokenizer_json"]), state["max_len"], state["clean"])


def load_umt5_tokenizer(path: str, max_len: int = 512, clean: bool = True) -> UMT5Tokenizer:
  """Loads umT5's tokenizer from a release's ``tokenizer/`` directory or its ``tokenizer.json``.

  Args:
    path: the directory holding ``tokenizer.json`` (a diffusers Wan release's ``tokenizer/``),
      or the file itself. Only ``tokenizer.json`` is read (no sentencepiece model, no pickle).
    max_len: the fixed prompt length (512 in Wan, ``config.text_encoder.text_len``).
    clean: apply :func:`clean_prompt` to every prompt (Wan does).

  Raises:
    ValueError: the file is missing or lacks the ``<pad>`` / ``</s>`` tokens, or ``max_len < 2``.
  """
  file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise ValueError(
        f"umT5 tokenizer: {file!r} does not exist (expected the release's "
        "tokenizer/ directory holding tokenizer.json, or that file)"
    )
  try:
    tok = tokenizers.Tokenizer.from_file(file)
  except Exception as e:  # tokenizers raises its own exception type for a malformed file
    raise ValueError(f"umT5 tokenizer: {file!r} is not a valid tokenizer.json: {e}") from e
  return UMT5Tokenizer(tok, max_len, clean)


if __name__ == "__main__":
  # python -m onestory_jax.data.tokenizer: the words that the demo's captions may use (any other becomes <unk>).
  print("\n".join(storyworld.vocabulary()))
