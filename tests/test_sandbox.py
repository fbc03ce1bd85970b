"""The code reward's sandbox against hostile programs: each is contained, scores
0 with a reason, leaks nothing and leaves nothing behind; correct code scores 1.

Safety of these tests on the machine running them: every limit is applied in
the launcher before the program starts (the jail fails closed: a limit it
cannot set means no exec). The fork bomb runs only where the process count
is enforced (RLIMIT_NPROC of a dropped uid, or a pids cgroup), and the
file-system and network probes only check the host afterwards.
"""

import json
import os
import resource
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from r1jax.rewards import code
from r1jax.sandbox import Isolation, Limits, Sandbox, probe

# Short limits keep the hostile runs (and the CPU they burn) brief.
LIMITS = Limits(wall_s=4.0, cpu_s=1.5, memory_bytes=512 << 20, processes=8,
                file_bytes=4 << 20, disk_bytes=8 << 20, stdout_bytes=256 << 10,
                stderr_bytes=16 << 10)
ANSWER_TESTS = [code.TestCase(stdin="20 22\n", expected_stdout="42\n")]


def fenced(source: str) -> str:
  return f"Let me write it.\n```python\n{textwrap.dedent(source).strip()}\n```\nDone."


@pytest.fixture(scope="module")
def verifier():
  v = code.CodeVerifier(LIMITS, workers=4, budget_s=60.0)
  yield v
  v.close()


def _leftovers(owner: int | None = None) -> list[int]:
  """Sandbox-uid processes that outlived their run: orphans (their launcher is
  gone), or any still under a launcher started by `owner` (whose runs are over).
  Other tests' sandboxes, running meanwhile under xdist, are neither."""
  from r1jax.sandbox import runner
  procs = {}
  for name in os.listdir("/proc"):
    try:
      with open(f"/proc/{name}/status") as f:
        status = dict(l.split(":", 1) for l in f.read().splitlines() if ":" in l)
      with open(f"/proc/{name}/cmdline", "rb") as f:
        cmd = f.read()
      if not status["State"].strip().startswith("Z"):  # zombies hold no resources
        procs[int(name)] = (int(status["Uid"].split()[0]), int(status["PPid"]), cmd)
    except (OSError, ValueError, KeyError):
      continue
  base = runner._UID_BASE  # pylint: disable=protected-access
  out = []
  for pid, (uid, ppid, _) in procs.items():
    if uid < base:
      continue
    while ppid in procs and procs[ppid][0] >= base:
      ppid = procs[ppid][1]
    launcher = procs.get(ppid)
    if launcher is None or b"jail.py" not in launcher[2] or launcher[1] == owner:
      out.append(pid)
  return out


def test_isolation_is_described():
  lines = probe().describe()
  assert any(l.startswith("no network:") for l in lines) and len(lines) >= 6
  print("\n".join(lines))  # shows in -rA / CI logs what this machine enforces


def test_extract_code_takes_the_last_python_block():
  text = "```python\nprint(1)\n```\n```js\nconsole.log(2)\n```\n```py\nprint(3)\n```\ntail"
  assert code.extract_code(text) == "print(3)\n"
  assert code.extract_code("```\nprint(1)\n```") is None  # untagged: not "of the language"
  assert code.extract_code("no code at all") is None and code.extract_code("") is None


def test_parse_tests_forms_and_errors():
  both = code.parse_tests(json.dumps({"tests": [{"input": "1", "output": "2"}],
                                      "asserts": ["assert f() == 1"]}))
  assert both == [code.TestCase("1", "2"), code.TestCase(assert_code="assert f() == 1")]
  assert code.parse_tests({"inputs": ["a"], "outputs": ["b"]}) == [code.TestCase("a", "b")]
  for bad, needle in (("{not json", "not valid JSON"), ("[]", "JSON object"), ("{}", "no tests"),
                      ('{"tests": [{"input": "1"}]}', "tests[0]"),
                      ('{"inputs": ["a"], "outputs": []}', "same length"),
                      ('{"asserts": [3]}', "asserts[0]")):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
      code.parse_tests(bad)


def test_correct_solution_scores_one_and_wrong_zero(verifier):
  good = fenced("""
      import sys

      def add(a, b):
          return a + b

      if __name__ == "__main__":
          data = sys.stdin.read().split()
          if data:
              print(add(*map(int, data)))
  """)
  tests = code.parse_tests({"tests": [{"input": "20 22\n", "output": "42\n"},
                                      {"input": "1 1", "output": "2"}],
                            "asserts": ["assert add(2, 3) == 5"]})
  wrong = good.replace("a + b", "a * b + 7")
  partial = good.replace("return a + b", "return a + b if a > 1 else 0")
  right, partly, early, none = verifier.check_many(
      [good, partial,
       fenced("import sys\nsys.exit(0)"),  # exits 0 before the assertions: not a pass
       "I would write a loop."], [tests] * 4)
  assert right.reward == 1.0 and right.reasons == ["ok", "ok", "ok"]
  assert partly.reward == pytest.approx(2 / 3) and partly.reasons == ["ok", "wrong_answer", "ok"]
  assert verifier.check(partial, tests, binary=True).reward == 0.0
  assert verifier.check(wrong, tests).reward == 0.0
  assert verifier.check(wrong, tests).reasons == ["wrong_answer", "wrong_answer",
                                                  "assertion_failed"]
  assert early.reasons[-1] == "exited_early" and early.reward == 0.0
  assert none.reward == 0.0 and none.reason == "no_code_block"
  assert code.code_reward_fn("p", good, json.dumps({"tests": [{"input": "2 3", "output": "5"}]})) == 1.0
  assert code.code_reward_binary_fn("p", "", json.dumps({"asserts": ["assert True"]})) == 0.0


HOSTILE = {
    "infinite_loop": ("while True:\n    pass", {"cpu_time_limit", "timeout"}),
    "fork_bomb": ("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
     """, {"timeout", "cpu_time_limit", "process_limit", "killed"}),
    "allocate_50gb": ("x = bytearray(50 * 2**30)\nprint(42)", {"memory_limit"}),
    "write_10gb_file": ("""
        chunk = b"0" * 2**20
        with open("big.bin", "wb") as f:
            for _ in range(10 * 1024):
                f.write(chunk)
        print(42)
     """, {"file_size_limit"}),
    "fill_the_disk": ("""
        chunk = b"0" * 2**20
        for i in range(10 * 1024):
            with open(f"part{i}.bin", "wb") as f:
                f.write(chunk * 3)
        print(42)
     """, {"disk_limit", "file_size_limit"}),
    "fork_and_allocate": ("""
        import os, time
        for _ in range(5):
            if os.fork() == 0:
                x = b"1" * (400 * 2**20)  # touched pages; each under the per-process limit
                time.sleep(10)
                os._exit(0)
        time.sleep(10)
     """, {"memory_limit", "timeout", "killed", "process_limit"}),
    "print_1gb": ("""
        import sys
        chunk = "x" * 65536
        for _ in range(16 * 1024):
            sys.stdout.write(chunk)
     """, {"output_limit"}),
    "hanging_import": ("""
        import sys
        with open("slowmod.py", "w") as f:
            f.write("import time\\ntime.sleep(1000)\\n")
        sys.path.insert(0, ".")
        import slowmod
        print(42)
     """, {"timeout"}),
    "read_host_files": ("""
        import os
        for path in ("/etc/passwd", "../../etc/passwd", os.path.expanduser("~/.bashrc")):
            try:
                print(open(path).read())
            except OSError as e:
                print(type(e).__name__)
     """, {"wrong_answer"}),
    "network": ("""
        import socket
        for addr in (("127.0.0.1", {port}), ("1.1.1.1", 80)):
            socket.create_connection(addr, timeout=1).sendall(b"leak")
        print(42)
     """, None),
    "kill_parent": ("""
        import os, signal
        for pid in (os.getppid(), {pytest_pid}, 1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os.kill(-1, signal.SIGKILL)
        print("still here")
     """, None),  # any reason: it may kill itself; the trainer must not be hurt
}


def test_a_sandbox_failure_is_tried_once_more(monkeypatch):
  """A sandbox_error (the host's failure, not the program's) gets a second
  run; a second failure is reported as such."""
  box = Sandbox(LIMITS, workers=1)
  real, calls = box._run, []  # pylint: disable=protected-access

  def flaky(*args):
    calls.append(1)
    if len(calls) == 1 or fail_always:
      raise OSError(11, "fork failed")
    return real(*args)

  monkeypatch.setattr(box, "_run", flaky)
  fail_always = False
  result = box.run("print(6 * 7)")
  assert (result.status, result.stdout, len(calls)) == ("ok", b"42\n", 2)
  calls.clear()
  fail_always = True
  result = box.run("print(6 * 7)")
  assert (result.status, result.detail, len(calls)) == ("sandbox_error", "[Errno 11] fork failed", 2)
  box.close()


def test_hostile_programs_are_contained_and_score_zero(verifier):
  iso = verifier.sandbox.isolation
  names = [n for n in HOSTILE if n != "fork_bomb" or iso.limit_processes or iso.cgroup]
  if not iso.filesystem:
    names.remove("fill_the_disk")  # no tmpfs quota without a mount namespace: would fill /tmp
  if not iso.network:
    names.remove("network")  # tested as far as it goes in test_no_network (skipped)
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(8)
  server.setblocking(False)
  programs = [fenced(HOSTILE[n][0].replace("{pytest_pid}", str(os.getpid()))
                     .replace("{port}", str(server.getsockname()[1]))) for n in names]
  start, wall_start = time.monotonic(), time.time()
  results = verifier.check_many(programs, [ANSWER_TESTS] * len(programs))
  elapsed = time.monotonic() - start
  with pytest.raises(BlockingIOError):
    server.accept()  # nothing ever connected to the host
  server.close()
  for name, result in zip(names, results):
    allowed = HOSTILE[name][1]
    assert result.reward == 0.0, (name, result)
    assert allowed is None or result.reason in allowed, (name, result.reasons)
  if verifier.sandbox.isolation.cgroup:  # the run's memory cap holds for all its processes
    assert results[names.index("fork_and_allocate")].reason == "memory_limit"
  # 4 workers, 14 programs of at most wall_s each, plus start-up; never unbounded.
  assert elapsed < 4 * LIMITS.wall_s + 15, elapsed
  time.sleep(0.2)
  assert _leftovers(owner=os.getpid()) == []  # nothing survived, fork bomb included
  assert not [p for p in os.listdir("/tmp") if p.startswith(f"r1jax-sandbox-{os.getpid()}-")
              and os.stat(os.path.join("/tmp", p)).st_mtime >= wall_start]  # dirs deleted
  # The sandbox still works after all that.
  assert verifier.check(fenced("print(sum(map(int, input().split())))"), ANSWER_TESTS).reward == 1.0


def test_nothing_outside_can_be_read_or_written(tmp_path):
  iso = probe()
  if not (iso.filesystem or iso.drop_uid):
    pytest.skip("no mount namespace and no uid to drop to: the program runs as the caller")
  secret_dir = tmp_path / "outside"
  secret_dir.mkdir()
  secret = "TOP-SECRET-" + os.urandom(8).hex()
  (secret_dir / "secret.txt").write_text(secret)
  os.chmod(secret_dir, 0o777)  # even a world-writable dir outside must not take writes
  marker = "pwned-" + os.urandom(4).hex()
  targets = [str(secret_dir / marker), f"/tmp/{marker}", f"/var/tmp/{marker}",
             f"/dev/shm/{marker}", os.path.join(os.getcwd(), marker), f"/usr/{marker}",
             f"/root/{marker}", f"../{marker}"]
  reads = ["/etc/passwd", "/etc/shadow", str(secret_dir / "secret.txt"), "/root/.bashrc",
           "../../etc/passwd", "/work/shared/docs/style.md", "/proc/1/environ"]
  source = f"""
      import json, os
      found = {{}}
      for path in {reads!r}:
          try:
              with open(path, "rb") as f:
                  found[path] = f.read(4096).decode("latin-1")
          except OSError as e:
              found[path] = type(e).__name__
      for path in {targets!r}:
          try:
              with open(path, "w") as f:
                  f.write("x")
              found[path] = "written"
          except OSError as e:
              found[path] = type(e).__name__
      found["/"] = sorted(os.listdir("/"))
      found["env"] = sorted(os.environ)
      print(json.dumps(found))
  """
  box = Sandbox(LIMITS, workers=1)
  try:
    result = box.run(textwrap.dedent(source))
  finally:
    box.close()
  assert result.status == "ok", result
  out = result.stdout.decode("utf-8", "replace")
  found = json.loads(out)
  assert found["env"] == ["HOME", "LANG", "PATH", "TMPDIR"]
  for path in targets:  # no write reached the host
    assert not os.path.exists(os.path.join(os.getcwd(), path)), path
  assert not os.path.exists(os.path.join(os.path.dirname(os.getcwd()), marker))
  assert os.listdir(secret_dir) == ["secret.txt"]
  for path in (str(secret_dir / marker), f"/usr/{marker}", f"/root/{marker}"):
    assert found[path] != "written", (path, found[path])  # fails inside too, not only outside
  if iso.filesystem:
    assert secret not in out and "root:x:0:0" not in out and "How r1jax" not in out, found
    for path in reads[:-1]:
      assert found[path] == "FileNotFoundError", (path, found[path])
    assert not {"home", "work", "etc/passwd", "old_root"} & set(found["/"]), found["/"]
  # And the reward can never carry any of it: a number plus fixed-vocabulary reasons.
  v = code.CodeVerifier(LIMITS, workers=1)
  try:
    verdict = v.check(fenced(source), ANSWER_TESTS)
  finally:
    v.close()
  assert verdict.reward == 0.0 and verdict.reasons == ["wrong_answer"]


def test_no_network(tmp_path):
  if not probe().network:
    pytest.skip("no network namespace here (Isolation.describe() says so)")
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(8)
  server.setblocking(False)
  port = server.getsockname()[1]
  source = f"""
      import socket
      for family, kind, addr in [(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", {port})),
                                 (socket.AF_INET, socket.SOCK_STREAM, ("1.1.1.1", 80)),
                                 (socket.AF_INET, socket.SOCK_DGRAM, ("8.8.8.8", 53))]:
          s = socket.socket(family, kind)
          s.settimeout(1.0)
          try:
              s.connect(addr)
              s.send(b"leak")
              print("connected", addr)
          except OSError as e:
              print("blocked", addr, type(e).__name__)
  """
  box = Sandbox(LIMITS, workers=1)
  try:
    result = box.run(textwrap.dedent(source))
  finally:
    box.close()
  out = result.stdout.decode()
  assert out.count("blocked") == 3 and "connected" not in out, out
  with pytest.raises(BlockingIOError):
    server.accept()  # nobody ever connected
  server.close()


def test_degraded_isolation_still_enforces_the_limits():
  """Without mount/pid namespaces or a uid drop the rlimits, caps and clocks still hold."""
  box = Sandbox(LIMITS, workers=2, isolation=Isolation((), drop_uid=False, limit_processes=False))
  try:
    runs = box.map(box.run, ["x = bytearray(50 * 2**30)", "while True: pass",
                             "import sys\nwhile True: sys.stdout.write('x' * 65536)",
                             "open('big', 'wb').write(b'0' * (64 << 20))", "print(6 * 7)"])
  finally:
    box.close()
  assert runs[0].reason == "memory_limit"
  assert runs[1].reason in ("cpu_time_limit", "timeout")
  assert runs[2].reason == "output_limit" and len(runs[2].stdout) == LIMITS.stdout_bytes
  assert runs[3].reason == "file_size_limit"
  assert runs[4].stdout == b"42\n"
  assert "NOT enforced" in "\n".join(box.isolation.describe())


def test_trainer_never_blocks_on_a_hanging_program():
  """Through the RewardRunner (worker processes), a hung sandbox costs at most its timeout."""
  from r1jax.rewards import RewardRunner
  tests = json.dumps({"tests": [{"input": "", "output": "1"}]})
  runner = RewardRunner({"code": (code.code_reward_fn, 1.0)}, timeout_s=3.0, workers=1)
  try:
    start = time.monotonic()
    total, _, stats = runner.score(["p", "p"], [fenced("import time\ntime.sleep(600)"),
                                                fenced("print(1)")], [tests, tests])
  finally:
    runner.close()
  assert time.monotonic() - start < 60
  assert list(total) == [0.0, 1.0]
  assert stats["rewards/code/timeouts"] == 1
  time.sleep(0.5)
  assert _leftovers() == []  # the killed worker's sandbox died with it
  Sandbox(LIMITS, workers=1).close()  # and the next sandbox deletes its working directory
  alive = lambda pid: os.path.exists(f"/proc/{pid}")
  assert not [p for p in os.listdir("/tmp") if p.startswith("r1jax-sandbox-")
              and not alive(p.split("-")[2])]


def _pool_programs(n: int) -> tuple[list[str], list[float]]:
  programs, want = [], []
  for i in range(n):
    kind = i % 4
    if kind == 0:
      programs.append(fenced("a, b = map(int, input().split())\nprint(a + b)"))
      want.append(1.0)
    elif kind == 1:
      programs.append(fenced("a, b = map(int, input().split())\nprint(a - b)"))
      want.append(0.0)
    elif kind == 2:  # much output (under the cap): memory must not grow with n
      programs.append(fenced("print('y' * 200_000)\nprint(42)"))
      want.append(0.0)
    else:
      programs.append(fenced("raise SystemExit(3)"))
      want.append(0.0)
  return programs, want


_POOL_SCRIPT = """
import json, resource, sys
from tests.test_sandbox import ANSWER_TESTS, LIMITS, _pool_programs
from r1jax.rewards import code
n = int(sys.argv[1])
programs, want = _pool_programs(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
v = code.CodeVerifier(LIMITS, workers=4, budget_s=600.0)
try:
  got = v.check_many(programs, [ANSWER_TESTS] * n)
finally:
  v.close()
print(json.dumps({"rewards": [r.reward for r in got], "want": want,
                  "grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
                  "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _run_pool(n: int):
  """In a fresh process: its own and its children's peak memory are this pool's alone
  (in the test process they would include every earlier test's subprocesses)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(n)], capture_output=True,
                        text=True, cwd=repo, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["rewards"] == out["want"]
  assert out["grew_kb"] / 1024 < 200, out["grew_kb"]  # bounded by workers x output caps, not n
  assert out["children_kb"] < 2 * (LIMITS.memory_bytes >> 10), out["children_kb"]


def test_pool_of_16_programs():
  _run_pool(16)


@pytest.mark.slow
def test_pool_of_256_programs():
  _run_pool(256)
