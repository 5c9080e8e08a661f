"""What every script in tools/ does the same way on the command line: bad input ends in one
`error: ...` line on stderr and exit code 2 (never a traceback), and an output appears
whole or not at all (written under a temporary sibling name, moved into place at the end).

    from toolcli import ArgumentParser, ToolError, output_dir, output_file, run
    def main(argv=None): ...
    if __name__ == "__main__":
        run(main)

Imports the standard library only, so it works in every venv the tools run in.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


class ToolError(Exception):
    """Bad input to a tool (a missing file, a bad argument); the message is one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line with exit code 2."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _input_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input: ToolError, OSError (an unreadable input, an
    unwritable output folder, a full disk) and, once cpuq is loaded, its CpuqError (a
    CpuqError cannot have been raised before; some tools run in venvs without cpuq)."""
    errors = sys.modules.get("cpuq.errors")
    return (ToolError, OSError) + ((errors.CpuqError,) if errors is not None else ())


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def run(main: Callable[..., object], argv: list[str] | None = None) -> None:
    """Run `main(argv)` as a script: its return value (an int or None) is the exit code;
    bad input becomes `error: <message>` on stderr and exit code 2."""
    try:
        code = main(argv)
    except _input_errors() as e:
        sys.stderr.write(f"error: {_one_line(e)}\n")
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def require_file(path: Path, what: str) -> Path:
    """`path` if it is a file, else ToolError naming it as `what`."""
    if not Path(path).is_file():
        raise ToolError(f"{path}: {what} not found")
    return Path(path)


def require_new(path: Path) -> Path:
    """`path` if nothing is there yet, else ToolError: tools never write into or over an
    existing output."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise ToolError(f"{path}: already exists; choose a new path or remove it first")
    return path


@contextmanager
def output_dir(dst: Path) -> Iterator[Path]:
    """A new, empty folder to fill in place of `dst`, which must not exist: moved to `dst`
    when the with block ends normally, removed when it raises (or is interrupted), so `dst`
    is never half-written. The parent folders of `dst` are created."""
    dst = require_new(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # A random name, so that two runs never share one; a killed run leaves this hidden folder.
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.partial")
    tmp.mkdir()
    try:
        yield tmp
        require_new(dst)  # another process may have written it meanwhile
        os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def output_file(dst: Path) -> Iterator[Path]:
    """A temporary sibling path to write in place of the file `dst`: moved over `dst`
    (os.replace) when the with block ends normally, removed when it raises, so `dst` holds
    either its old content or the whole new one. The parent folders of `dst` are created."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.partial")
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
