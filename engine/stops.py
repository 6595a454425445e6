"""Why a run stops early: a signal (SIGINT, SIGTERM), its launcher gone, or the time limit.

Each rank records the reason locally; the training loop all-reduces "any rank wants to stop" with the step's other
flags, so every rank stops after the same step, writes the final checkpoint and exits. A third signal exits at once.

The launcher watch: a rank started by ``torchrun`` or by DeepSpeed's ``deepspeed.launcher.launch`` (itself started by
the ``deepspeed`` command) stops as if sent SIGTERM when any of those processes is gone. That is what a job scheduler
does when it sends SIGTERM to the top process only: ``deepspeed`` has no handler for it (single node), dies at once,
and its ranks would otherwise train on, unowned.
"""

from __future__ import annotations

import os
import signal
import threading
import time

_LAUNCHER_SCRIPTS = ("deepspeed", "torchrun")
_LAUNCHER_MODULES = ("deepspeed.launcher.launch", "torch.distributed.run", "torch.distributed.launch")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid`` from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _is_launcher(pid: int) -> bool:
    """``deepspeed ...``/``torchrun ...`` (the script, maybe run by python) or ``python -m <launcher module>``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")[:4]
    except OSError:
        return False
    return any(os.path.basename(a) in _LAUNCHER_SCRIPTS or a in _LAUNCHER_MODULES for a in argv)


def launcher_chain() -> list[tuple[int, int]]:
    """[(pid, its parent pid)] of the launcher processes above this one (empty when not launched by one)."""
    chain, pid = [], os.getppid()
    while pid > 1 and _is_launcher(pid):
        stat = _stat(pid)
        if stat is None:
            break
        chain.append((pid, stat[1]))
        pid = stat[1]
    return chain


def _alive(pid: int, parent: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[1] == parent


class StopRequest:
    """``reason`` is None until this rank wants to stop; ``exit_code`` is what the run then exits with.

    ``close()`` puts back the SIGINT/SIGTERM handlers it replaced and ends the launcher watch (for a loop run more
    than once in one process; a process that exits after its run need not call it)."""

    def __init__(self, watch_launcher: bool = True, poll_s: float = 1.0):
        self.reason: str | None = None
        self.exit_code = 0
        self.signals = 0
        self._closed = False
        self._previous = {sig: signal.signal(sig, self._signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        self._chain = launcher_chain() if watch_launcher else []
        if self._chain:
            threading.Thread(target=self._watch, args=(poll_s,), daemon=True, name="launcher-watch").start()

    def close(self) -> None:
        self._closed = True
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def request(self, reason: str, exit_code: int) -> None:
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code

    def _signal(self, signum, frame):
        self.signals += 1
        if self.signals >= 3:
            os._exit(128 + signum)
        self.request(signal.Signals(signum).name, 128 + signum)

    def _watch(self, poll_s: float) -> None:
        parent = os.getppid()
        while self.reason is None and not self._closed:
            gone = [pid for pid, ppid in self._chain if not _alive(pid, ppid)]
            if gone or os.getppid() != parent:
                self.request(f"launcher process {gone[0] if gone else parent} exited", 128 + signal.SIGTERM)
                return
            time.sleep(poll_s)
