"""Packing and the deterministic, resumable batch order."""

import numpy as np
import pytest

from r1jax.data.packing import PackedDataset, pack_documents


def test_pack_segments_positions_and_weights():
  docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
  out = pack_documents(docs, seq_len=8, bos_id=2, eos_id=3)
  # Row 0 holds docs 0 and 1 (5 + 4 = 9 = seq_len + 1 tokens); doc 2 starts row 1.
  np.testing.assert_array_equal(out["tokens"][0], [2, 10, 11, 12, 3, 2, 20, 21])
  np.testing.assert_array_equal(out["targets"][0], [10, 11, 12, 3, 2, 20, 21, 3])
  np.testing.assert_array_equal(out["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(out["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2])
  # No loss on predicting the next document's BOS from this one's EOS.
  np.testing.assert_array_equal(out["loss_weights"][0], [1, 1, 1, 1, 0, 1, 1, 1])
  np.testing.assert_array_equal(out["tokens"][1][:6], [2, 30, 31, 32, 33, 3])
  np.testing.assert_array_equal(out["loss_weights"][1], [1, 1, 1, 1, 1, 0, 0, 0])
  assert out["segment_ids"][1][-1] == 0 and out["positions"].min() == 0


def test_every_document_token_is_a_target_exactly_once():
  rng = np.random.default_rng(0)
  docs = [list(rng.integers(4, 100, rng.integers(1, 30))) for _ in range(200)]
  out = pack_documents(docs, seq_len=64, bos_id=2, eos_id=3)
  assert out["loss_weights"].sum() == sum(len(d) + 1 for d in docs)  # tokens + eos


def test_too_long_document_names_it():
  with pytest.raises(ValueError, match="document 1 has 12 tokens"):
    pack_documents([[5], list(range(4, 14))], seq_len=8, bos_id=2, eos_id=3)


def test_batches_are_a_pure_function_of_the_index():
  arrays = {"tokens": np.arange(100)[:, None]}
  a, b = PackedDataset(arrays, 8, seed=1), PackedDataset(arrays, 8, seed=1)
  for i in (0, 5, 12, 13, 40):
    np.testing.assert_array_equal(a.batch(i)["tokens"], b.batch(i)["tokens"])
  # One epoch (12 batches of 8 from 100 rows) never repeats a row.
  epoch = np.concatenate([a.batch(i)["tokens"][:, 0] for i in range(12)])
  assert len(set(epoch.tolist())) == 96
  assert not np.array_equal(a.batch(0)["tokens"], a.batch(12)["tokens"])  # reshuffled
  assert not np.array_equal(a.batch(0)["tokens"], PackedDataset(arrays, 8, 2).batch(0)["tokens"])


def test_best_fit_packing_leaves_little_padding():
  rng = np.random.default_rng(0)
  docs = [list(rng.integers(4, 100, rng.integers(48, 150))) for _ in range(2000)]
  out = pack_documents(docs, seq_len=256, bos_id=2, eos_id=3)
  fill = (out["segment_ids"] > 0).mean()
  assert fill > 0.9, fill
  assert out["loss_weights"].sum() == sum(len(d) + 1 for d in docs)
  # Next fit (one open row) wastes far more on the same documents.
  next_fit = pack_documents(docs, seq_len=256, bos_id=2, eos_id=3, open_rows=1)
  assert (next_fit["segment_ids"] > 0).mean() < fill - 0.1


def test_prompt_tokens_are_not_targets():
  docs = [[5, 6, 7, 8], [9, 10, 11]]
  out = pack_documents(docs, seq_len=16, bos_id=2, eos_id=3, prompt_lengths=[2, 0])
  plain = pack_documents(docs, seq_len=16, bos_id=2, eos_id=3)
  np.testing.assert_array_equal(out["tokens"], plain["tokens"])
  trained = out["targets"][out["loss_weights"] > 0].tolist()
  # doc 0: prompt 5 6 untrained, completion 7 8 + eos; doc 1: everything + eos.
  assert sorted(trained) == sorted([7, 8, 3, 9, 10, 11, 3])
  assert plain["loss_weights"].sum() == 9  # without prompts: 5 6 7 8 eos 9 10 11 eos
  with pytest.raises(ValueError, match="prompt length 5"):
    pack_documents(docs, seq_len=16, bos_id=2, eos_id=3, prompt_lengths=[5, 0])
