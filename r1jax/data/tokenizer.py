"""Tokenizers: the interface the rest of r1jax uses, and a sentencepiece one.

  path = train_sentencepiece(pretraining_corpus(20_000, seed=0), "/tmp/tw")
  tok = load_tokenizer(path)
  ids = tok.encode("<think> 12 + 3 </think>")
"""

from __future__ import annotations

import os
from typing import Iterable, Protocol, Sequence, runtime_checkable

import sentencepiece as spm

# Reasoning tags are pieces of their own, wherever they appear in the text.
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# The tiny-world corpus needs ~290 pieces beyond the 256 byte-fallback ones for
# every word to be a single piece; 640 = 5 * 128 leaves a margin.
DEFAULT_VOCAB_SIZE = 640


@runtime_checkable
class Tokenizer(Protocol):
  """What r1jax needs from a tokenizer (sentencepiece or Hugging Face)."""

  @property
  def vocab_size(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  @property
  def bos_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS."""
    ...

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, skipping pad, BOS and EOS."""
    ...

  def id_to_piece(self, i: int) -> str: ...

  def piece_to_id(self, piece: str) -> int: ...


class SentencePieceTokenizer:
  """A `Tokenizer` backed by a sentencepiece model file."""

  def __init__(self, model_path: str | os.PathLike):
    self.model_path = os.fspath(model_path)
    if not os.path.isfile(self.model_path):
      raise FileNotFoundError(f"no sentencepiece model at {self.model_path}")
    self._sp = spm.SentencePieceProcessor(model_file=self.model_path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS or EOS."""
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; pad, BOS and EOS (control pieces) decode to nothing."""
    # int(): accept numpy / jax integer arrays, which sentencepiece rejects.
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    """Id of `piece`; the unk id for a piece not in the vocabulary."""
    return self._sp.piece_to_id(piece)


def train_sentencepiece(texts: Iterable[str], model_prefix: str | os.PathLike, *,
                        vocab_size: int = DEFAULT_VOCAB_SIZE,
                        seed: int = 0) -> str:
  """Trains a BPE sentencepiece model on `texts`, in-process and deterministically.

  Args:
    texts: training documents; each may contain newlines.
    model_prefix: writes `{model_prefix}.model` and `{model_prefix}.vocab`.
    vocab_size: vocabulary size, including 256 byte pieces (smaller only if the
      text has too few merges to fill it).
    seed: seed of sentencepiece's random generator.

  Returns:
    The path of the `.model` file.
  """
  model_prefix = os.fspath(model_prefix)
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  spm.set_random_generator_seed(seed)
  # minloglevel=2 silences sentencepiece's progress log (errors still raise);
  # its `logstream` redirect needs sys.stderr.fileno(), which notebooks lack.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_prefix=model_prefix,
      # BPE: unigram pruning on this small, repetitive corpus stops at ~400
      # pieces and splits common words, doubling document lengths.
      model_type="bpe",
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      # Plain documents have line breaks: "\n" gets a piece, not a byte.
      user_defined_symbols=list(TAGS) + ["\n"],
      split_digits=True,
      byte_fallback=True,  # any text encodes, with bytes for unseen characters
      character_coverage=1.0,
      # Identity normalisation and no whitespace folding or dummy prefix: decode
      # inverts encode exactly, and a prompt/completion split at a space
      # tokenizes the same apart as joined.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      num_threads=1,
      minloglevel=2,
  )
  return model_prefix + ".model"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Loads the tokenizer at `path` (a sentencepiece `.model` file)."""
  path = os.fspath(path)
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  raise ValueError(f"unknown tokenizer format (expected a sentencepiece .model "
                   f"file): {path}")
