"""User-facing errors and the one place commands turn them into an exit code.

A user mistake (missing file, bad header, wrong shape...) raises
:class:`RtcnnInputError`; every command wraps its ``main`` in :func:`cli_main`, which
prints one line ``rtcnn: error: <file>: <problem>`` to stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

EXIT_INPUT_ERROR = 2  # exit status for a user mistake (same as argparse)


class RtcnnInputError(ValueError):
    """A problem with the user's input, reported as one line naming the file.

    Parameters
    ----------
    path : str or os.PathLike or None
        The file (or directory / config key) at fault; ``None`` if there is none.
    problem : str
        What is wrong, as a short sentence without a trailing period.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def cli_main(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command's entry point: :class:`RtcnnInputError` → one line, exit 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RtcnnInputError as err:
            print(f"rtcnn: error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_INPUT_ERROR) from None

    return wrapper


class CommandParser(argparse.ArgumentParser):
    """:class:`argparse.ArgumentParser` whose command-line errors are one
    :class:`RtcnnInputError` line (exit 2 through :func:`cli_main`), pointing at ``--help``."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        raise RtcnnInputError(None, f"{message} (see {self.prog} --help)")
