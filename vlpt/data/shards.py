"""Shard arguments: what a recipe's ``shards:``, ``vlpt data inspect`` and the tools accept.

One function turns a shard argument into shard URLs, so every place that names shards accepts the
same forms: a path, a brace pattern (``data-{000000..000009}.tar``), several joined with ``::``, a
glob (``data/*.tar``), a folder (its ``*.tar`` files, sorted), or a remote URL (``https://...``,
``s3://...``, ``pipe:...``), which is passed on unchecked.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

from ..errors import UserError


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(pattern: str) -> list[str]:
    """The shard URLs ``pattern`` names; a local shard that is not there is a :class:`UserError`."""
    import braceexpand

    urls: list[str] = []
    for part in os.path.expanduser(pattern).split("::"):
        for url in braceexpand.braceexpand(part):
            if not is_local(url):
                urls.append(url)
            elif Path(url).is_dir():
                found = sorted(str(p) for p in Path(url).glob("*.tar"))
                if not found:
                    raise UserError(f"shard folder '{url}' holds no .tar files")
                urls.extend(found)
            elif glob.has_magic(url):
                found = sorted(glob.glob(url))
                if not found:
                    raise UserError(f"shard pattern '{url}' matches no file")
                urls.extend(found)
            elif not Path(url).is_file():
                raise UserError(f"shard '{url}' not found")
            else:
                urls.append(url)
    if not urls:
        raise UserError(f"shard pattern '{pattern}' names no shard")
    return urls


def first_shard(pattern: str) -> str:
    """The first URL of a shard argument without checking that the shards exist (for dry runs)."""
    import braceexpand

    first = next(iter(braceexpand.braceexpand(os.path.expanduser(pattern).split("::")[0])))
    if is_local(first) and Path(first).is_dir():
        found = sorted(Path(first).glob("*.tar"))
        return str(found[0]) if found else str(Path(first) / "shard.tar")
    return first
