"""Code reward: run the completion's last fenced code block against test cases
in the sandbox (r1jax.sandbox); reward = fraction of tests passed (or 1.0 only
when all pass, the binary variant).

The reference is the task's tests as JSON, in any of these forms:
  {"tests": [{"input": "1 2\\n", "output": "3\\n"}, ...]}          stdin/stdout pairs
  {"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}             (APPS-style)
  {"asserts": ["assert add(1, 2) == 3", ...]}                     assert-based tests
(`stdin`/`stdout` are accepted for `input`/`output`, `test_code` for a single
assert block; both kinds may be given). Every (program, test) pair is one
sandboxed run; a run that fails in any way (timeout, limits, crash, wrong
output) fails its test, with a reason from a fixed vocabulary that never
quotes the program's output.

Stdout tests compare outputs with trailing whitespace of each line and
trailing blank lines ignored. Assert tests run the program followed by the
assertions and a line printing a random token: the test passes when the run
exits 0 and its last output line is that token (an early `sys.exit(0)` does
not pass). Assertions run inside the program's own process, so a program
written to defeat them (it can read its own source) can; stdout tests have no
such hole (the expected output is never inside the sandbox).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import secrets
import time
from typing import Optional, Sequence

from r1jax.sandbox import Limits, Sandbox

LANGUAGE_TAGS = {"python": ("python", "py", "python3")}
_FENCE_RE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)

# Generous for correct solutions of contest-style problems, short enough for RL batches.
DEFAULT_LIMITS = Limits(wall_s=6.0, cpu_s=3.0, memory_bytes=1 << 30, processes=16,
                        file_bytes=16 << 20, stdout_bytes=1 << 20, stderr_bytes=64 << 10)


@dataclasses.dataclass(frozen=True)
class TestCase:
  """One test: stdin -> expected stdout, or an assert block run after the program."""

  stdin: str = ""
  expected_stdout: Optional[str] = None
  assert_code: Optional[str] = None


@dataclasses.dataclass
class CodeResult:
  """The outcome for one completion: reward, counts and the reason of each test."""

  reward: float
  passed: int
  total: int
  reasons: list[str]  # per test: "ok", "wrong_answer" or the run's failure reason

  @property
  def reason(self) -> str:
    """"ok" when all passed, else the first failing test's reason."""
    return next((r for r in self.reasons if r != "ok"), "ok")


def extract_code(completion: str, language: str = "python") -> Optional[str]:
  """The last fenced block tagged with `language` (or an alias), or None."""
  tags = LANGUAGE_TAGS.get(language, (language,))
  blocks = [body for tag, body in _FENCE_RE.findall(completion) if tag.lower() in tags]
  return blocks[-1] if blocks else None


def _text(value, field: str) -> str:
  if isinstance(value, list):  # some sets store lines as a list
    value = "\n".join(map(str, value))
  if not isinstance(value, str):
    raise ValueError(f"field {field!r} must be a string, got {type(value).__name__}")
  return value


def parse_tests(reference) -> list[TestCase]:
  """Test cases from the reference (JSON text or an already-parsed dict); ValueError naming the
  field when there are none or they are malformed."""
  if isinstance(reference, str):
    try:
      reference = json.loads(reference)
    except json.JSONDecodeError as e:
      raise ValueError(f"tests are not valid JSON ({e.msg} at char {e.pos})") from None
  if not isinstance(reference, dict):
    raise ValueError(f"tests must be a JSON object, got {type(reference).__name__}")
  tests = []
  pairs = reference.get("tests")
  if pairs is not None:
    if not isinstance(pairs, list):
      raise ValueError("field 'tests' must be a list of {input, output} objects")
    for i, t in enumerate(pairs):
      if not isinstance(t, dict):
        raise ValueError(f"field 'tests[{i}]' must be an object")
      out = t.get("output", t.get("stdout"))
      if out is None:
        raise ValueError(f"field 'tests[{i}]' has no 'output'")
      tests.append(TestCase(_text(t.get("input", t.get("stdin", "")), f"tests[{i}].input"),
                            _text(out, f"tests[{i}].output")))
  if "inputs" in reference or "outputs" in reference:
    ins, outs = reference.get("inputs"), reference.get("outputs")
    if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
      raise ValueError("fields 'inputs' and 'outputs' must be lists of the same length")
    tests += [TestCase(_text(a, f"inputs[{i}]"), _text(b, f"outputs[{i}]"))
              for i, (a, b) in enumerate(zip(ins, outs))]
  asserts = reference.get("asserts", [])
  if "test_code" in reference:
    asserts = list(asserts) + [reference["test_code"]]
  if not isinstance(asserts, list):
    raise ValueError("field 'asserts' must be a list of strings")
  tests += [TestCase(assert_code=_text(a, f"asserts[{i}]")) for i, a in enumerate(asserts)]
  if not tests:
    raise ValueError("no tests: expected 'tests', 'inputs'/'outputs' or 'asserts'")
  return tests


def _normalize_output(text: str) -> str:
  return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).rstrip()


class CodeVerifier:
  """Checks programs against tests in a sandbox, `workers` runs at a time.

  Args:
    limits: per-run sandbox limits.
    workers: concurrent sandboxed runs.
    language: the fence tag to extract (only Python runs today).
    budget_s: wall-clock budget for one `check_many` call; tests not started
      by then fail with reason "budget" (the caller never waits longer than
      about budget_s + limits.wall_s).
  """

  def __init__(self, limits: Limits = DEFAULT_LIMITS, workers: int = 4, language: str = "python",
               budget_s: float = 60.0):
    if language != "python":
      raise ValueError(f"only python programs run in the sandbox, got language={language!r}")
    self.language = language
    self.budget_s = budget_s
    self.sandbox = Sandbox(limits, workers=workers)
    logging.info("code reward sandbox: %s", "; ".join(self.sandbox.isolation.describe()))

  def close(self):
    self.sandbox.close()

  def _run_test(self, job) -> tuple[bool, str]:
    code, test, deadline = job
    if time.monotonic() > deadline:
      return False, "budget"
    if test.assert_code is None:
      result = self.sandbox.run(code, stdin=test.stdin.encode("utf-8", "replace"))
      if result.status != "ok":
        return False, result.reason
      got = result.stdout.decode("utf-8", "replace")
      if _normalize_output(got) == _normalize_output(test.expected_stdout):
        return True, "ok"
      return False, "wrong_answer"
    token = secrets.token_hex(16)
    result = self.sandbox.run(f"{code}\n\n{test.assert_code}\n\nprint({token!r})\n")
    if result.status != "ok":
      return False, result.reason
    lines = result.stdout.decode("utf-8", "replace").rstrip("\n").splitlines()
    return (True, "ok") if lines and lines[-1] == token else (False, "exited_early")

  def check_many(self, completions: Sequence[str], tests: Sequence[Sequence[TestCase]],
                 *, binary: bool = False) -> list[CodeResult]:
    """Runs every completion's code against its tests (all pairs through the pool)."""
    if len(completions) != len(tests):
      raise ValueError(f"{len(completions)} completions but {len(tests)} test lists")
    deadline = time.monotonic() + self.budget_s
    codes = [extract_code(c, self.language) for c in completions]
    jobs, owners = [], []
    for i, (code, ts) in enumerate(zip(codes, tests)):
      if code is not None:
        jobs += [(code, t, deadline) for t in ts]
        owners += [i] * len(ts)
    outcomes = self.sandbox.map(self._run_test, jobs)
    per = [[] for _ in completions]
    for i, outcome in zip(owners, outcomes):
      per[i].append(outcome)
    results = []
    for code, ts, outs in zip(codes, tests, per):
      if code is None:
        results.append(CodeResult(0.0, 0, len(ts), ["no_code_block"] * len(ts)))
        continue
      passed = sum(ok for ok, _ in outs)
      frac = passed / len(ts) if ts else 0.0
      reward = float(passed == len(ts)) if binary else frac
      results.append(CodeResult(reward if ts else 0.0, passed, len(ts), [r for _, r in outs]))
      if passed < len(ts):
        logging.info("code reward %.2f: %s", results[-1].reward, results[-1].reason)
    return results

  def check(self, completion: str, tests: Sequence[TestCase], *, binary: bool = False) -> CodeResult:
    return self.check_many([completion], [tests], binary=binary)[0]


@functools.lru_cache(maxsize=None)
def default_verifier() -> CodeVerifier:
  """One verifier per process (reward workers each build their own on first use)."""
  return CodeVerifier()


def code_reward(completion: str, reference, *, binary: bool = False) -> float:
  """Fraction of the reference's tests the completion's last python block passes (binary: all)."""
  return default_verifier().check(completion, parse_tests(reference), binary=binary).reward


def code_reward_fn(prompt: str, completion: str, reference: str) -> float:
  """`code_reward` in the `(prompt, completion, reference)` reward signature."""
  del prompt
  return code_reward(completion, reference)


def code_reward_binary_fn(prompt: str, completion: str, reference: str) -> float:
  """1.0 when every test passes, else 0.0, in the reward signature."""
  del prompt
  return code_reward(completion, reference, binary=True)
