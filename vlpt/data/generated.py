"""Writing a generated data set (the shapes data, the shapes downstream suite) into its folder.

A generated data set is written whole or not at all: into a temporary sibling folder that is
renamed when complete, so ``info.json`` present always means finished, and an interrupted run
leaves no half-written folder behind. Tar members get a fixed time, so the same seed gives
byte-identical shards.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

#: tar member time; an int: tarfile writes an extra 1 KiB PAX header per member for a float mtime
TAR_MTIME = 0


def _is_replaceable(path: Path, names: tuple[str, ...]) -> bool:
    """Whether ``path`` holds only ``shapes-*.tar`` shards and ``names`` (so it may be overwritten)."""
    return all(
        e.is_file() and (e.name in names or (e.name.startswith("shapes-") and e.name.endswith(".tar")))
        for e in path.iterdir()
    )


@contextmanager
def atomic_folder(out_dir, names: tuple[str, ...] = ("info.json", "tokenizer.json")) -> Iterator[Path]:
    """A temporary sibling folder that becomes ``out_dir`` when the block ends without error.

    So an interrupted run never leaves a folder that looks finished (``info.json``
    present means complete) nor temporary debris.  An existing ``out_dir`` is
    replaced only if it is empty or holds nothing but shapes shards and ``names``
    (a previous generated data set); otherwise ``FileExistsError``.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not (out.is_dir() and _is_replaceable(out, names)):
        raise FileExistsError(f"{out} exists and is not a shapes data set; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out.exists():
            # os.replace cannot replace a non-empty directory: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_tar_shards(folder: Path, prefix: str, groups: Iterable[list[dict]], shard_size: int) -> list[str]:
    """Write ``<prefix>-000000.tar``, ... into ``folder``, ``shard_size`` groups of samples per shard.

    A group (e.g. the captions of one image) never straddles two shards.  Returns the shard names.
    """
    import webdataset as wds

    names: list[str] = []
    sink = None
    try:
        for i, group in enumerate(groups):
            if i % shard_size == 0:
                if sink is not None:
                    sink.close()
                names.append(f"{prefix}-{len(names):06d}.tar")
                sink = wds.TarWriter(str(folder / names[-1]), mtime=TAR_MTIME)
            for sample in group:
                sink.write(sample)
    finally:
        if sink is not None:  # an unclosed TarWriter leaves the shard without its end-of-archive blocks
            sink.close()
    return names
