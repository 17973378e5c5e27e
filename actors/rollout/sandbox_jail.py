"""The sandbox's child side: set up the jail, drop to the sandbox's uid and exec the snippet's interpreter.

Run by actors.rollout.sandbox as ``python -I -S -B sandbox_jail.py CONFIG_JSON`` with the snippet on stdin and
a notes pipe (fd ``notes_fd``) on which it says, one JSON object a line, what it could not apply and how the
snippet's process ended. Standard library only (it runs isolated, without site-packages) and self-contained:
it imports nothing of ours.

As root: new network, mount and PID namespaces (the snippet's process is PID 1 of its own namespace, so when
it ends, or is killed, every process it started dies with it; a loopback that is down is its only network);
inside, a size-capped tmpfs as the scratch directory, empty tmpfs over /tmp, /var/tmp and /dev/shm (the
host's shared files out of sight), the interpreter's directories exposed through a private tmpfs where a
mode-0700 parent (e.g. /root) hides them, a fresh /proc, and every other mount remounted read-only and
nosuid (a per-mount flag of this namespace: the host's mounts are untouched). Then rlimits, no
supplementary groups, the sandbox's own uid/gid, no_new_privs, and exec.
Not root: rlimits and no_new_privs only (the caller logs that once).
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
KEEP_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
              "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
SNIPPET = "snippet.py"
HIDE = ("/tmp", "/var/tmp", "/dev/shm")   # shared, world-writable: an empty read-only tmpfs over each

_libc = ctypes.CDLL(None, use_errno=True)
_notes = None


def note(**obj) -> None:
    if _notes is not None:
        try:
            _notes.write(json.dumps(obj) + "\n")
            _notes.flush()
        except OSError:
            pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash come as octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts() -> list[tuple[str, set[str]]]:
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f if line.strip()]
    return [(_unescape(r[4]), set(r[5].split(","))) for r in rows]


def readonly_except(keep: str) -> None:
    """Every mount point but `keep` read-only and nosuid in this mount namespace (MS_BIND: the mount's own
    flags, never the file system's, so the host keeps its read-write mounts)."""
    seen: set[str] = set()
    for path, opts in _mounts():
        if path == keep or path in seen:
            continue
        seen.add(path)
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for name, bit in KEEP_FLAGS.items():
            if name in opts:
                flags |= bit
        try:
            mount(None, path, None, flags)
        except OSError as e:
            if e.errno not in (2, 22):  # ENOENT, EINVAL: a mount hidden under another one, unreachable anyway
                note(missing=f"read-only {path}: {e.strerror}")


def expose(paths: list[str]) -> None:
    """Make `paths` (the interpreter's prefixes) reachable by an uid with no rights on a parent directory
    that is not searchable by others (/root is 0700): a tmpfs over that parent holding bind mounts of just
    `paths`, which also hides the rest of it."""
    hidden: dict[str, list[str]] = {}
    for p in paths:
        parts = p.strip("/").split("/")
        for i in range(len(parts)):
            parent = "/" + "/".join(parts[:i])
            if not os.stat(parent).st_mode & 0o001:
                hidden.setdefault(parent, []).append(p)
                break
    for parent, targets in hidden.items():
        cover(parent, targets, MS_NOSUID | MS_NODEV)


def cover(parent: str, keep: list[str], flags: int) -> None:
    """A small empty tmpfs over `parent`, with just `keep` (directories below it) bound back in place."""
    fds = [os.open(k, os.O_PATH | os.O_DIRECTORY) for k in keep]
    mount("tmpfs", parent, "tmpfs", flags, "size=64k,mode=0755")
    for k, fd in zip(keep, fds):
        os.makedirs(k, 0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", k, None, MS_BIND)
        os.close(fd)


def jail(cfg: dict) -> None:
    """In the new namespaces, as root: the file system the snippet sees."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    expose(cfg["expose"])
    for path in HIDE:  # an interpreter there (a venv in /tmp) stays reachable, read-only like the rest
        if os.path.isdir(path) and not os.path.islink(path):
            cover(path, [p for p in cfg["expose"] if p.startswith(path + "/")], MS_NOSUID | MS_NODEV | MS_NOEXEC)
    uid, scratch = cfg["uid"], cfg["scratch"]
    os.makedirs(scratch, 0o700, exist_ok=True)   # under a hidden directory it is made again, empty
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={cfg['disk_mb']}m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}")
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as e:
        note(missing=f"own /proc: {e.strerror}")
    readonly_except(scratch)


def limit(cfg: dict) -> None:
    lim = cfg["limits"]
    for name, soft, hard in (("RLIMIT_CORE", 0, 0), ("RLIMIT_AS", lim["as"], lim["as"]),
                             ("RLIMIT_CPU", lim["cpu"], lim["cpu"] + 1), ("RLIMIT_NPROC", lim["nproc"], lim["nproc"]),
                             ("RLIMIT_FSIZE", lim["fsize"], lim["fsize"]),
                             ("RLIMIT_NOFILE", lim["nofile"], lim["nofile"])):
        which = getattr(resource, name)
        cur_soft, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:  # never above what this process may have
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(which, (soft, hard))


def run_snippet(cfg: dict, code: bytes, isolated: bool) -> None:
    """Set up, drop privileges, exec: never returns (a failure exits 126 with a note saying why)."""
    try:
        uid = cfg["uid"]
        if isolated:   # PID 1 dies with the jail's parent side (set again after setuid, which clears it)
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
            jail(cfg)
        scratch = cfg["scratch"]
        path = os.path.join(scratch, SNIPPET)
        with open(path, "wb") as f:
            f.write(code)
        if uid is not None:
            os.chmod(path, 0o644)
            if not isolated:
                os.chown(scratch, uid, uid)
        os.chdir(scratch)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        limit(cfg)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        if isolated:
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        python = cfg["python"]
        os.execve(python, [python, "-I", "-B", SNIPPET], cfg["env"])
    except OSError as e:
        note(error=f"sandbox setup failed: {e}")
        os._exit(126)


_child: list[int] = []
_stop: list[bool] = []


def _on_term(signum, frame) -> None:
    """SIGTERM (the caller's timeout): kill the snippet's PID 1, which ends its whole namespace."""
    _stop.append(True)
    for pid in _child:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def relay(pid: int, deadline_s: int) -> None:
    """Wait for the snippet (PID 1 of its namespace) and end the way it ended; past `deadline_s` kill it
    (the caller's timeout comes first; this one holds when the caller died and cannot send it)."""
    _child.append(pid)
    signal.signal(signal.SIGALRM, _on_term)
    signal.alarm(deadline_s)
    if _stop:
        _on_term(signal.SIGTERM, None)
    _, status, ru = os.wait4(pid, 0)
    note(cpu_s=ru.ru_utime + ru.ru_stime)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def main() -> None:
    global _notes
    cfg = json.loads(sys.argv[1])
    os.set_inheritable(cfg["notes_fd"], False)
    _notes = os.fdopen(cfg["notes_fd"], "w")
    code = sys.stdin.buffer.read()
    isolated = False
    if cfg["uid"] is not None:
        try:
            _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare")
            isolated = True
        except OSError as e:
            note(missing=f"namespaces (network, mounts, processes): {e.strerror}")
    if isolated:
        signal.signal(signal.SIGTERM, _on_term)   # from here on a SIGTERM is never lost
        pid = os.fork()
        if pid:
            relay(pid, cfg["deadline_s"])
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run_snippet(cfg, code, isolated)


if __name__ == "__main__":
    main()
