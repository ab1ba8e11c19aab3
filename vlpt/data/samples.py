"""Decoding shard samples into clean samples — safely, and counting what is dropped.

Only the fields vlpt uses are decoded, each with a safe decoder: UTF-8 text,
JSON, ``np.load(allow_pickle=False)`` for ``regions.npz`` and PIL for images.
webdataset's default decoders would unpickle ``.pyd``/``.pickle`` fields, i.e.
run code from the data; vlpt never calls them.

A bad sample raises :class:`BadSample` with a short reason; the stream skips it
and counts it by reason.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..batch import FEATURES, IMAGE, INPUT_IDS, KEY, META, MODALITY_FIELDS, SECOND, TEXT, WORD_IDS

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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


def decode_regions(data: bytes, settings: DecodeSettings) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
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
    if not (np.isfinite(out["features"]).all() and np.isfinite(out["boxes"]).all()):
        raise BadSample("nonfinite_regions")
    for opt in ("soft_labels", "conf"):
        if opt in arrays:
            a = keep(arrays[opt])
            if a.shape[0] != feats.shape[0] or not np.isfinite(a).all():
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
