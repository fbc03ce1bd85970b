"""The Hugging Face tokenizer path against transformers' own tokenizer, on
tokenizer.json files trained here (byte-level BPE like Qwen2/Llama-3, and a
Metaspace BPE like sentencepiece conversions) on GSM8K train questions."""

import json
import os
import shutil

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from r1jax.data.hf_tokenizer import (  # pylint: disable=wrong-import-position
    HFTokenizer, TokenizerError, load_any_tokenizer)
from r1jax.data.templates import (  # pylint: disable=wrong-import-position
    MATH_INSTRUCTION, R1_BOS, r1_chat_prompt, r1_zero_prompt)
from r1jax.data.tokenizer import Tokenizer  # pylint: disable=wrong-import-position
from tests.conftest import SHARED_DATA  # pylint: disable=wrong-import-position

BOS, EOS, PAD = R1_BOS, "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
CHAT_TOKENS = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]


def _questions(split: str) -> list[str]:
  path = os.path.join(SHARED_DATA, "gsm8k", f"{split}.jsonl")
  if not os.path.exists(path):
    pytest.skip("../shared/data is not beside the repo")
  return [json.loads(line)["question"] for line in open(path, encoding="utf-8")]


def _train(kind: str, directory, config: dict) -> str:
  from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  specials = [BOS, EOS, PAD]
  if kind == "byte_bpe":
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  else:  # sentencepiece-style: "▁" for spaces, <unk> for unseen characters
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials + ["<unk>"],
                                  show_progress=False)
  tok.train_from_iterator(_questions("train"), trainer)
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in CHAT_TOKENS])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return str(directory)


R1_CONFIG = dict(bos_token={"content": BOS, "__type": "AddedToken"}, eos_token=EOS,
                 pad_token=PAD, add_bos_token=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module", params=["byte_bpe", "metaspace_bpe"])
def tokenizer_dir(request, tmp_path_factory):
  return _train(request.param, tmp_path_factory.mktemp(request.param), R1_CONFIG)


def test_gsm8k_questions_encode_and_decode_like_transformers(tokenizer_dir):
  ours = load_any_tokenizer(tokenizer_dir)
  assert isinstance(ours, HFTokenizer) and isinstance(ours, Tokenizer)
  theirs = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"), bos_token=BOS,
      eos_token=EOS, pad_token=PAD)
  auto = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  questions = _questions("test")
  assert len(questions) == 1319
  want = theirs(questions, add_special_tokens=False)["input_ids"]
  assert auto(questions, add_special_tokens=False)["input_ids"] == want
  for q, ids in zip(questions, want):
    assert ours.encode(q) == ids, q
    assert ours.decode(ids) == theirs.decode(ids), q
  assert sum(len(ids) for ids in want) > 50_000  # real token streams, not a degenerate split
  lossless = sum(ours.decode(ours.encode(q)) == q for q in questions)
  # Byte-level BPE is lossless; the Metaspace one loses characters it never saw (<unk>).
  assert lossless == len(questions) if "byte_bpe" in tokenizer_dir else lossless > 1000


def test_special_tokens_and_chat_format_match_transformers(tokenizer_dir):
  ours = HFTokenizer(tokenizer_dir)
  theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
      theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
  assert ours.vocab_size == len(theirs)
  prompt = r1_chat_prompt("Natalia sold 48 clips.")
  assert prompt == ("<｜begin▁of▁sentence｜><｜User｜>Natalia sold 48 clips.\n"
                    "Please reason step by step, and put your final answer within \\boxed{}."
                    "<｜Assistant｜><think>\n")
  ids = ours.encode(prompt)
  assert ids == theirs.encode(prompt, add_special_tokens=False)
  assert ids[0] == ours.bos_id
  for piece in CHAT_TOKENS[:3]:  # the chat markers are single tokens
    assert ours.piece_to_id(piece) in ids
    assert ours.id_to_piece(ours.piece_to_id(piece)) == piece
  completion = ours.encode("so 72.\n</think>\n\nThe answer is \\boxed{72}.") + [ours.eos_id]
  padded = ids + completion + [ours.pad_id] * 3
  specials = {ours.bos_id, ours.eos_id, ours.pad_id}
  assert ours.decode(padded) == theirs.decode([i for i in padded if i not in specials])
  if "<unk>" not in theirs.convert_ids_to_tokens(padded):  # transformers skips <unk> too
    assert ours.decode(padded) == theirs.decode(padded, skip_special_tokens=True)
  assert "<｜User｜>" in ours.decode(padded) and BOS not in ours.decode(padded)


def test_templates():
  assert r1_chat_prompt("q", instruction="", bos=None) == "<｜User｜>q<｜Assistant｜><think>\n"
  assert MATH_INSTRUCTION.endswith("within \\boxed{}.")
  assert r1_zero_prompt("1 + 2").endswith("User: 1 + 2. Assistant:")  # unchanged


def _with_config(tokenizer_dir, directory, config: dict) -> str:
  os.makedirs(directory)
  shutil.copy(os.path.join(tokenizer_dir, "tokenizer.json"), directory)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return str(directory)


def test_missing_specials_and_bad_pieces(tokenizer_dir, tmp_path):
  # Qwen2-like: no bos, no pad -> bos -1, pad falls back to eos.
  tok = HFTokenizer(_with_config(tokenizer_dir, tmp_path / "qwen", dict(eos_token=EOS)))
  assert (tok.bos_id, tok.pad_id) == (-1, tok.eos_id)
  with pytest.raises(TokenizerError, match="not a single token"):
    tok.piece_to_id("</answer>")
  with pytest.raises(TokenizerError, match="eos_token"):
    HFTokenizer(_with_config(tokenizer_dir, tmp_path / "noeos", dict(bos_token=BOS)))
  with pytest.raises(TokenizerError) as e:
    HFTokenizer(_with_config(tokenizer_dir, tmp_path / "typo", dict(eos_token="</s>")))
  assert "tokenizer_config.json" in str(e.value) and "eos_token" in str(e.value)


def test_load_any_tokenizer_picks_by_file(tokenizer_dir, tmp_path):
  from r1jax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece  # pylint: disable=import-outside-toplevel
  model = train_sentencepiece(["compute 1 + 2 <think> so </think> <answer> 3 </answer>"] * 50,
                              tmp_path / "sp" / "tokenizer", vocab_size=300)
  assert isinstance(load_any_tokenizer(model), SentencePieceTokenizer)
  assert isinstance(load_any_tokenizer(tmp_path / "sp"), SentencePieceTokenizer)
  json_file = os.path.join(tokenizer_dir, "tokenizer.json")
  assert isinstance(load_any_tokenizer(json_file), HFTokenizer)
  with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
    load_any_tokenizer(tmp_path)
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(TokenizerError, match="bad.json"):
    load_any_tokenizer(tmp_path / "bad.json")
