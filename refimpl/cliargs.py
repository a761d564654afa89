"""Argument checking for every command line of refimpl (``python -m refimpl ...``, ``proofs_check``, ``figures``).

Every command parses its arguments with :class:`ArgumentParser` and the checked types below, so that each
argument is validated before any work starts and a bad one ends the command with ONE line on stderr and exit
status 2 (no usage block, no traceback).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

__all__ = ["ArgumentParser", "integer", "real", "size", "integer_list", "size_list", "real_list", "out_file", "out_dir", "in_dir",
           "choice_list"]


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D102 (argparse hook)
        sys.stderr.write(f"{self.prog}: error: {message.splitlines()[0] if message else 'bad arguments'}\n")
        raise SystemExit(2)


def _fail(text: str, want: str):
    raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")


def _parse_int(text: str) -> int:
    """An integer written as ``1000``, ``1_000`` or ``1e3`` (a float that is a whole number)."""
    s = str(text).strip().replace("_", "")
    try:
        return int(s)
    except ValueError:
        pass
    try:
        x = float(s)
    except ValueError:
        raise ValueError(text) from None
    if not math.isfinite(x) or x != int(x) or abs(x) > 2**62:
        raise ValueError(text)
    return int(x)


def _range(low: str | None, high: str | None, *, strict_low: bool) -> str:
    """' >= 1', ' <= 9', ' in [1, 9]' or ' in (0, 100]': the wording of a range in an error message."""
    if low is not None and high is not None:
        return f" in {'(' if strict_low else '['}{low}, {high}]"
    if low is not None:
        return f" {'>' if strict_low else '>='} {low}"
    return f" <= {high}" if high is not None else ""


def integer(low: int | None = None, high: int | None = None):
    """Type for an integer in [low, high] (either bound optional)."""
    want = "an integer" + _range(f"{low}" if low is not None else None, f"{high}" if high is not None else None,
                                 strict_low=False)

    def parse(text):
        try:
            v = _parse_int(text)
        except ValueError:
            _fail(text, want)
        if (low is not None and v < low) or (high is not None and v > high):
            _fail(text, want)
        return v

    parse.__name__ = "integer"
    return parse


def real(low: float | None = None, high: float | None = None, *, strict_low: bool = False):
    """Type for a finite real in [low, high] ((low, high] with ``strict_low``)."""
    want = "a finite number" + _range(f"{low:g}" if low is not None else None,
                                      f"{high:g}" if high is not None else None, strict_low=strict_low)

    def parse(text):
        try:
            v = float(text)
        except ValueError:
            _fail(text, want)
        if not math.isfinite(v) or (low is not None and (v <= low if strict_low else v < low)) or (
                high is not None and v > high):
            _fail(text, want)
        return v

    parse.__name__ = "real"
    return parse


def size(text) -> int:
    """A positive integer such as ``100000`` or ``1e5``."""
    return integer(1)(text)


def _list_of(item, text, want):
    parts = [p for p in str(text).split(",")]
    if not parts or any(not p.strip() for p in parts):
        _fail(text, want)
    return [item(p) for p in parts]


def integer_list(low: int | None = None, high: int | None = None):
    """Type for comma-separated integers, each checked like :func:`integer`."""
    one = integer(low, high)

    def parse(text):
        return _list_of(one, text, "comma-separated integers")

    parse.__name__ = "integer_list"
    return parse


def size_list(text) -> list[int]:
    """Comma-separated positive integers (``1e5,1e6``)."""
    return integer_list(1)(text)


def real_list(low: float | None = None, *, strict_low: bool = False):
    """Type for comma-separated finite reals, each checked like :func:`real`."""
    one = real(low, strict_low=strict_low)

    def parse(text):
        return _list_of(one, text, "comma-separated numbers")

    parse.__name__ = "real_list"
    return parse


def choice_list(choices):
    """Type for a comma-separated subset of ``choices``."""
    choices = list(choices)

    def parse(text):
        items = [p.strip() for p in str(text).split(",") if p.strip()]
        bad = [p for p in items if p not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {', '.join(choices)}, got {text!r}")
        return items

    parse.__name__ = "choice_list"
    return parse


def _probe_writable(directory: str) -> None:
    """Create and delete a temporary file in ``directory`` (permission bits alone are not trusted: root, /proc)."""
    fd, tmp = tempfile.mkstemp(prefix=".refimpl-probe-", dir=directory)
    os.close(fd)
    os.unlink(tmp)


def out_file(text) -> str:
    """A file path that can be written: not a directory, and its directory exists and accepts a new file."""
    path = str(text)
    if not path or os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"must be a file path, got {text!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"directory {parent!r} of {text!r} does not exist")
    try:
        _probe_writable(parent)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write in {parent!r} ({exc.strerror})") from None
    return path


def out_dir(text) -> str:
    """A writable directory; created (with its parents) if it does not exist yet."""
    path = str(text)
    try:
        if not path:
            raise NotADirectoryError(20, "empty path")
        os.makedirs(path, exist_ok=True)
        _probe_writable(path)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"must be a writable directory, got {text!r} ({exc.strerror})") from None
    return path


def in_dir(text) -> str:
    """An existing, readable directory."""
    path = str(text)
    if not os.path.isdir(path) or not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"must be an existing readable directory, got {text!r}")
    return path
