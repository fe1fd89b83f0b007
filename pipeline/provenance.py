"""What code made a run: patchsweep's version and the git commit the package was built from.

The version is the installed package's metadata (pyproject.toml's, as pip recorded it). The commit is
recorded when the wheel is built: setup.py writes it into the wheel as pipeline/_commit.txt. A package run
from its own checkout (an editable install, the Docker image, the tests) reads the checkout's .git, by its
files, so no git program is needed. A repository the installed package merely lies inside (a user's
project holding its virtualenv) is never asked: it is not the code that ran.

setup.py loads this file by its path at build time, before any dependency is installed: standard library
only.
"""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

PACKAGE = "patchsweep"
BUILT_COMMIT = Path(__file__).with_name("_commit.txt")  # written into the wheel by setup.py
CHECKOUT = Path(__file__).resolve().parent.parent  # the repository root, when run from a checkout
NOT_RECORDED = "not recorded (built without its git history)"


def version() -> str:
    """The installed package's version; a checkout that was never installed reads its pyproject.toml."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        found = re.search(r'^version = "([^"]+)"', (CHECKOUT / "pyproject.toml").read_text(), re.M)
        return found.group(1)


def commit() -> str:
    """The commit recorded in the wheel, else that of the checkout the package runs from."""
    if BUILT_COMMIT.is_file():
        return BUILT_COMMIT.read_text().strip()
    return checkout_commit(CHECKOUT) or NOT_RECORDED


def checkout_commit(root: Path) -> str | None:
    """The commit checked out at `root` (a repository, or a worktree whose .git is a file naming its git
    folder), read from git's files; None where `root` holds no repository."""
    git = root / ".git"
    try:
        if git.is_file():
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head  # a detached head is the commit itself
        ref = head[len("ref: "):]
        common = (git / (git / "commondir").read_text().strip()).resolve() if (git / "commondir").is_file() else git
        for folder in (git, common):
            if (folder / ref).is_file():
                return (folder / ref).read_text().strip()
        for line in (common / "packed-refs").read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    except (OSError, IndexError):
        return None
    return None
