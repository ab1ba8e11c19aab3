"""Read a pickle that holds plain data only, without ever running code from it.

Some public data sets ship their annotations as Python pickles (RefCOCO's ``refs(unc).p``).
Unpickling can call any importable function (a pickle of an object whose ``__reduce__``
returns ``os.system`` runs a shell command on load), so vlpt never calls ``pickle.load``
on data. :func:`load_plain_pickle` runs the standard unpickler with the two doors through
which a pickle reaches code shut:

* ``find_class`` (the ``GLOBAL``/``STACK_GLOBAL``/``INST``/extension-code opcodes, the only
  way a pickle names a callable or class) raises, so ``REDUCE``/``BUILD``/``NEWOBJ`` never
  have anything to call;
* ``persistent_load`` (persistent ids, resolved by the application) raises.

What is left builds only lists, dicts, tuples, strings, numbers, bools, None (and sets or
bytes, which the result is then checked for): anything but plain lists, dicts, tuples,
strings, numbers, bools and None in the result is refused too. Python 2 pickles (protocol 2,
as the RefCOCO files are) load, their byte strings decoded as UTF-8 (undecodable bytes
become U+FFFD). Every refusal is a :class:`~vlpt.errors.UserError` with one line.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from ..errors import UserError

PLAIN_SCALARS = (str, int, float, bool, type(None))


class _Refused(Exception):
    """The pickle asked for something other than plain data."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401
        raise _Refused(f"it would build or call {module}.{name}")

    def persistent_load(self, pid):
        raise _Refused("it refers to a persistent id, which only the program that wrote it can resolve")


def _check_plain(obj: Any) -> None:
    """Raise :class:`_Refused` for anything in ``obj`` that is not plain data (iterative: deep
    nesting is fine; shared or cyclic containers are visited once)."""
    stack, seen = [obj], set()
    while stack:
        o = stack.pop()
        if type(o) in PLAIN_SCALARS:
            continue
        if type(o) in (list, tuple, dict):
            if id(o) in seen:
                continue
            seen.add(id(o))
            if type(o) is dict:
                stack.extend(o.keys())
                stack.extend(o.values())
            else:
                stack.extend(o)
            continue
        raise _Refused(f"it holds a {type(o).__name__}, which is not plain data")


def load_plain_pickle(source: str | Path | bytes) -> Any:
    """The plain data (lists, dicts, tuples, str, int, float, bool, None) in a pickle file or bytes."""
    name = "the pickle"
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        path = Path(source)
        name = f"'{path}'"
        if not path.is_file():
            raise UserError(f"pickle file {name} not found")
        data = path.read_bytes()
    try:
        obj = _PlainUnpickler(io.BytesIO(data), encoding="utf-8", errors="replace").load()
        _check_plain(obj)
    except _Refused as e:
        raise UserError(f"refusing to load {name}: {e}; only plain data (lists, dicts, tuples, strings, "
                        "numbers, bools, None) is read from pickles") from None
    except RecursionError:
        raise UserError(f"refusing to load {name}: nested too deeply") from None
    except Exception as e:  # truncated or not a pickle at all
        raise UserError(f"{name} is not a readable pickle ({type(e).__name__}: {str(e)[:120]})") from None
    return obj
