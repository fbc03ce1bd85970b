"""Packing tokenised documents into fixed-length rows, and a deterministic,
resumable batch order (batch i is a pure function of the seed and i)."""

from __future__ import annotations

import numpy as np


def pack_documents(docs: list[list[int]], seq_len: int, *, bos_id: int, eos_id: int,
                   pad_id: int = 0, open_rows: int = 64,
                   prompt_lengths: list[int] | None = None) -> dict[str, np.ndarray]:
  """Packs `[bos] + doc + [eos]` sequences into rows of seq_len + 1 (best fit).

  Each document goes to the open row it fills best (the one with the least
  room that still fits it); up to `open_rows` rows stay open, so documents
  stay roughly in order and rows are nearly full: on the tiny-world corpus
  (20-150-token documents, 256-token rows) next fit (`open_rows=1`) leaves
  20% padding and best fit 4%.

  Returns arrays of shape [R, seq_len] ready for next-token training:
  `tokens` (inputs), `targets`, `segment_ids` (1, 2, ... per document; 0 pad),
  `positions` (restart at 0 per document) and `loss_weights` (1 where the
  target belongs to the same document as the input token).

  `prompt_lengths` (SFT on prompt/completion pairs): the first
  `prompt_lengths[i]` tokens of document i are the prompt, and targets inside
  it get weight 0 (the loss is on the completion and its EOS only).
  """
  if prompt_lengths is not None and len(prompt_lengths) != len(docs):
    raise ValueError(f"{len(prompt_lengths)} prompt lengths for {len(docs)} documents")
  width = seq_len + 1
  rows: list[list[int]] = []
  segs: list[list[int]] = []
  trained: list[list[bool]] = []  # per token: may it be a target
  open_: list[int] = []  # indices of rows still accepting documents
  for i, doc in enumerate(docs):
    seq = [bos_id, *doc, eos_id]
    if len(seq) > width:
      raise ValueError(f"document {i} has {len(seq)} tokens (with bos/eos), more than "
                       f"seq_len + 1 = {width}; raise data.seq_len or shorten it")
    fits = [r for r in open_ if width - len(rows[r]) >= len(seq)]
    if fits:
      r = min(fits, key=lambda r: width - len(rows[r]))
    else:
      r = len(rows)
      rows.append([])
      segs.append([])
      trained.append([])
      open_.append(r)
      if len(open_) > open_rows:  # close the fullest row
        open_.remove(max(open_, key=lambda q: len(rows[q])))
    seg_id = (segs[r][-1] + 1) if segs[r] else 1
    rows[r] += seq
    segs[r] += [seg_id] * len(seq)
    n_prompt = 0 if prompt_lengths is None else prompt_lengths[i]
    if not 0 <= n_prompt <= len(doc):
      raise ValueError(f"document {i}: prompt length {n_prompt} outside [0, {len(doc)}]")
    trained[r] += [False] + [j >= n_prompt for j in range(len(doc))] + [True]
    if len(rows[r]) == width:
      open_.remove(r)

  tokens = np.full((len(rows), width), pad_id, np.int32)
  segment_ids = np.zeros((len(rows), width), np.int32)
  target_ok = np.zeros((len(rows), width), bool)
  for r, (toks, sg) in enumerate(zip(rows, segs)):
    tokens[r, :len(toks)] = toks
    segment_ids[r, :len(sg)] = sg
    target_ok[r, :len(toks)] = trained[r]
  positions = np.zeros_like(segment_ids)
  for r in range(len(rows)):
    starts = np.r_[True, segment_ids[r, 1:] != segment_ids[r, :-1]]
    idx = np.arange(width)
    positions[r] = idx - np.maximum.accumulate(np.where(starts, idx, 0))
  same_doc = ((segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
              & target_ok[:, 1:])
  return dict(
      tokens=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segment_ids[:, :-1],
      positions=positions[:, :-1], loss_weights=same_doc.astype(np.float32))


def pack_examples(tokenizer, examples: list[tuple[str, str]], seq_len: int) -> dict[str, np.ndarray]:
  """(prompt, completion) text pairs packed for SFT: loss on the completions only."""
  prompts = [tokenizer.encode(p) for p, _ in examples]
  docs = [p + tokenizer.encode(c) for p, (_, c) in zip(prompts, examples)]
  return pack_documents(docs, seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                        pad_id=tokenizer.pad_id, prompt_lengths=[len(p) for p in prompts])


class PackedDataset:
  """Rows served in a fresh seeded permutation per epoch; `batch(i)` is stateless,
  so the data position is just the step and resume needs nothing else."""

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int):
    self.arrays = arrays
    self.batch_size = batch_size
    self.seed = seed
    self.num_rows = len(next(iter(arrays.values())))
    if self.num_rows < batch_size:
      raise ValueError(f"only {self.num_rows} packed rows for batch_size={batch_size}")

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

  def batch(self, index: int) -> dict[str, np.ndarray]:
    per_epoch = self.num_rows // self.batch_size  # drop the ragged tail each epoch
    epoch, offset = divmod(index, per_epoch)
    rows = self._order(epoch)[offset * self.batch_size:(offset + 1) * self.batch_size]
    return {k: v[rows] for k, v in self.arrays.items()}

  @property
  def tokens_per_batch(self) -> int:
    return self.batch_size * self.arrays["tokens"].shape[1]
