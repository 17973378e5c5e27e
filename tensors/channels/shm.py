"""Same-host channel over shared-memory files: one copy on the sender, none on the receiver.

The sender writes the wire header and buffers into a segment (a file in /dev/shm) and sets its
state to READY last, so a half-written segment is never mistaken for a payload.  The receiver
maps the segment and builds the tensors on the mapping (no pickling, no copy).

Ownership and cleanup:
* the sender owns its segments (files ``boba-shm-<pid>-<pidns>-<start>-<token>-<n>``: its pid, the
  inode of its pid namespace and its start time in clock ticks since boot) and reuses them, so their
  pages are faulted in once rather than on every transfer;
* the pages a send writes are reserved first (posix_fallocate): writing an unbacked page of a full
  tmpfs (Docker's /dev/shm is 64 MiB) would kill the sender with SIGBUS, a reservation fails with
  ENOSPC, which send() raises as TransferError naming the size and the directory;
* a reader records its pid in the segment (under an flock) and clears it when all the tensors it
  built are garbage collected;
* a segment is written again only when each reader that came has released it or died, and either
  all readers came or the send's time to live passed (a late reader then gets TransferError
  "expired");
* the sender unlinks its segments on close() and at interpreter exit; segments of a sender that was
  killed are unlinked by sweep_orphans(), which every ShmChannel runs when created.  A segment counts
  as orphaned only when its pid namespace is ours and no process with its pid and start time runs:
  a /dev/shm shared between containers holds other namespaces' live segments, whose pids mean
  nothing here, and a recycled pid is not the owner.

A receiver trusts a descriptor only as far as it must: the path has to be a segment name in the
channel's directory (no other file is opened), opened without following links, its header may
claim at most MAX_READERS readers and no more bytes than the file holds (a read past the end of a
shared file is a SIGBUS too).
Tensors received with readers > 1 share pages with the other readers: treat them as read-only.

Over 500 lines on purpose: the segment layout, its state machine and the sweep of orphans are one
protocol between writer and readers; split across files, each half would be unreadable without the other.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import mmap
import os
import re
import socket
import stat
import struct
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from tensors import wire
from tensors.channels.base import Channel, Descriptor, Payload, check_descriptor, check_payload, check_send_args
from tensors.errors import TransferError, WireError

PREFIX = "boba-shm"
MAX_READERS = 16
_MAGIC = b"BOBASHM1"
_STATE = struct.Struct("<8sQIIIIQQ16I")  # magic gen state readers taken released header_len data_end pids
_HEADER_OFFSET = 256
_ALIGN = 64
_WRITING, _READY = 1, 2
_THREAD_BYTES = 64 << 20  # copies this big (> ~10 ms) run in a worker thread, off the event loop
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; pre-faults the receiver's page tables in one call
# pid, pid-namespace inode, start time (clock ticks since boot), channel token, segment number
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-(\d+)-[0-9a-f]{{8}}-\d+$")


def shm_directory() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass
class _State:
    gen: int = 0
    state: int = _WRITING
    readers: int = 0
    taken: int = 0
    released: int = 0
    header_len: int = 0
    data_end: int = 0
    pids: list[int] = field(default_factory=lambda: [0] * MAX_READERS)

    @classmethod
    def read(cls, fd: int) -> _State | None:
        raw = os.pread(fd, _STATE.size, 0)
        if len(raw) < _STATE.size:
            return None
        magic, *vals = _STATE.unpack(raw)
        if magic != _MAGIC:
            return None
        return cls(*vals[:7], pids=list(vals[7:]))

    def write(self, fd: int) -> None:
        vals = (self.gen, self.state, self.readers, self.taken, self.released, self.header_len, self.data_end)
        os.pwrite(fd, _STATE.pack(_MAGIC, *vals, *self.pids), 0)


@contextlib.contextmanager
def _locked(fd: int, deadline: float) -> Iterator[None]:
    """flock with a deadline (a process stopped while holding it must not hang us)."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError("segment lock held too long") from None
            time.sleep(0.0005)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def layout(header_len: int, sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of the buffers after the header (each 64-byte aligned) and the end of the data."""
    off, offsets = _align(_HEADER_OFFSET + header_len), []
    for n in sizes:
        offsets.append(off)
        off = _align(off + n)
    return offsets, off


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_namespace() -> int:
    """Inode of this process's pid namespace (0 where /proc has none): pids compare only within one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (0 where /proc has none); None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else (0 if _alive(pid) else None)
    except OSError:  # hidden by hidepid: fall back to the signal check
        return 0 if _alive(pid) else None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22; the name in () may hold spaces


_OWNER_TAGS: dict[int, str] = {}


def _owner_tag() -> str:
    """``<pid>-<pidns>-<start>`` of this process (recomputed after a fork)."""
    pid = os.getpid()
    if pid not in _OWNER_TAGS:
        _OWNER_TAGS[pid] = f"{pid}-{_pid_namespace()}-{_start_time(pid) or 0}"
    return _OWNER_TAGS[pid]


def _owner_alive(pid: int, start: int) -> bool:
    """The process that created a segment of our pid namespace still runs (not just its pid)."""
    now = _start_time(pid)
    return now is not None and (start == 0 or now == 0 or now == start)


def sweep_orphans(directory: str | None = None) -> list[str]:
    """Unlink segments of our pid namespace whose creating process is gone; returns their paths.

    Segments of another pid namespace (another container sharing /dev/shm) are never touched, nor
    are names of another format.
    """
    directory = directory or shm_directory()
    ns = _pid_namespace()
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            m = _NAME_RE.match(name)
            if m and int(m.group(2)) == ns and not _owner_alive(int(m.group(1)), int(m.group(3))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
                    removed.append(os.path.join(directory, name))
    return removed


# ---- sender side -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Segment:
    path: str
    fd: int
    mm: mmap.mmap
    view: torch.Tensor  # uint8 over the whole mapping
    capacity: int
    ready_at: float = 0.0
    ttl: float = 0.0
    busy: bool = False  # a send of this process is writing it
    reserved: int = 0  # bytes from the start backed by tmpfs pages (posix_fallocate)


def _reserve(seg: _Segment, end: int, sender: str, directory: str) -> None:
    """Back bytes [0, end) with pages now, so that writing them cannot SIGBUS on a full tmpfs."""
    if end <= seg.reserved or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(seg.fd, seg.reserved, end - seg.reserved)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate: write sparse
            seg.reserved = seg.capacity
            return
        raise TransferError(
            sender, "-", "reserve",
            f"cannot reserve {end} bytes of shared memory in {directory}: {e.strerror or e} "
            f"(a full tmpfs; Docker's default /dev/shm is 64 MiB: raise it with --shm-size)",
        ) from None
    seg.reserved = end


def _unlink_all(paths: set[str]) -> None:
    for p in list(paths):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    paths.clear()


def _write_segment(seg: _Segment, header: bytes, buffers: list[memoryview], offsets: list[int]) -> None:
    seg.mm[_HEADER_OFFSET : _HEADER_OFFSET + len(header)] = header
    for off, buf in zip(offsets, buffers):
        if buf.nbytes:
            seg.view[off : off + buf.nbytes].copy_(torch.frombuffer(buf, dtype=torch.uint8))


class _PoolFull(Exception):
    """No segment is free and a new one would pass max_pool_bytes (the message says by how much)."""


def _capacity(size: int) -> int:
    """A new segment's size for a payload of ``size`` bytes (sparse: only reserved pages cost memory)."""
    return max(1 << 20, 1 << (size - 1).bit_length())


class ShmChannel(Channel):
    kind = "shm"

    def __init__(
        self,
        *,
        name: str | None = None,
        directory: str | None = None,
        max_pool_bytes: int = 4 << 30,
        checksum: bool = False,
        max_cached_maps: int = 16,
    ):
        super().__init__(name)
        self.directory = directory or shm_directory()
        self.max_pool_bytes = max_pool_bytes
        self.checksum = checksum
        self._token = uuid.uuid4().hex[:8]
        self._count = 0
        self._segments: list[_Segment] = []
        self._paths: set[str] = set()
        self._finalizer = weakref.finalize(self, _unlink_all, self._paths)
        self._maps: collections.OrderedDict[str, list] = collections.OrderedDict()  # path -> [ino, mmap, populated]
        self._max_cached_maps = max_cached_maps
        self._maps_lock = threading.Lock()
        self._host = socket.gethostname()
        sweep_orphans(self.directory)

    # ---- send ----
    async def send(self, payload: Payload, *, timeout: float, readers: int = 1) -> Descriptor:
        check_payload(payload)
        check_send_args(timeout, readers)
        if readers > MAX_READERS:
            raise ValueError(f"shm supports at most {MAX_READERS} readers per payload, got {readers}")
        header, buffers = wire.encode(payload, checksum=self.checksum)
        offsets, end = layout(len(header), [b.nbytes for b in buffers])
        deadline = time.monotonic() + timeout
        while True:  # the pool stays within max_pool_bytes: a send waits for a segment its readers are done with
            try:
                seg, state = self._acquire(end, readers, deadline)
                break
            except TimeoutError:
                raise TransferError(self.name, "-", "lock", f"no segment lock within {timeout}s") from None
            except _PoolFull as full:
                if time.monotonic() >= deadline:
                    raise TransferError(self.name, "-", "pool", f"{full}, none freed within {timeout}s") from None
            await asyncio.sleep(0.05)
        copy = None
        try:
            _reserve(seg, end, self.name, self.directory)
            if end >= _THREAD_BYTES:
                copy = asyncio.get_running_loop().run_in_executor(None, _write_segment, seg, header, buffers, offsets)
                await asyncio.shield(copy)
            else:
                _write_segment(seg, header, buffers, offsets)
            state.state, state.header_len, state.data_end = _READY, len(header), end
            with _locked(seg.fd, deadline):
                state.write(seg.fd)  # READY is written last: a crash before this leaves a WRITING segment
        except BaseException as e:
            if copy is not None and not copy.done():  # cancelled mid-copy: free it once the copy stops
                copy.add_done_callback(lambda _: setattr(seg, "busy", False))
            else:
                seg.busy = False
            if isinstance(e, TimeoutError):
                raise TransferError(self.name, "-", "lock", f"no segment lock within {timeout}s") from None
            raise
        seg.ready_at, seg.ttl, seg.busy = time.monotonic(), timeout, False
        return {
            "kind": self.kind,
            "id": f"{os.path.basename(seg.path)}#{state.gen}",
            "src": self.name,
            "host": self._host,
            "path": seg.path,
            "gen": state.gen,
            "nbytes": end,
        }

    def _acquire(self, size: int, readers: int, deadline: float) -> tuple[_Segment, _State]:
        now = time.monotonic()
        for seg in sorted((s for s in self._segments if not s.busy and s.capacity >= size), key=lambda s: s.capacity):
            with _locked(seg.fd, deadline):
                state = _State.read(seg.fd)
                if state is not None and self._reusable(seg, state, now):
                    state = _State(gen=state.gen + 1, state=_WRITING, readers=readers)
                    state.write(seg.fd)
                    seg.busy = True
                    return seg, state
        self._trim(_capacity(size), now, deadline)
        held = sum(s.capacity for s in self._segments)
        if self._segments and held + _capacity(size) > self.max_pool_bytes:
            raise _PoolFull(f"the shm pool holds {held} bytes of segments still to be read: {_capacity(size)} more "
                            f"would pass max_pool_bytes={self.max_pool_bytes}")
        seg = self._create(size)
        state = _State(gen=1, state=_WRITING, readers=readers)
        state.write(seg.fd)
        seg.busy = True
        return seg, state

    @staticmethod
    def _reusable(seg: _Segment, s: _State, now: float) -> bool:
        if seg.busy:
            return False
        if s.state != _READY:
            return True  # a write that failed half-way
        if s.taken < s.readers and now < seg.ready_at + seg.ttl:
            return False  # readers still to come
        # every reader released it (slot cleared) or died holding it
        return not any(pid and _alive(pid) for pid in s.pids[: s.taken])

    def _create(self, size: int) -> _Segment:
        capacity = _capacity(size)
        self._count += 1
        path = os.path.join(self.directory, f"{PREFIX}-{_owner_tag()}-{self._token}-{self._count}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        self._paths.add(path)
        try:
            os.ftruncate(fd, capacity)
            mm = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self._drop_path(path)
            raise
        view = torch.from_numpy(np.frombuffer(mm, dtype=np.uint8))
        seg = _Segment(path, fd, mm, view, capacity)
        self._segments.append(seg)
        return seg

    def _trim(self, incoming: int, now: float, deadline: float) -> None:
        """Unlink reusable segments while the pool would exceed max_pool_bytes."""
        for seg in sorted(self._segments, key=lambda s: -s.capacity):
            if sum(s.capacity for s in self._segments) + incoming <= self.max_pool_bytes:
                return
            if seg.busy:
                continue
            with _locked(seg.fd, deadline):
                state = _State.read(seg.fd)
                if state is None or not self._reusable(seg, state, now):
                    continue
            self._discard(seg)

    def _discard(self, seg: _Segment) -> None:
        self._segments.remove(seg)
        self._drop_path(seg.path)
        seg.view = None  # type: ignore[assignment]
        with contextlib.suppress(BufferError, ValueError):
            seg.mm.close()
        os.close(seg.fd)

    def _drop_path(self, path: str) -> None:
        self._paths.discard(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    # ---- receive ----
    async def recv(self, descriptor: Descriptor, *, timeout: float) -> Payload:
        peer, tid = check_descriptor(descriptor, self.kind, ("path", "gen", "host", "nbytes"), timeout)
        if descriptor["nbytes"] >= _THREAD_BYTES:
            return await asyncio.to_thread(self._recv, descriptor, peer, tid, timeout)
        return self._recv(descriptor, peer, tid, timeout)

    def _recv(self, d: Descriptor, peer: str, tid: str, timeout: float) -> Payload:
        deadline = time.monotonic() + timeout
        path, gen = self._segment_path(d["path"], peer, tid), d["gen"]
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise TransferError(peer, tid, "open", f"segment {path} is a symbolic link") from None
            if e.errno != errno.ENOENT:
                raise TransferError(peer, tid, "open", f"cannot open segment {path}: {e.strerror}") from None
            where = "" if d["host"] == self._host else f" (it lives on host {d['host']}, this is {self._host})"
            raise TransferError(
                peer, tid, "open", f"segment {path} is gone: the sender closed or died and was swept{where}"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TransferError(peer, tid, "open", f"segment {path} is not a regular file")
            ino = st.st_ino
            try:
                with _locked(fd, deadline):
                    state = _State.read(fd)
                    self._check_state(state, gen, peer, tid)
                    self._check_sizes(state, st.st_size, path, peer, tid)
                    state.pids[state.taken] = os.getpid()
                    state.taken += 1
                    state.write(fd)
            except TimeoutError:
                raise TransferError(peer, tid, "lock", f"segment lock not free within {timeout}s") from None
            mm = self._mapping(path, fd, ino, state.data_end)
        finally:
            os.close(fd)
        arr = np.frombuffer(mm, dtype=np.uint8, count=state.data_end)
        weakref.finalize(arr, _release, path, ino, gen)  # fires when the last tensor built on it dies
        base = torch.from_numpy(arr)
        try:
            header = wire.parse_header(bytes(arr[_HEADER_OFFSET : _HEADER_OFFSET + state.header_len]))
            offsets, end = layout(state.header_len, [e.nbytes for e in header.entries])
            if end > state.data_end:
                raise WireError("tensors", f"buffers end at byte {end} but the segment holds {state.data_end}")
            return wire.decode(header, [base[o : o + e.nbytes] for o, e in zip(offsets, header.entries)])
        except WireError as e:
            raise TransferError(peer, tid, "decode", str(e)) from e

    def _segment_path(self, path: object, peer: str, tid: str) -> str:
        """The descriptor's path, if it names a segment in our directory: no other file is ever opened."""
        if (not isinstance(path, str) or os.path.dirname(path) != self.directory
                or not _NAME_RE.match(os.path.basename(path))):
            raise TransferError(
                peer, tid, "open",
                f"refusing segment path {path!r}: not a {PREFIX}-<pid>-<pidns>-<start>-<token>-<n> "
                f"file directly in {self.directory}",
            )
        return path

    @staticmethod
    def _check_sizes(state: _State, file_size: int, path: str, peer: str, tid: str) -> None:
        """A header that claims bytes past the end of the file would SIGBUS the reader."""
        if not _HEADER_OFFSET <= _HEADER_OFFSET + state.header_len <= state.data_end <= file_size:
            raise TransferError(
                peer, tid, "open",
                f"segment {path} header claims {state.header_len} header bytes and data up to byte "
                f"{state.data_end}, but the file holds {file_size}",
            )

    @staticmethod
    def _check_state(state: _State | None, gen: int, peer: str, tid: str) -> None:
        if state is None:
            raise TransferError(peer, tid, "open", "not a boba shm segment (bad magic or truncated)")
        if not 1 <= state.readers <= MAX_READERS or state.taken > state.readers:
            raise TransferError(
                peer, tid, "open",
                f"segment header claims {state.readers} readers ({state.taken} taken); at most {MAX_READERS}",
            )
        if state.gen != gen:
            raise TransferError(
                peer, tid, "open", f"expired: the segment now holds generation {state.gen}, not {gen}"
            )
        if state.state != _READY:
            raise TransferError(peer, tid, "open", "segment is half-written (the sender died while writing it)")
        if state.taken >= state.readers:
            raise TransferError(peer, tid, "open", f"already taken by all {state.readers} reader(s)")

    def _mapping(self, path: str, fd: int, ino: int, data_end: int) -> mmap.mmap:
        """The segment's mapping (kept between receives), its page tables filled up to data_end."""
        with self._maps_lock:  # big receives run in worker threads
            return self._mapping_locked(path, fd, ino, data_end)

    def _mapping_locked(self, path: str, fd: int, ino: int, data_end: int) -> mmap.mmap:
        cached = self._maps.get(path)
        if cached is not None and cached[0] == ino:
            self._maps.move_to_end(path)
        else:
            mm = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            cached = self._maps[path] = [ino, mm, 0]
            while len(self._maps) > self._max_cached_maps:
                self._maps.popitem(last=False)  # tensors still using it keep it mapped
        if data_end > cached[2]:  # one call instead of a page fault per 4 KiB on first touch
            with contextlib.suppress(OSError, ValueError):
                cached[1].madvise(_MADV_POPULATE_WRITE, 0, data_end)
            cached[2] = data_end
        return cached[1]

    def close_now(self) -> None:
        with self._maps_lock:
            self._maps.clear()
        for seg in list(self._segments):
            self._discard(seg)
        self._finalizer()


def _release(path: str, ino: int, gen: int) -> None:
    """A reader's tensors are gone: count it released (best effort; the segment may be gone)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)  # path was checked by _recv
    except Exception:  # gone, or the interpreter is shutting down
        return
    try:
        if os.fstat(fd).st_ino != ino:
            return
        with _locked(fd, time.monotonic() + 5.0):
            state = _State.read(fd)
            me = os.getpid()
            if state is not None and state.gen == gen and me in state.pids[: state.taken]:
                state.pids[state.pids.index(me)] = 0  # this reader's slot: no longer holding it
                state.released += 1
                state.write(fd)
    except Exception:
        pass
    finally:
        os.close(fd)
