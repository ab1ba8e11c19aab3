"""Reading a shard sample by sample, with the byte position of each: what lets a stream seek.

A shard is a tar file whose members ``KEY.EXT`` make up the samples (webdataset's layout:
members of one sample are adjacent, ``KEY`` is the name up to the first dot of its last
part, ``EXT`` is lower-cased). :func:`shard_samples` yields every sample with the offset of
its first header and the offset where the next sample's headers start, so a reader can
later start again at any sample boundary: a local shard is opened and seeked there (the
members before it are not even read); a remote one (``https://``, ``pipe:``, ...) is read
from its start and the bytes before the position are skipped without being parsed.

Damage is never silent. A header whose checksum fails, a header cut short, a member whose
data is cut short, or a shard that ends without tar's end-of-archive blocks each end the
shard and are reported once as ``bad_tar`` (python's ``tarfile``, and so webdataset, treat
a bad header after the first member as the end of the archive and lose the rest without a
word). A sample that a cut left partial is not yielded: the ``bad_tar`` report is its count.

:func:`shard_samples` reads member data into a ``bytearray`` (``readinto``: one copy, from the
file), so arrays decoded from it in place (:func:`vlpt.data.samples.decode_regions`) are writable;
:func:`read_tar_samples` gives ``bytes``, as webdataset does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from .shards import is_local

BLOCK = 512
_ZEROS = bytes(BLOCK)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: such members are not sample data
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_REGULAR = (b"0", b"\0", b"7")
_SKIP_CHUNK = 1 << 20


class TarDamage(Exception):
    """The shard cannot be read past here; ``member`` names the member being read, if known."""

    def __init__(self, message: str, at: int, member: str | None = None):
        super().__init__(message)
        self.at, self.member = at, member  # where the damaged header (or the cut member's headers) starts


@dataclass
class ShardSample:
    start: int  # offset of the sample's first header
    end: int  # offset where the next sample's headers start (or the end-of-archive blocks)
    raw: dict  # __key__, __url__ and bytes-like data per extension


def key_and_ext(name: str) -> tuple[str | None, str | None]:
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def open_shard(url: str) -> BinaryIO:
    if url.startswith("file://"):
        url = url[len("file://"):]
    if is_local(url):
        return open(url, "rb", buffering=0)
    import webdataset as wds

    return wds.gopen(url, "rb")


def _number(field: bytes) -> int:
    """A tar number field: octal text, or GNU base-256 (first byte 0x80/0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else n
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _number(block[148:156])
    except ValueError:
        return False
    unsigned = sum(block) - sum(block[148:156]) + 256
    if stored == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in block) - sum(b - 256 if b > 127 else b for b in block[148:156])
    return stored == signed + 256


def _name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":  # POSIX ustar: a prefix field before the name
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """``LEN key=value\\n`` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("bad pax record length")
        key, _, value = bytes(data[space + 1: pos + length - 1]).partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class _Members:
    """Regular members of a tar stream from ``start``: (header offset, end offset, name, data)."""

    def __init__(self, f: BinaryIO, start: int, seekable: bool):
        self.f, self.pos, self.seekable = f, start, seekable

    def _read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def _readinto(self, view: memoryview) -> int:
        if hasattr(self.f, "readinto"):
            return self.f.readinto(view) or 0
        data = self.f.read(len(view))  # a stream without readinto (webdataset's pipes)
        view[: len(data)] = data
        return len(data)

    def _read_data(self, size: int, name: str, at: int) -> bytearray:
        buf = bytearray(size)
        got = 0
        while got < size:  # streams may return less than asked
            more = self._readinto(memoryview(buf)[got:])
            if not more:
                raise TarDamage(f"member '{name}' is cut short ({got} of {size} bytes)", at, member=name)
            got += more
        self.pos += size
        self._skip((-size) % BLOCK)
        return buf

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self.seekable:
            self.f.seek(n, 1)
            self.pos += n
            return
        while n > 0:
            got = len(self._read(min(n, _SKIP_CHUNK)))
            if not got:
                return  # the short read shows as a cut at the next header
            n -= got

    def __iter__(self) -> Iterator[tuple[int, int, str, bytearray]]:
        pending: dict[str, str] = {}
        first = None  # offset of the first extension header of the coming member
        while True:
            header_at = self.pos
            block = self._read(BLOCK)
            if not block:
                raise TarDamage("ends without tar's end-of-archive blocks (cut short?)", header_at)
            if len(block) < BLOCK:
                raise TarDamage(f"cut inside a header at byte {header_at}", header_at)
            if block == _ZEROS:
                return
            if not _checksum_ok(block):
                raise TarDamage(f"damaged header at byte {header_at} (checksum)", header_at)
            first = header_at if first is None else first
            try:
                kind, size = block[156:157], _number(block[124:136])
                name = pending.pop("path", None) or _name(block)
                size = int(pending.pop("size", size))
            except ValueError:
                raise TarDamage(f"damaged header at byte {header_at} (size)", header_at) from None
            if kind in (b"x", b"L"):  # pax / GNU long-name header: applies to the next member
                data = self._read_data(size, name, first)
                if kind == b"x":
                    try:
                        pending.update(_pax_records(data))
                    except ValueError as e:
                        raise TarDamage(f"damaged pax header at byte {header_at} ({e})", header_at) from None
                else:
                    pending["path"] = bytes(data).rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            pending.clear()
            if kind in _REGULAR:
                data = self._read_data(size, name, first)
                yield first, self.pos, name, data
            else:  # directories, links, global pax headers: nothing of a sample
                self._skip(size + (-size) % BLOCK)
            first = None


def shard_samples(url: str, on_error: Callable[..., None], start: int = 0) -> Iterator[ShardSample]:
    """The samples of one shard from byte ``start`` (a sample boundary) on; damage is reported once."""
    try:
        f = open_shard(url)
    except OSError as e:
        on_error("bad_tar", f"{url}: {e}")
        return
    with f:
        seekable = is_local(url.removeprefix("file://"))
        members = _Members(f, 0, seekable)
        if start:
            if seekable:
                f.seek(start)
                members.pos = start
            else:
                members._skip(start)
        current: dict | None = None
        began = end = start
        try:
            for at, after, name, data in members:
                if _META.match(name):
                    continue
                key, ext = key_and_ext(name)
                if key is None:
                    continue
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield ShardSample(began, at, current)
                    current, began = {"__key__": key, "__url__": url}, at
                if ext in current:
                    on_error("bad_tar", f"{url}: member '{name}' appears twice")
                    continue
                current[ext] = data
                end = after
        except TarDamage as e:
            cut = e.member is not None and current is not None and key_and_ext(e.member)[0] == current["__key__"]
            if current is not None and not cut:  # a cut inside this sample's member leaves it partial
                yield ShardSample(began, e.at, current)
            on_error("bad_tar", f"{url}: {e}")  # after the sample: a reader resumed past it counts it once too
            return
        if current is not None:
            yield ShardSample(began, end, current)


def read_tar_samples(url: str, on_error: Callable[..., None]) -> Iterator[dict]:
    """Raw samples (``bytes`` per extension, as webdataset gives them) of one shard; damage ends it
    and is counted. The training stream reads :func:`shard_samples` itself, without this copy."""
    for s in shard_samples(url, on_error):
        yield {k: bytes(v) if isinstance(v, bytearray) else v for k, v in s.raw.items()}
