"""SIGTERM (what Slurm, Kubernetes and `kill` send to stop a job) stops a command as Ctrl-C does: the
handler raises `Terminated`, a KeyboardInterrupt, so every path that handles Ctrl-C handles it (the
finished work is kept, one line says how much, the same command resumes); the command then exits with
143 (128 + SIGTERM) instead of Ctrl-C's 130, so a scheduler tells the two apart."""
from __future__ import annotations

import signal

TERMINATED = 143  # 128 + SIGTERM, the shell's exit status for a command stopped by it


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (raised in the main thread, where Python runs signal handlers)."""


_received = False


def _stop(signum, frame) -> None:
    global _received
    if _received:  # a second SIGTERM while the first one's stop is saving its line: let it finish
        return
    _received = True
    raise Terminated()


def stop_like_ctrl_c() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread (call it there)."""
    signal.signal(signal.SIGTERM, _stop)


def received() -> bool:
    """Whether SIGTERM has stopped this command."""
    return _received
