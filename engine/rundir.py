"""The run folder (``--out-dir``) before any work: one run at a time in it, and every folder the run writes writable.

The lock: ``<out-dir>/.lock``, an advisory ``flock`` (exclusive, non-blocking) taken by global rank 0 and held on an
open file for the run's life; the holder's host, pid, start time and command are written inside it, so a second run
on the same folder is refused with a message naming the holder. Under ``torchrun`` / ``deepspeed`` the other ranks
learn of a refusal through one collective before any work (`agree`) and exit with the same message.

Stale locks: the kernel drops an flock when the last descriptor of its open file is closed — when ``main`` returns,
or when the process dies in any way (an exception, SIGKILL, the OOM killer, a lost node's processes ending). So a
crashed run leaves no stale lock: the file stays, unlocked, and the next run takes it and rewrites the holder. (On
NFS, Linux emulates flock with POSIX locks held by the client; a client that disappears loses them when the
server's lease expires, NFSv4: ~90 s.) A filesystem without locks (ENOLCK) is reported and the run goes on unlocked.

Writability: ``<out-dir>``, ``<out-dir>/checkpoints`` and (with TensorBoard) ``<out-dir>/tensorboard`` are created
and a probe file is written to and removed from each, on every rank (every rank writes its checkpoint shards) —
before training, so a read-only folder is not found at the first save, after the steps are spent.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile

import torch.distributed as dist

from pisa_zero._utils import dist_on

LOCK_FILE = ".lock"


def agree(problem: str | None) -> None:
    """Collective, before any work: SystemExit on every rank, with the lowest rank's message, when any rank has a
    problem (so no rank trains on alone, or waits in a collective for ranks that have left)."""
    problems = [problem]
    if dist_on():
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    found = [p for p in problems if p]
    if found:
        raise SystemExit(found[0])


def writable_problem(out_dir: str, folders: list[str]) -> str | None:
    """None when every folder exists (created if need be) and takes a new file; else what is wrong, named."""
    for folder in folders:
        try:
            os.makedirs(folder, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            return (
                f"[pisa_zero] --out-dir {out_dir}: cannot write to {folder} ({e.strerror or e}); checked before "
                "training, so no step was spent. Use a writable --out-dir."
            )
    return None


def _holder() -> dict:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "command": " ".join(sys.argv)}


def _describe(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 1 << 16, 0).decode())
        return f"pid {h['pid']} on {h['host']}, started {h['started']} ({h['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


class RunLock:
    """The run folder's advisory lock (see the module doc). ``acquire()`` returns None when held, else the refusal."""

    def __init__(self, out_dir: str):
        self.out_dir, self.path, self.fd = out_dir, os.path.join(out_dir, LOCK_FILE), None

    def acquire(self, say=print) -> str | None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return f"[pisa_zero] --out-dir {self.out_dir}: cannot open its lock {self.path} ({e.strerror or e})"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                say(f"[pisa_zero] warning: cannot lock {self.path} ({e.strerror}); the run folder is not protected")
                return None
            holder = _describe(fd)
            os.close(fd)
            return (
                f"[pisa_zero] --out-dir {self.out_dir} is in use by another run: {holder} holds {self.path}. Two "
                "runs in one folder interleave their checkpoints; wait for that run to end (the lock goes with its "
                "process, however it ends), stop it, or use another --out-dir."
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


@contextlib.contextmanager
def claim(args, rank: int, say=print):
    """Every rank: check the folders are writable, rank 0 takes the lock, and all agree (SystemExit on every rank
    when any refuses); the lock is held inside the ``with`` and released on leaving it."""
    folders = [args.out_dir, os.path.join(args.out_dir, "checkpoints")]
    folders += [] if args.no_tensorboard else [os.path.join(args.out_dir, "tensorboard")]
    problem = writable_problem(args.out_dir, folders)
    lock = RunLock(args.out_dir) if rank == 0 else None
    try:
        if problem is None and lock is not None:
            problem = lock.acquire(say)
        agree(problem)
        yield lock
    finally:
        if lock is not None:
            lock.release()
