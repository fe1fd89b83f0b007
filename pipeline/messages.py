"""The one line patchsweep prints when it stops or has something to say: `patchsweep: error: <the
problem>: <the fix>`. Built here alone; imports nothing, so any layer can use it."""
from __future__ import annotations

PROGRAM = "patchsweep"
INTERRUPTED = 130  # the shell's exit status for a command stopped by SIGINT


def first_line(err: BaseException) -> str:
    """What `err` says, cut to its first line (libraries' messages run over many); its type's name when
    it says nothing."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def error_line(message: object) -> str:
    return f"{PROGRAM}: error: {message}"


def notice_line(message: object) -> str:
    """A line that is not an error: a notice, or what an interrupted command finished."""
    return f"{PROGRAM}: {message}"
