"""The sandbox's launcher: runs as `python -I -S -B jail.py SPEC_JSON` and
turns itself into the untrusted program.

Standard library only (it runs before the program, often as root, and must
start fast). Steps, each only where the spec asks for it (the parent probes
what this machine allows, see r1jax.sandbox.runner):

  1. unshare new mount/pid/ipc/uts/network namespaces (a user namespace too
     when not root), then fork an init: pid 1 of the new pid namespace, so
     when it exits or is killed the kernel kills everything in it;
  2. init: a fresh root on a tmpfs holding read-only binds of the system
     and interpreter directories only, a size-limited tmpfs `/sandbox`
     (the working directory) and `/tmp`, a few /dev nodes and a new /proc;
     pivot_root into it and detach the old root;
  3. init forks the program's process: rlimits (address space, CPU, file
     size, processes, open files, core 0), no-new-privileges, drop to an
     unprivileged uid when root, die with the init, exec the interpreter on
     the program. Init reports its exit status, then exits.

Before all that the launcher joins the run's cgroups when the spec names
them (memory and process caps for the run as a whole).

The parent reads one JSON line per event from fd `spec["report_fd"]`:
{"namespaces": [...]}, {"ready": true} or {"error": "..."}, and finally
{"status": <wait status>} from the init once the program has exited.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = {"mount": CLONE_NEWNS, "uts": CLONE_NEWUTS, "ipc": CLONE_NEWIPC,
                   "user": CLONE_NEWUSER, "pid": CLONE_NEWPID, "net": CLONE_NEWNET}

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

# Read-only system directories visible inside (symlinks such as /bin -> usr/bin are recreated).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache",)  # library paths only: lets the loader find libc fast
DEVICES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
  if ret != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
  enc = lambda s: s.encode() if s is not None else None
  _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
         f"mount {source} -> {target}")


def _report(fd, **event):
  os.write(fd, (json.dumps(event) + "\n").encode())


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)


def unshare(names, uid, gid):
  """Enters new namespaces; in a user namespace maps our own uid/gid 1:1 (no caps after exec)."""
  flags = 0
  for name in names:
    flags |= NAMESPACE_FLAGS[name]
  _check(_libc.unshare(ctypes.c_int(flags)), f"unshare {names}")
  if "user" in names:
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def _locked_flags(path):
  """Mount flags the source already has (a user namespace may not clear them)."""
  f = os.statvfs(path).f_flag
  out = 0
  for st, ms in ((2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC), (1024, MS_NOATIME),
                 (2048, MS_NODIRATIME), (4096, MS_RELATIME)):
    if f & st:
      out |= ms
  return out


def _bind_readonly(source, target, *, nodev=True):
  _mount(source, target, None, MS_BIND | MS_REC)
  flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | _locked_flags(source)
  # Per-mount flags only (MS_BIND): the host's mount of the same file system stays as it is.
  _mount(None, target, None, flags | (MS_NODEV if nodev else 0))


def _ensure_dir(root, path):
  os.makedirs(root + path, mode=0o755, exist_ok=True)


def build_root(spec):
  """A new root on a tmpfs at spec["root"], entered with pivot_root; cwd = /sandbox."""
  root = spec["root"]
  uid, gid = spec["uid"], spec["gid"]
  files = {}
  for name in os.listdir(root):  # the program and its files, written by the parent
    with open(os.path.join(root, name), "rb") as f:
      files[name] = f.read()
  _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
  _mount("r1jax-sandbox", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
  for path in SYSTEM_DIRS + tuple(spec["extra_dirs"]):
    if os.path.islink(path):
      if not os.path.lexists(root + path):
        _ensure_dir(root, os.path.dirname(path))
        os.symlink(os.readlink(path), root + path)
    elif os.path.isdir(path) and not os.path.isdir(root + path):
      _ensure_dir(root, path)
      _bind_readonly(path, root + path)
  for path in SYSTEM_FILES:
    if os.path.isfile(path):
      _ensure_dir(root, os.path.dirname(path))
      open(root + path, "w").close()
      _bind_readonly(path, root + path)
  _ensure_dir(root, "/dev")
  for name in DEVICES:
    if os.path.exists(f"/dev/{name}"):
      open(f"{root}/dev/{name}", "w").close()
      _bind_readonly(f"/dev/{name}", f"{root}/dev/{name}", nodev=False)
  for d in ("/sandbox", "/tmp"):
    _ensure_dir(root, d)
    _mount("r1jax-sandbox", root + d, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={spec['disk_bytes']},nr_inodes={spec['inodes']},mode=0700,uid={uid},gid={gid}")
  for name, data in files.items():
    path = f"{root}/sandbox/{name}"
    with open(path, "wb") as f:
      f.write(data)
    os.chown(path, uid, gid)
  if "pid" in spec["namespaces"]:
    _ensure_dir(root, "/proc")
    try:
      _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
      pass  # some container runtimes forbid a new /proc; programs rarely need it
  os.chdir(root)
  number = SYS_PIVOT_ROOT.get(os.uname().machine)
  if number is not None:
    # pivot_root(".", "."): the old root ends up stacked on the new one; detach it.
    _check(_libc.syscall(number, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
  else:
    os.chroot(".")
  os.chdir("/")
  # Our tmpfs becomes read-only (MS_BIND: this mount's flags only, never a superblock's).
  _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
  os.chdir("/sandbox")


def set_limits(spec):
  lim = spec["limits"]
  cpu = int(lim["cpu_s"] + 0.999)
  for res, value in ((resource.RLIMIT_AS, lim["memory_bytes"]),
                     (resource.RLIMIT_CPU, (cpu, cpu + 1)),
                     (resource.RLIMIT_FSIZE, lim["file_bytes"]),
                     (resource.RLIMIT_NOFILE, lim["open_files"]),
                     (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_MEMLOCK, 0),
                     (resource.RLIMIT_MSGQUEUE, 0)):
    resource.setrlimit(res, value if isinstance(value, tuple) else (value, value))
  if spec["limit_processes"]:
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["processes"], lim["processes"]))


def drop_privileges(uid, gid):
  os.setgroups([])
  os.setresgid(gid, gid, gid)
  os.setresuid(uid, uid, uid)


def drop_capabilities():
  """Empties the bounding set: the exec'd program, though uid 0, has no capabilities."""
  for cap in range(64):
    if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: no such cap
      _check(-1, f"prctl capbset_drop {cap}")


def program(spec, parent_pid):
  """The program's process: limits, no privileges, then exec (never returns)."""
  fd = spec["report_fd"]
  try:
    set_limits(spec)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl no_new_privs")
    if spec["drop_to_uid"]:
      drop_privileges(spec["uid"], spec["gid"])
    elif os.geteuid() == 0:
      drop_capabilities()  # staying uid 0 (no uid to drop to): at least without its powers
    # After the uid change (which clears it): die with the init below.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl pdeathsig")
    if os.getppid() != parent_pid:
      os._exit(125)  # the init already died
    _report(fd, ready=True)
    os.set_inheritable(fd, False)  # closed by a successful exec; still ours if it fails
    os.execve(spec["argv"][0], spec["argv"], spec["env"])
  except BaseException as e:  # pylint: disable=broad-except
    try:
      _report(fd, error=f"{type(e).__name__}: {e}")
    finally:
      os._exit(125)


def init(spec):
  """Pid 1 of the new pid namespace (or just the program's parent without one):
  builds the jail, starts the program, reaps orphans, reports the program's
  wait status and exits, which makes the kernel kill whatever is left in the
  namespace. The program is not pid 1 itself, so signals (SIGXCPU at the CPU
  limit, its own kill()s) behave as usual for it. Never returns."""
  fd = spec["report_fd"]
  try:
    os.umask(0o022)
    if "mount" in spec["namespaces"]:
      build_root(spec)
    else:
      os.chdir(spec["root"])
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl pdeathsig")
    me = os.getpid()
    pid = os.fork()
    if pid == 0:
      program(spec, me)
    while True:
      try:
        done, status = os.waitpid(-1, 0)
      except InterruptedError:
        continue
      if done == pid:
        _report(fd, status=status)
        os._exit(0)
  except BaseException as e:  # pylint: disable=broad-except
    try:
      _report(fd, error=f"{type(e).__name__}: {e}")
    finally:
      os._exit(125)


def main():
  spec = json.loads(sys.argv[1])
  fd = spec["report_fd"]
  try:
    for path in spec["cgroup_procs"]:  # the run's cgroups: we and all we start are in them
      _write(path, str(os.getpid()))
    if spec["namespaces"]:
      unshare(spec["namespaces"], spec["outer_uid"], spec["outer_gid"])
    _report(fd, namespaces=spec["namespaces"])
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl pdeathsig")
  except BaseException as e:  # pylint: disable=broad-except
    _report(fd, error=f"{type(e).__name__}: {e}")
    os._exit(125)
  pid = os.fork()
  if pid == 0:
    init(spec)
  # The launcher stays root in the host's namespaces, outside the program's
  # reach (another uid), and only waits; it lets go of the output pipes so the
  # parent sees EOF when the program and its children are gone.
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  os.close(fd)
  while True:
    try:
      os.waitpid(pid, 0)
      break
    except InterruptedError:
      continue
  os._exit(0)


if __name__ == "__main__":
  main()
