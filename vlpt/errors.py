"""User-facing errors.

A mistake a user can fix (a recipe typo, a missing file, a wrong shape) raises
:class:`UserError`; the command line prints its one-line message and exits with
code 2, without a traceback. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
import sys
from typing import Any, Callable, Iterable


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""


class RecipeError(UserError):
    """The recipe (file or command-line override) is invalid."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def run_command(prog: str, run: Callable[[Any], int | None], args: Any, resumable: bool = False) -> int:
    """A command's ``main``: a :class:`UserError` prints one line and returns 2, Ctrl-C returns 130."""
    try:
        return run(args) or 0
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if resumable else ""
        print(f"{prog}: interrupted{hint}", file=sys.stderr)
        return 130
