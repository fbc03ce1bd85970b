"""Runs untrusted Python programs in a jail with limits; the parent side of
r1jax.sandbox.jail.

What is enforced depends on the machine; `Sandbox.isolation` says what this
one allows (probed once per process) and `Isolation.describe()` says it in words:

- always: wall clock (the whole process group killed with SIGKILL), CPU
  seconds, address space, largest file, open files, no core files, captured
  output capped (exceeding it kills the program), an empty working directory
  deleted afterwards, an environment of PATH/LANG/HOME only, `python -I`;
- with a mount namespace: a new root holding read-only system and
  interpreter directories only (no /etc, /home, /root or /work; the host's
  /tmp is not visible), size-limited tmpfs working directory and /tmp, so
  nothing outside can be read or written;
- with a pid namespace: the program is pid 1 of its own namespace; when it
  ends or is killed, everything it started is killed by the kernel;
- with a network namespace: no interface but a downed loopback (no
  connection to the host's 127.0.0.1 or anywhere else);
- as root: the program runs as its own unprivileged uid (one per concurrent
  run), so RLIMIT_NPROC bounds its processes (a fork bomb fails to fork) and
  it cannot signal the trainer, the launcher or other sandboxes;
- with cgroup v1 memory and pids controllers (root): one cgroup per run caps
  the memory of all its processes together (tmpfs pages included; RLIMIT_AS
  alone is per process) and their number, and kills every process in it at
  the end.
Without namespaces (e.g. a container without CAP_SYS_ADMIN and no user
namespaces) the limits still hold, but the file system and network are the
host's, as seen by the sandbox uid (or by the caller's uid when it is not
root): see `Isolation.describe()`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import json
import logging
import os
import queue
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, Optional, Sequence, TypeVar

JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail.py")
# Unprivileged uids handed to concurrent runs when we are root: none of them
# is a real account, and each run has its own (process counts are per uid).
_UID_BASE = 1_500_000_000
_UIDS_PER_PROCESS = 128
# How long to keep reading output after the program exited (leftover children
# without a pid namespace may hold the pipes open).
_DRAIN_S = 0.2
# Tries per run when the sandbox itself fails (status sandbox_error), and the
# pause between them.
_ATTEMPTS = 2
_RETRY_PAUSE_S = 0.2
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-run limits. Memory is address space (RLIMIT_AS), not resident memory."""

  wall_s: float = 10.0  # wall clock from launch to exit, start-up included
  cpu_s: float = 5.0  # CPU seconds (RLIMIT_CPU, rounded up to whole seconds)
  memory_bytes: int = 1 << 30  # address space of each process
  processes: int = 16  # processes + threads of the run (RLIMIT_NPROC of its uid)
  file_bytes: int = 16 << 20  # largest file it may write (RLIMIT_FSIZE)
  disk_bytes: int = 32 << 20  # size of /sandbox and of /tmp each (tmpfs; mount namespace only)
  inodes: int = 4096  # files in /sandbox and in /tmp each (mount namespace only)
  open_files: int = 64  # RLIMIT_NOFILE
  stdout_bytes: int = 1 << 20  # captured stdout; more kills the program
  stderr_bytes: int = 64 << 10  # captured stderr; more kills the program


@dataclasses.dataclass(frozen=True)
class Isolation:
  """What this machine lets the sandbox enforce beyond the rlimits."""

  namespaces: tuple[str, ...]  # entered namespaces: mount, pid, net, ipc, uts (+ user if not root)
  drop_uid: bool  # runs as a fresh unprivileged uid (we are root)
  limit_processes: bool  # RLIMIT_NPROC applies (never to root)
  cgroup: bool = False  # a v1 memory+pids cgroup per run (root)

  @property
  def filesystem(self) -> bool:
    return "mount" in self.namespaces

  @property
  def network(self) -> bool:
    return "net" in self.namespaces

  def describe(self) -> list[str]:
    yes = lambda b: "enforced" if b else "NOT enforced"
    return [
        f"namespaces: {', '.join(self.namespaces) or 'none available'}",
        f"no network: {yes(self.network)}" + ("" if self.network else
                                               " (no network namespace on this machine)"),
        f"private file system (read-only system dirs, nothing else visible, tmpfs /sandbox "
        f"and /tmp): {yes(self.filesystem)}" + ("" if self.filesystem else
                                                 " (host files readable/writable as the run's uid)"),
        f"process count (RLIMIT_NPROC): {yes(self.limit_processes)}",
        f"memory of all processes together and their count (cgroup): {yes(self.cgroup)}"
        + ("" if self.cgroup else " (RLIMIT_AS bounds each process only)"),
        f"children killed with the program: {'pid namespace' if 'pid' in self.namespaces else 'process group only (a child that calls setsid() may survive)'}",
        f"runs as an unprivileged uid: {yes(self.drop_uid or os.geteuid() != 0)}"
        + ("" if self.drop_uid or os.geteuid() != 0 else " (uid 0 without capabilities)"),
        "always: wall clock, CPU time, address space, file size, open files, output caps, "
        "empty deleted working dir, scrubbed environment",
    ]


@dataclasses.dataclass
class RunResult:
  """How a run ended. status: ok | exit (non-zero) | signal | timeout | output_limit | sandbox_error."""

  status: str
  returncode: Optional[int]  # exit code, or -signal number
  stdout: bytes
  stderr: bytes
  wall_s: float
  detail: str = ""  # sandbox_error: what failed
  out_of_memory: bool = False  # the run's cgroup OOM-killed a process

  @property
  def reason(self) -> str:
    """A short fixed-vocabulary explanation; never quotes program output."""
    if self.status == "ok":
      return "ok"
    if self.out_of_memory:  # an OOM kill explains a timeout or a crash that follows it
      return "memory_limit"
    if self.status in ("timeout", "output_limit"):
      return self.status
    if self.status == "sandbox_error":
      return "sandbox_error"
    if self.status == "signal":
      sig = -self.returncode
      if sig in (signal.SIGXCPU, signal.SIGKILL):
        return "cpu_time_limit" if sig == signal.SIGXCPU else "killed"
      if sig == signal.SIGXFSZ:
        return "file_size_limit"
      return f"signal:{signal.Signals(sig).name}" if sig in signal.valid_signals() else "signal"
    return _error_reason(self.stderr, self.returncode)


def _error_reason(stderr: bytes, returncode) -> str:
  last = next((l for l in reversed(stderr.decode("utf-8", "replace").splitlines()) if l.strip()), "")
  name = last.split(":", 1)[0].strip()
  if name == "MemoryError":
    return "memory_limit"
  if "[Errno 27]" in last:
    return "file_size_limit"
  if "[Errno 28]" in last or "[Errno 122]" in last:
    return "disk_limit"
  if name == "BlockingIOError" or "[Errno 11]" in last:
    return "process_limit"
  if name == "AssertionError":
    return "assertion_failed"
  if name.replace(".", "").replace("_", "").isalnum() and len(name) <= 60 and name[:1].isalpha():
    return f"runtime_error:{name}"
  return f"exit:{returncode}"


# ---------------------------------------------------------------------------
# Cgroups (v1): memory and process caps for a run as a whole.
# ---------------------------------------------------------------------------

_CGROUP_ROOT = "/sys/fs/cgroup"
_CGROUP_CONTROLLERS = ("memory", "pids")


def _own_cgroups() -> dict[str, str]:
  """controller -> this process's cgroup directory in the v1 memory and pids hierarchies."""
  out = {}
  try:
    with open("/proc/self/cgroup") as f:
      lines = f.read().splitlines()
  except OSError:
    return out
  for line in lines:
    _, controllers, path = line.split(":", 2)
    for c in controllers.split(","):
      d = os.path.join(_CGROUP_ROOT, c) + path.rstrip("/")
      if c in _CGROUP_CONTROLLERS and os.path.isfile(os.path.join(d, "cgroup.procs")):
        out[c] = d
  return out


class _RunCgroup:
  """One run's cgroups (children of ours, so the container's own limits still apply)."""

  def __init__(self, name: str, limits: Limits):
    self.dirs = {}
    try:
      for c, parent in _own_cgroups().items():
        os.mkdir(os.path.join(parent, name))
        self.dirs[c] = os.path.join(parent, name)
      if set(self.dirs) != set(_CGROUP_CONTROLLERS):
        raise OSError(f"cgroup controllers missing: have {sorted(self.dirs)}")
      self._write("memory", "memory.limit_in_bytes", limits.memory_bytes)
      self._write("pids", "pids.max", limits.processes + 1)  # + the launcher
    except OSError:
      self.remove()
      raise

  @staticmethod
  def sweep():
    """Removes empty run cgroups left by processes that were killed mid-run (rmdir refuses
    a cgroup that still has processes, so live runs are untouched)."""
    for parent in _own_cgroups().values():
      for name in os.listdir(parent):
        if name.startswith("r1jax-sandbox-"):
          try:
            os.rmdir(os.path.join(parent, name))
          except OSError:
            pass

  def _write(self, controller, name, value):
    with open(os.path.join(self.dirs[controller], name), "w") as f:
      f.write(str(value))

  @property
  def procs_files(self) -> list[str]:
    return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

  def out_of_memory(self) -> bool:
    try:
      with open(os.path.join(self.dirs["memory"], "memory.oom_control")) as f:
        fields = dict(line.split() for line in f if line.strip())
      return int(fields.get("oom_kill", 0)) > 0
    except (OSError, ValueError, KeyError):
      return False

  def remove(self):
    """SIGKILLs whatever is still in the cgroups (setsid() or not), then removes them."""
    for d in self.dirs.values():
      for _ in range(200):
        try:
          with open(os.path.join(d, "cgroup.procs")) as f:
            pids = [int(p) for p in f.read().split()]
        except OSError:
          break
        if not pids:
          break
        for pid in pids:
          try:
            os.kill(pid, signal.SIGKILL)
          except OSError:
            pass
        time.sleep(0.005)
      try:
        os.rmdir(d)
      except OSError as e:
        logging.warning("sandbox: cannot remove cgroup %s: %s", d, e)
    self.dirs = {}


# ---------------------------------------------------------------------------
# Probe: what this machine allows.
# ---------------------------------------------------------------------------

def _traversable_by_others(path: str) -> bool:
  """Whether a process of another uid can reach and execute `path`."""
  path = os.path.realpath(path)
  parts = path.split(os.sep)
  for i in range(2, len(parts)):
    if not os.stat(os.sep.join(parts[:i])).st_mode & stat.S_IXOTH:
      return False
  return bool(os.stat(path).st_mode & stat.S_IXOTH)


def _candidates() -> list[Isolation]:
  """What to try, strongest first."""
  full = ("mount", "pid", "net", "ipc", "uts")
  if os.geteuid() != 0:  # unprivileged: a user namespace is the only way into the others
    return [Isolation(("user",) + full, False, True), Isolation(("user", "net"), False, True),
            Isolation((), False, True)]
  # Root, or root of a user namespace (rootless containers), where dropping to
  # an unmapped uid or writing cgroups may fail: try with, then without.
  cgroups = (True, False) if _own_cgroups() else (False,)
  out = []
  for namespaces in (full, ("net",), ()):
    can_drop = "mount" in namespaces or _traversable_by_others(sys.executable)
    out += [Isolation(namespaces, drop, limit_processes=drop, cgroup=cg)
            for drop in ((True, False) if can_drop else (False,)) for cg in cgroups]
  return out


@functools.lru_cache(maxsize=None)
def probe() -> Isolation:
  """The strongest isolation that works here (runs a tiny program per candidate; cached)."""
  for iso in _candidates():
    box = Sandbox(Limits(wall_s=30.0), workers=1, isolation=iso)
    try:
      result = box.run("print('ok')")
    finally:
      box.close()
    if result.status == "ok" and result.stdout.strip() == b"ok":
      return iso
    logging.info("sandbox: isolation %s unavailable here: %s %s", iso, result.status,
                 result.detail or result.stderr[-300:])
  raise RuntimeError(f"the sandbox cannot run even a trivial program here: {result}")


# ---------------------------------------------------------------------------
# Sandbox.
# ---------------------------------------------------------------------------

def _other_user_processes(uid: int) -> int:
  n = 0
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        n += os.stat(f"/proc/{name}").st_uid == uid
      except OSError:
        pass
  return n


def _extra_dirs() -> list[str]:
  """Interpreter directories to show read-only inside (system dirs are always shown)."""
  dirs = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix,
                                                os.path.dirname(os.path.realpath(sys.executable)))})
  system = ("/usr", "/bin", "/sbin", "/lib", "/lib64")
  out = []
  for d in dirs:
    inside = lambda parent: d == parent or d.startswith(parent.rstrip("/") + "/")
    if not any(inside(p) for p in system + tuple(out)):
      out.append(d)
  return out


_DIR_PREFIX = "r1jax-sandbox-"


def _sweep_stale_dirs():
  """Deletes working directories whose owner process is gone (killed mid-run)."""
  base = tempfile.gettempdir()
  for name in os.listdir(base):
    owner = name[len(_DIR_PREFIX):].split("-", 1)[0]
    if not (name.startswith(_DIR_PREFIX) and owner.isdigit()):
      continue
    try:
      os.kill(int(owner), 0)
    except ProcessLookupError:
      shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    except OSError:
      pass


class Sandbox:
  """Runs Python programs with `limits`, at most `workers` at a time.

  Args:
    limits: per-run limits.
    workers: concurrent runs (threads that each wait on one program).
    isolation: what to enforce; default: the strongest this machine allows (`probe()`).
  """

  def __init__(self, limits: Limits = Limits(), workers: int = 4,
               isolation: Optional[Isolation] = None):
    if workers < 1 or workers > _UIDS_PER_PROCESS:
      raise ValueError(f"need 1 <= workers <= {_UIDS_PER_PROCESS}, got {workers}")
    self.limits = limits
    self.workers = workers
    self.isolation = isolation or probe()
    base = _UID_BASE + (os.getpid() % 100_000) * _UIDS_PER_PROCESS
    self._uids: queue.Queue = queue.Queue()
    for i in range(workers):
      self._uids.put(base + i if self.isolation.drop_uid else os.getuid())
    self._pool: Optional[cf.ThreadPoolExecutor] = None
    _sweep_stale_dirs()
    if self.isolation.cgroup:
      _RunCgroup.sweep()

  def close(self):
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def map(self, fn: Callable[[T], object], items: Iterable[T]) -> list:
    """`fn(item)` for every item on the worker threads (fn calls `run`); results in order.

    Reduce each run to what you need inside `fn`: at most `workers` outputs are held at once.
    """
    if self._pool is None:
      self._pool = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
    return list(self._pool.map(fn, items))

  def run(self, source: str, *, stdin: bytes = b"", files: Optional[dict[str, bytes]] = None,
          limits: Optional[Limits] = None) -> RunResult:
    """Runs `source` as /sandbox/main.py (plus `files` beside it) with `stdin`; never raises
    for anything the program does."""
    limits = limits or self.limits
    uid = self._uids.get()  # also bounds concurrent runs to `workers`
    try:
      # A sandbox_error is the host's failure, not the program's (seen once, in
      # a full test run on a loaded 2-core machine): one more try.
      for attempt in range(_ATTEMPTS):
        result = self._run_once(source, stdin, files or {}, limits, uid)
        if result.status != "sandbox_error":
          break
        logging.warning("sandbox: attempt %d of %d failed: %s", attempt + 1, _ATTEMPTS,
                        result.detail)
        if attempt + 1 < _ATTEMPTS:
          time.sleep(_RETRY_PAUSE_S)
      return result
    finally:
      self._uids.put(uid)

  def _run_once(self, source: str, stdin: bytes, files: dict[str, bytes], limits: Limits,
                uid: int) -> RunResult:
    start = time.monotonic()
    try:
      return self._run(source, stdin, files, limits, uid)
    except OSError as e:  # the host failed us (no fds, no disk, ...): not the program's doing
      return RunResult("sandbox_error", None, b"", b"", time.monotonic() - start, detail=str(e))

  def _spec(self, root: str, uid: int, limits: Limits, report_fd: int,
            cgroup: Optional[_RunCgroup]) -> dict:
    iso = self.isolation
    main = "/sandbox/main.py" if iso.filesystem else os.path.join(root, "main.py")
    home = "/sandbox" if iso.filesystem else root
    nproc = limits.processes
    if iso.limit_processes and not iso.drop_uid:  # our own uid: its other processes count too
      nproc += _other_user_processes(uid)
    return dict(
        root=root, uid=uid, gid=uid, outer_uid=os.getuid(), outer_gid=os.getgid(),
        namespaces=list(iso.namespaces), drop_to_uid=iso.drop_uid,
        limit_processes=iso.limit_processes, extra_dirs=_extra_dirs(),
        disk_bytes=limits.disk_bytes, inodes=limits.inodes, report_fd=report_fd,
        limits=dict(dataclasses.asdict(limits), processes=nproc),
        cgroup_procs=cgroup.procs_files if cgroup else [],
        argv=[os.path.realpath(sys.executable), "-I", "-B", main],
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home,
             "TMPDIR": "/tmp" if iso.filesystem else root})

  def _run(self, source: str, stdin: bytes, files: dict[str, bytes], limits: Limits,
           uid: int) -> RunResult:
    root = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
    start = time.monotonic()
    proc = cgroup = None
    try:
      if self.isolation.cgroup:
        cgroup = _RunCgroup(os.path.basename(root), limits)
      for name, data in {"main.py": source.encode("utf-8", "replace"), **files}.items():
        if os.sep in name or name.startswith("."):
          raise ValueError(f"sandbox file names must be plain names, got {name!r}")
        with open(os.path.join(root, name), "wb") as f:
          f.write(data)
        if self.isolation.drop_uid and not self.isolation.filesystem:
          os.chown(os.path.join(root, name), uid, uid)
      if self.isolation.drop_uid and not self.isolation.filesystem:
        os.chown(root, uid, uid)
      stdin_file = tempfile.TemporaryFile()  # anonymous: no path the program could find
      stdin_file.write(stdin)
      stdin_file.seek(0)
      report_r, report_w = os.pipe()
      spec = self._spec(root, uid, limits, report_w, cgroup)
      try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", JAIL, json.dumps(spec)], stdin=stdin_file,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(report_w,),
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, cwd="/", start_new_session=True)
      finally:
        os.close(report_w)
        stdin_file.close()
      result = self._watch(proc, os.fdopen(report_r, "rb", buffering=0), limits, start)
      result.out_of_memory = cgroup is not None and cgroup.out_of_memory()
      return result
    finally:
      if proc is not None:
        self._kill(proc, uid)
      if cgroup is not None:
        cgroup.remove()
      shutil.rmtree(root, ignore_errors=True)

  def _watch(self, proc: subprocess.Popen, report, limits: Limits, start: float) -> RunResult:
    """Reads output and launcher events until the program ends, a cap or the deadline."""
    caps = {proc.stdout.fileno(): limits.stdout_bytes, proc.stderr.fileno(): limits.stderr_bytes}
    out = {fd: bytearray() for fd in caps}
    events, pending = [], b""
    sel = selectors.DefaultSelector()
    for f in (proc.stdout, proc.stderr, report):
      os.set_blocking(f.fileno(), False)
      sel.register(f.fileno(), selectors.EVENT_READ)
    deadline = start + limits.wall_s
    status = None
    try:
      while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
          if not any("status" in e for e in events):
            status = "timeout"
          break
        for key, _ in sel.select(left):
          fd = key.fd
          try:
            data = os.read(fd, 1 << 16)
          except BlockingIOError:
            continue
          if not data:
            sel.unregister(fd)
            continue
          if fd == report.fileno():
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
              events.append(json.loads(line))
              if "status" in events[-1]:  # the program ended: drain what is left, briefly
                deadline = min(deadline, time.monotonic() + _DRAIN_S)
            continue
          out[fd] += data
          if len(out[fd]) > caps[fd]:
            del out[fd][caps[fd]:]
            status = "output_limit"
        if status == "output_limit":
          break
    finally:
      sel.close()
      report.close()
    wall = time.monotonic() - start
    stdout, stderr = bytes(out[proc.stdout.fileno()]), bytes(out[proc.stderr.fileno()])
    errors = [e["error"] for e in events if "error" in e]
    if errors:
      return RunResult("sandbox_error", None, stdout, stderr, wall, detail="; ".join(errors))
    exits = [e["status"] for e in events if "status" in e]
    if status is None and not exits:
      status, detail = "sandbox_error", "the launcher ended without reporting"
      return RunResult(status, None, stdout, stderr, wall, detail=detail)
    if status is not None:  # timeout / output_limit: we killed it
      return RunResult(status, None, stdout, stderr, wall)
    code = os.waitstatus_to_exitcode(exits[0])
    return RunResult("ok" if code == 0 else "signal" if code < 0 else "exit", code, stdout,
                     stderr, wall)

  def _kill(self, proc: subprocess.Popen, uid: int):
    """Kills the run's process group (and, without a pid namespace, every process of its uid)."""
    # The launcher is not reaped yet, so its pid (= the group id) cannot have been reused.
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
    proc.stdout.close()
    proc.stderr.close()
    proc.wait()
    if self.isolation.drop_uid and not self.isolation.cgroup and (
        "pid" not in self.isolation.namespaces):
      # kill(-1) as the run's uid reaches exactly its processes, setsid() or not.
      subprocess.run(["kill", "-KILL", "-1"], user=uid, group=uid, extra_groups=[],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def run_python(source: str, *, stdin: bytes = b"", limits: Limits = Limits()) -> RunResult:
  """One-off run with the default isolation (tests, debugging)."""
  box = Sandbox(limits, workers=1)
  try:
    return box.run(source, stdin=stdin)
  finally:
    box.close()
