"""User-facing errors.

A mistake a user can fix (a recipe typo, a missing file, a wrong shape) raises
:class:`UserError`; the command line prints its one-line message and exits with
code 2, without a traceback. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
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


class OneLineParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose usage errors are one line and exit 2, like every vlpt error
    (argparse's default prints the whole usage first). Used by ``vlpt`` and the scripts in ``tools/``."""

    def __init__(self, *args, name: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.name = name or self.prog  # how error lines start

    def error(self, message: str):  # type: ignore[override]
        message = message.replace(", KEY=VALUE", "")  # optional recipe overrides are not "required"
        print(f"{self.name}: error: {message}", file=sys.stderr)
        sys.exit(2)


def tool_parser(name: str, description: str | None, **kwargs) -> OneLineParser:
    """The parser of ``tools/NAME.py``: its module docstring as the help text (layout kept), errors
    as ``NAME: error: ...`` on one line."""
    return OneLineParser(prog=f"tools/{name}.py", name=name, description=description,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def output_folder(path, flag: str = "--out", create: bool = True) -> Path:
    """``path`` as the folder a command writes into (made, with ``create``): a file in its place, or
    one above it, is one line naming ``flag``, not a traceback."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} '{out}' is a file, not a folder")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the {flag} folder '{out}': {e.strerror}") from None
    return out
