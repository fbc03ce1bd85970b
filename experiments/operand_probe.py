"""Teacher-forced probe of a tiny-world model's reasoning steps.

Feeds held-out worked solutions ("Problem: compute (3 + 4) * 2\\nSolution:
first we add 3 and 4 to get 7 . ...") through a trained model and checks its
argmax at every number and verb of every step, split by where it comes from:

  first operand   step 1's left operand, copied out of the question
  next operands   every step's right operand, copied out of the question
  carried         steps 2+ left operand, the previous step's result
  operators       the step's verb ("add", "subtrahimus"): its operator, copied
                  out of the question
  results         the step's arithmetic
  answer          the number in "so the answer is N"

Why a base's sampled reasoning goes wrong can be told apart this way:
miscopying (an attention skill: operands, operators) or miscounting (results).

  python experiments/operand_probe.py --model_path=/tmp/r1zero/base [--model_path=...]
"""

from __future__ import annotations

import functools
import random
import sys
from pathlib import Path

from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("model_path", None, "r1jax workdir(s) to probe (latest checkpoint)",
                          required=True)
flags.DEFINE_integer("num_problems", 200, "held-out problems, level-balanced")
flags.DEFINE_integer("seed", 1, "held-out problem draw (1 = the evaluation's problems)")
flags.DEFINE_string("lang", "en", "language of the worked solutions: en | la")

KINDS = ("first operand", "next operands", "carried", "operators", "results", "answer")


@functools.lru_cache(maxsize=None)
def step_verbs() -> frozenset[str]:
  """The verb of each step sentence, in both languages, from the step phrases
  themselves ("we subtract {b} ...")."""
  from r1jax.data import tinyworld  # pylint: disable=import-outside-toplevel
  return frozenset(phrase.removeprefix("we ").split()[0]
                   for phrases in tinyworld._STEP_PHRASES.values()  # pylint: disable=protected-access
                   for phrase in phrases.values())


def labelled_document(problem, lang: str) -> tuple[str, list[tuple[int, str, str]]]:
  """The plain worked document and, for every number and step verb in its
  solution, (char offset, the word, its kind)."""
  from r1jax.data import tinyworld  # pylint: disable=import-outside-toplevel
  text = tinyworld.plain_document(problem, lang, random.Random(0))
  verbs = step_verbs()
  solution_at = text.index("\nSolution: ") + len("\nSolution: ")
  words, offset, labelled = text[solution_at:].split(" "), solution_at, []
  # Each step sentence names its numbers in phrase order ("we subtract b
  # from a"), then the conclusion names the answer.
  labels = []
  for i, (op, a, b, r) in enumerate(problem.steps):
    left = (str(a), "first operand" if i == 0 else "carried")
    right = (str(b), "next operands")
    labels += [right, left] if op == "-" else [left, right]
    labels.append((str(r), "results"))
  labels.append((problem.answer, "answer"))
  values = [w for w in words if w.isdigit()]
  if values != [v for v, _ in labels]:  # the phrasing changed: the labels would be wrong
    raise AssertionError(f"numbers {values} != steps {labels} in {text!r}")
  kinds = iter(labels)
  for w in words:
    if w.isdigit():
      labelled.append((offset, w, next(kinds)[1]))
    elif w in verbs:
      labelled.append((offset, w, "operators"))
    offset += len(w) + 1
  return text, labelled


def probe(model_path: str, num_problems: int, seed: int, lang: str) -> dict[str, float]:
  """Share of the words of each kind whose every token is the model's argmax."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from r1jax.data import tinyworld  # pylint: disable=import-outside-toplevel
  from r1jax.evaluate import load_r1jax_model  # pylint: disable=import-outside-toplevel
  from r1jax.parallel.mesh import make_mesh, mesh_rules  # pylint: disable=import-outside-toplevel

  mesh = make_mesh({"data": -1})
  model, params, model_state, tok, _ = load_r1jax_model(model_path, mesh)
  problems = tinyworld.generate_problems("heldout", num_problems, seed)
  rows, targets = [], []  # targets: (row, first token index, the word's token count, kind)
  for i, p in enumerate(problems):
    text, labelled = labelled_document(p, lang)
    ids = [tok.bos_id] + tok.encode(text)
    rows.append(ids)
    for offset, word, kind in labelled:
      before = [tok.bos_id] + tok.encode(text[:offset - 1])  # up to the space before it
      through = [tok.bos_id] + tok.encode(text[:offset + len(word)])
      if ids[:len(before)] != before or ids[:len(through)] != through:
        raise AssertionError(f"tokenisation of {word!r} depends on what follows: {text!r}")
      targets.append((i, len(before), len(through) - len(before), kind))
  T = max(map(len, rows))
  tokens = np.full((len(rows), T), tok.pad_id, np.int32)
  for i, ids in enumerate(rows):
    tokens[i, :len(ids)] = ids

  @jax.jit
  def argmax_BT(params, model_state, tokens_BT):
    variables = {"params": params, **(model_state or {})}
    logits_BTV, _ = model.apply(variables, tokens_BT)
    return jnp.argmax(logits_BTV, axis=-1)

  with mesh_rules(mesh):
    pred = np.concatenate([np.asarray(argmax_BT(params, model_state, tokens[s:s + 64]))
                           for s in range(0, len(rows), 64)])
  right = {k: [] for k in KINDS}
  for i, start, width, kind in targets:
    right[kind].append(all(pred[i, j - 1] == tokens[i, j] for j in range(start, start + width)))
  return {k: float(np.mean(v)) if v else float("nan") for k, v in right.items()}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step
  print("| model | " + " | ".join(KINDS) + " |")
  print("|---" * (len(KINDS) + 1) + "|")
  for path in FLAGS.model_path:
    acc = probe(path, FLAGS.num_problems, FLAGS.seed, FLAGS.lang)
    print(f"| {path} | " + " | ".join(f"{acc[k]:.1%}" for k in KINDS) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
