"""The one line patchsweep prints when it stops or has something to say: `patchsweep: error: <the
problem>: <the fix>`, and `redact`, which keeps credentials out of it and out of every file the project
writes. Built here alone; imports nothing but `re`, so any layer can use it."""
from __future__ import annotations

import re

PROGRAM = "patchsweep"
INTERRUPTED = 130  # the shell's exit status for a command stopped by SIGINT

# The user-info part of a URI (`scheme://user:password@`, `scheme://token@`): everything between `://` and
# the authority's last `@` (a password may hold an unencoded `@`; the authority ends at / ? # or a space).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#@'\"<>`]*(?:@[^\s/?#@'\"<>`]*)*@")
REDACTED = "***"


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it replaced by ***: `http://user:pw@host:5000/x` ->
    `http://***@host:5000/x`. The process itself connects with the real URI; what it prints, logs or
    writes goes through here (MLflow's own credentials belong in MLFLOW_TRACKING_USERNAME/_PASSWORD)."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)


def first_line(err: BaseException) -> str:
    """What `err` says, cut to its first line (libraries' messages run over many); its type's name when
    it says nothing."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def error_line(message: object) -> str:
    return redact(f"{PROGRAM}: error: {message}")


def notice_line(message: object) -> str:
    """A line that is not an error: a notice, or what an interrupted command finished."""
    return redact(f"{PROGRAM}: {message}")
