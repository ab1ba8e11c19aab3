"""Decoding shard samples into clean samples — safely, and counting what is dropped.

Only the fields vlpt uses are decoded, each with a safe decoder: UTF-8 text,
JSON, ``regions.npz`` read in place (:func:`read_npz`: each array a view into the
member's bytes, its header checked, object arrays refused as
``np.load(allow_pickle=False)`` refuses them; a compressed ``.npz`` goes through
that ``np.load``) and PIL for images. webdataset's default decoders would
unpickle ``.pyd``/``.pickle`` fields, i.e. run code from the data; vlpt never
calls them.

A bad sample raises :class:`BadSample` with a short reason; the stream skips it
and counts it by reason.
"""
from __future__ import annotations

import functools
import io
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..batch import FEATURES, IMAGE, INPUT_IDS, KEY, META, MODALITY_FIELDS, SECOND, TEXT, WORD_IDS

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

#: set on each sample of a training stream (worker side, never collated): the pass of its reader
#: over its shards it was read in (the epoch; with resampling, the draw)
EPOCH = "epoch"


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short key for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class DecodeSettings:
    feature_dim: int | None  # expected region feature size (None: any)
    max_text_len: int = 60  # word pieces incl. [CLS]/[SEP]; longer captions are dropped (UNITER)
    max_regions: int = 100
    image_size: int | None = None  # decode images (for a backbone) at this size; None: do not decode


_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``regions.npz`` bytes: what ``np.savez`` writes, but with fixed member timestamps.

    ``np.savez`` stamps each member with the current time, which would make the same
    data give different shard bytes on every run. The format is identical: an
    uncompressed zip of ``.npy`` files, read with ``np.load(..., allow_pickle=False)``.
    """
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            with zf.open(zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE), "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, header length) of the ``.npy`` header bytes, parsed by numpy's
    own (literal-only) reader; a shard repeats a few headers, so each is parsed once."""
    fmt = np.lib.format
    f = io.BytesIO(header)
    version = fmt.read_magic(f)
    shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
    return shape, fortran, dtype, f.tell()


def _stored_array(data, start: int, size: int) -> np.ndarray:
    """The ``.npy`` at ``data[start:start + size]`` as a view into ``data`` (no copy); object arrays
    are refused, as ``np.load(allow_pickle=False)`` refuses them."""
    head = bytes(data[start:start + 12])
    if head[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy member")
    wide = head[6] >= 2  # format 2 and 3 headers have a 4-byte length
    length = 12 + int.from_bytes(head[8:12], "little") if wide else 10 + int.from_bytes(head[8:10], "little")
    shape, fortran, dtype, length = _npy_header(bytes(data[start:start + length]))
    if dtype.hasobject:
        raise ValueError("object arrays cannot be loaded without pickle")
    count = int(np.prod(shape, dtype=np.int64))
    if length + count * dtype.itemsize > size:
        raise ValueError("array data is shorter than its header says")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=start + length)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


_END = struct.Struct("<4s4H2LH")  # end of central directory record
_ENTRY = struct.Struct("<4s6H3L5H2L")  # central directory file header


def _zip_members(data) -> list[tuple[str, int, int, int]] | None:
    """(name, compression, size, local header offset) of each member, read from the central
    directory; None for what this short reader leaves to ``zipfile`` (zip64, comments)."""
    if len(data) < _END.size:
        return None
    sig, _, _, _, entries, _, where, _ = _END.unpack_from(data, len(data) - _END.size)
    if sig != b"PK\x05\x06" or entries == 0xFFFF or where == 0xFFFFFFFF:
        return None
    out = []
    for _ in range(entries):
        if where + _ENTRY.size > len(data):
            return None
        e = _ENTRY.unpack_from(data, where)
        if e[0] != b"PK\x01\x02" or 0xFFFFFFFF in (e[8], e[9], e[16]):
            return None
        name = bytes(data[where + _ENTRY.size: where + _ENTRY.size + e[10]]).decode("utf-8", "replace")
        out.append((name, e[4], e[9], e[16]))
        where += _ENTRY.size + e[10] + e[11] + e[12]
    return out


def read_npz(data) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz``. Stored (uncompressed) members, what ``np.savez`` and vlpt's writers
    make, are read in place: each array is a view into ``data`` (writable if ``data`` is a
    ``bytearray``), not a copy. Anything else (a compressed ``.npz``, zip64) goes through
    ``np.load(allow_pickle=False)``."""
    members = _zip_members(data)
    if members is None or any(method != 0 for _, method, _, _ in members):
        with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    arrays = {}
    for name, _, size, header in members:
        if not name.endswith(".npy"):
            continue
        name_len, extra_len = struct.unpack_from("<2H", data, header + 26)  # the local header's
        arrays[name[: -len(".npy")]] = _stored_array(data, header + 30 + name_len + extra_len, size)
    return arrays


#: float dtype -> (its bits as an unsigned int, the bits without the sign, the all-ones exponent)
_FLOAT_BITS = {np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
               np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, 0x7F800000)}


def all_finite(a: np.ndarray) -> bool:
    """No inf or nan in ``a``, read from the bits of half and single floats: without its sign, a
    float is inf or nan exactly when it is at least the all-ones exponent (numpy's ``isfinite``
    widens half floats one by one, slow on region features)."""
    if a.dtype not in _FLOAT_BITS:
        return bool(np.isfinite(a).all())
    if a.size == 0:
        return True
    uint, magnitude, inf = _FLOAT_BITS[a.dtype]
    bits = np.ascontiguousarray(a).reshape(-1).view(uint)
    return int(np.max(bits & uint(magnitude))) < inf


def decode_regions(data: bytes, settings: DecodeSettings) -> dict[str, np.ndarray]:
    try:
        arrays = read_npz(data)
    except Exception as e:
        raise BadSample("bad_regions", f"unreadable regions.npz ({type(e).__name__})") from None
    if "features" not in arrays or "boxes" not in arrays:
        raise BadSample("bad_regions", "regions.npz lacks features or boxes")
    feats = arrays["features"]
    boxes = arrays["boxes"]
    if feats.ndim != 2 or boxes.ndim != 2 or boxes.shape[1] != 4 or feats.shape[0] != boxes.shape[0]:
        raise BadSample("bad_regions", f"features {feats.shape} / boxes {boxes.shape} do not match")
    if settings.feature_dim is not None and feats.shape[1] != settings.feature_dim:
        raise BadSample("bad_regions", f"feature size {feats.shape[1]} != {settings.feature_dim}")
    if feats.shape[0] == 0:
        raise BadSample("bad_regions", "no regions")
    # half-precision arrays stay half until collation: buffers of thousands of samples
    # (shuffle, token buckets) then take half the memory
    keep = lambda a: a if a.dtype in (np.float16, np.float32) else a.astype(np.float32)  # noqa: E731
    out = {"features": keep(feats), "boxes": boxes.astype(np.float32)}
    if not (all_finite(out["features"]) and all_finite(out["boxes"])):
        raise BadSample("nonfinite_regions")
    for opt in ("soft_labels", "conf"):
        if opt in arrays:
            a = keep(arrays[opt])
            if a.shape[0] != feats.shape[0] or not all_finite(a):
                raise BadSample("bad_regions", f"{opt} does not match the regions")
            out[opt] = a
    if feats.shape[0] > settings.max_regions:
        keep = np.argsort(-out["conf"])[: settings.max_regions] if "conf" in out else np.arange(settings.max_regions)
        keep = np.sort(keep)
        out = {k: v[keep] for k, v in out.items()}
    return out


def decode_image(data: bytes, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except Exception as e:
        raise BadSample("bad_image", type(e).__name__) from None
    return arr.transpose(2, 0, 1).copy()  # (3, S, S)


def _decode_image_members(raw: dict[str, Any], settings: DecodeSettings, prefix: str, suffix: str) -> dict:
    """One image of a sample (its ``{prefix}regions.npz``, or pixels for a backbone) as clean fields
    named with ``suffix``: the first image under ``""``/``""``, a second under ``"2."``/``"2"``."""
    if settings.image_size is not None:
        ext = next((prefix + e for e in IMAGE_EXTS if prefix + e in raw), None)
        return {} if ext is None else {IMAGE + suffix: decode_image(raw[ext], settings.image_size)}
    if prefix + "regions.npz" not in raw:
        return {}
    return {k + suffix: v for k, v in decode_regions(raw[prefix + "regions.npz"], settings).items()}


def decode_sample(raw: dict[str, Any], tokenizer, settings: DecodeSettings) -> dict[str, Any]:
    """A raw webdataset sample (bytes per extension) -> a clean sample dict (see :mod:`vlpt.batch`)."""
    sample: dict[str, Any] = {KEY: raw.get("__key__", "")}
    if "txt" in raw:
        try:
            text = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadSample("bad_caption", "not UTF-8") from None
        if not text:
            raise BadSample("empty_caption")
        ids, word_ids = tokenizer.encode(text)
        if len(ids) > settings.max_text_len:
            raise BadSample("caption_too_long", f"{len(ids)} > {settings.max_text_len} tokens")
        sample.update({TEXT: text, INPUT_IDS: np.asarray(ids, dtype=np.int64), WORD_IDS: word_ids})
    sample.update(_decode_image_members(raw, settings, "", ""))
    sample.update(_decode_image_members(raw, settings, SECOND + ".", SECOND))
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except Exception:
            raise BadSample("bad_json") from None
        if isinstance(meta, dict):
            sample[META] = meta
    return sample


def keep_modalities(sample: dict, needs: set[str] | frozenset[str]) -> dict:
    """The sample without the modalities a task does not use: a text-only task reads captions
    of image-text samples too, and its batches are then all alike."""
    drop = {f + suffix for m, fields in MODALITY_FIELDS.items() if m not in needs for f in fields
            for suffix in ("", SECOND)}
    return {k: v for k, v in sample.items() if k not in drop} if any(f in sample for f in drop) else sample


def sample_length(sample: dict) -> int:
    """Sequence length for token batching: text tokens + regions (twice the text with a second image:
    it is read once with each)."""
    n = len(sample.get(INPUT_IDS, ()))
    length = n + len(sample.get(FEATURES, ()))
    if FEATURES + SECOND in sample:
        length += n + len(sample[FEATURES + SECOND])
    return length
