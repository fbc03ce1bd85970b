"""Tests of the tokenizer interface and the sentencepiece tokenizer on the tiny world."""

import random
import re
import time

import numpy as np
import pytest

from r1jax.data import tinyworld as tw
from r1jax.data import tokenizer as tk
from r1jax.data.templates import r1_zero_prompt

_NUM_DOCS = 20_000  # the corpus size the tiny pretraining run uses


@pytest.fixture(scope="module")
def corpus():
  return tw.pretraining_corpus(_NUM_DOCS, seed=0)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  """(tokenizer, training seconds) for a tokenizer trained on the corpus."""
  start = time.perf_counter()
  path = tk.train_sentencepiece(corpus, tmp_path_factory.mktemp("spm") / "tw")
  seconds = time.perf_counter() - start
  return tk.load_tokenizer(path), seconds


@pytest.fixture(scope="module")
def tok(trained):
  return trained[0]


def _pieces(tok, text):
  return [tok.id_to_piece(i) for i in tok.encode(text)]


def test_training_is_fast_and_fills_the_vocabulary(trained):
  tok, seconds = trained
  assert seconds < 10, seconds
  assert tok.vocab_size == tk.DEFAULT_VOCAB_SIZE


def test_training_is_deterministic(corpus, tok, tmp_path):
  other = tk.load_tokenizer(tk.train_sentencepiece(corpus, tmp_path / "again"))
  pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
  assert pieces == [other.id_to_piece(i) for i in range(other.vocab_size)]


def test_implements_the_interface_with_fixed_special_ids(tok):
  assert isinstance(tok, tk.Tokenizer)
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
  assert tok.encode("") == []


def test_tags_are_single_tokens_anywhere(tok):
  for tag in tk.TAGS:
    tag_id = tok.piece_to_id(tag)
    assert tag_id != tok.unk_id
    assert tok.encode(tag) == [tag_id]
    for text in (f"x{tag}", f"{tag}x", f"7{tag}.", f" {tag} "):
      assert tag_id in tok.encode(text), (text, _pieces(tok, text))
  assert _pieces(tok, "<answer>36</answer>") == ["<answer>", "3", "6", "</answer>"]


def test_digits_are_split(tok):
  for i in range(tok.vocab_size):
    piece = tok.id_to_piece(i)
    if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):  # byte-fallback pieces
      continue
    if re.search(r"\d", piece):  # a digit only ever comes alone
      assert re.fullmatch(r"\d", piece), piece
  assert _pieces(tok, " get 1234 .") == ["▁get", "▁", "1", "2", "3", "4", "▁."]


def test_every_tiny_world_word_is_one_token(tok):
  # Reflection sentences appear only in corpora built with self_correct_fraction > 0.
  reflection = {w for text in tw.REFLECTIONS.values() for w in text.split()}
  for word in (tw.EN_WORDS | tw.LA_WORDS) - reflection:
    assert len(tok.encode(" " + word)) == 1, (word, _pieces(tok, " " + word))


def test_round_trip(tok, corpus):
  for doc in corpus[:2000]:
    assert tok.decode(tok.encode(doc)) == doc
  for text in ("  two  spaces\tand a tab\n\nnewlines ", "héllo ∑ 日本 🙂", "x</answer>"):
    assert tok.decode(tok.encode(text)) == text, text


def test_decode_skips_pad_bos_eos_and_accepts_arrays(tok):
  text = "<think> 3 + 4 </think>"
  ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id, tok.pad_id, tok.pad_id]
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids, np.int32)) == text


def test_prompt_and_completion_tokenize_the_same_apart_as_joined(tok):
  rng = random.Random(0)
  for problem in tw.generate_problems("heldout", 200, seed=0):
    prompt = r1_zero_prompt(problem.question)
    completion = tw.r1_zero_completion(problem, "mixed", rng)
    assert tok.encode(prompt) + tok.encode(completion) == tok.encode(prompt + completion)


def test_documents_fit_in_256_tokens(tok):
  """The longest documents (level 4, with the template) stay well under 256."""
  rng = random.Random(0)
  problems = tw.generate_problems("train", 1000, seed=1, levels=(4,))
  lengths = [len(tok.encode(make(p, mode, rng)))
             for p in problems for mode in tw.MODES
             for make in (tw.plain_document, tw.r1_zero_document)]
  assert max(lengths) < 224, max(lengths)


def test_load_tokenizer_errors_name_the_path(tmp_path):
  with pytest.raises(ValueError, match="tok.json"):
    tk.load_tokenizer(tmp_path / "tok.json")
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tk.load_tokenizer(tmp_path / "missing.model")
