"""Hugging Face tokenizers (tokenizer.json) behind r1jax's `Tokenizer` interface.

  tok = load_any_tokenizer("/ckpt/DeepSeek-R1-Distill-Qwen-1.5B")  # or a .model / .json file
  ids = tok.encode(r1_chat_prompt("1 + 1 = ?", bos=tok.bos_token))

Special tokens (bos/eos/pad) come from tokenizer_config.json (else
special_tokens_map.json) beside tokenizer.json. A tokenizer without a pad
token pads with its eos id (pad slots are masked everywhere in r1jax, so the
id only has to exist); one without bos (Qwen2) has bos_id -1, as sentencepiece
reports disabled ids.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from r1jax.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
SENTENCEPIECE_FILE = "tokenizer.model"


class TokenizerError(UserError, ValueError):
  """A tokenizer file that cannot be read, or a piece not in the vocabulary."""


def _token_text(value) -> Optional[str]:
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise TokenizerError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
  if not isinstance(data, dict):
    raise TokenizerError(f"{path}: expected a JSON object")
  return data


class HFTokenizer:
  """A `Tokenizer` (r1jax.data.tokenizer) backed by a Hugging Face tokenizer.json."""

  def __init__(self, path: str | os.PathLike):
    from tokenizers import Tokenizer as _Tokenizer  # pylint: disable=import-outside-toplevel
    path = os.fspath(path)
    directory, file = (path, os.path.join(path, TOKENIZER_FILE)) if os.path.isdir(path) else (
        os.path.dirname(path), path)
    if not os.path.isfile(file):
      raise TokenizerError(f"{file}: no such tokenizer file")
    try:
      self._tok = _Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on bad files
      raise TokenizerError(f"{file}: not a Hugging Face tokenizer ({e})") from None
    self.path = file
    config_path = os.path.join(directory, CONFIG_FILE)
    config = {**_read_json(os.path.join(directory, SPECIAL_TOKENS_FILE)), **_read_json(config_path)}
    self.config = config

    def special(field: str) -> tuple[Optional[str], int]:
      text = _token_text(config.get(field))
      if text is None:
        return None, -1
      i = self._tok.token_to_id(text)
      if i is None:
        raise TokenizerError(f"{config_path}: field {field!r} is {text!r}, which is not a "
                             f"token of {file}")
      return text, i

    self.bos_token, self._bos = special("bos_token")
    self.eos_token, self._eos = special("eos_token")
    self.pad_token, self._pad = special("pad_token")
    if self._eos < 0:
      raise TokenizerError(f"{config_path}: field 'eos_token' missing (generation needs an "
                           "end-of-sequence token)")
    if self._pad < 0:
      self.pad_token, self._pad = self.eos_token, self._eos
    # transformers v5 skips its text clean-up for BPE models; other models honour the flag.
    self._clean_up = (bool(config.get("clean_up_tokenization_spaces", False))
                      and type(self._tok.model).__name__ != "BPE")

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS (special tokens written in the text,
    e.g. a chat template's, become their ids)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, skipping pad, BOS and EOS (other special tokens are kept)."""
    skip = {self._pad, self._bos, self._eos}
    text = self._tok.decode([int(i) for i in ids if int(i) not in skip],
                            skip_special_tokens=False)
    return _clean_up(text) if self._clean_up else text

  def id_to_piece(self, i: int) -> str:
    piece = self._tok.id_to_token(int(i))
    if piece is None:
      raise TokenizerError(f"id {i} is outside {self.path}'s vocabulary of {self.vocab_size}")
    return piece

  def piece_to_id(self, piece: str) -> int:
    """Id of the single token `piece`; TokenizerError if it is not one token
    (a stop piece that silently mapped to <unk> would stop at every unknown)."""
    i = self._tok.token_to_id(piece)
    if i is None:
      raise TokenizerError(f"{piece!r} is not a single token of {self.path}")
    return i


def _clean_up(text: str) -> str:
  """transformers' `clean_up_tokenization` (for WordPiece-style decoders)."""
  for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
               (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
    text = text.replace(a, b)
  return text


def load_any_tokenizer(path: str | os.PathLike):
  """A sentencepiece `.model`, a tokenizer.json, or a directory holding either
  (tokenizer.json first, as Hugging Face checkpoints ship both sometimes)."""
  from r1jax.data.tokenizer import SentencePieceTokenizer  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
      return HFTokenizer(path)
    if os.path.isfile(os.path.join(path, SENTENCEPIECE_FILE)):
      return SentencePieceTokenizer(os.path.join(path, SENTENCEPIECE_FILE))
    raise TokenizerError(f"{path}: no {TOKENIZER_FILE} or {SENTENCEPIECE_FILE}")
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  if path.endswith(".json"):
    return HFTokenizer(path)
  raise TokenizerError(f"{path}: unknown tokenizer format (expected a sentencepiece .model, "
                       f"a {TOKENIZER_FILE}, or a directory with one)")
