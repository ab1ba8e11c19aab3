"""The batch contract: the field names every part of vlpt agrees on, and what "the text" and
"the image" of a sample or a batch are.

A **clean sample** (what ``vlpt.data.samples.decode_sample`` makes of a shard sample, what an
objective's ``prepare`` receives) holds some of::

    key          the sample's unique id
    text         the caption (worker side only)
    input_ids    (T,) int64, [CLS] word pieces [SEP]
    word_ids     (T,) the caption word each id came from, -1 for specials (worker side only)
    features     (K, D) float16/32 region features      boxes (K, 4) normalized x1, y1, x2, y2
    soft_labels  (K, C) detector class distribution       conf (K,) detector confidence
    image        (3, S, S) float32 pixels, for an image backbone (instead of features/boxes)
    meta         the sample's ``json`` metadata (grounding, downstream labels; worker side only)

A second image of the same sample (NLVR2: one statement, two images) uses the same names with
:data:`SECOND` appended (``features2``, ``boxes2``, ...), from shard members under the extension
prefix ``2.`` (``KEY.2.regions.npz``, ``KEY.2.jpg``).

A **batch** (what ``vlpt.data.collate.Collator`` makes of prepared samples) holds the padded
tensors plus ``text_mask`` (B, T) and ``region_mask`` (B, K), True at real tokens/regions, and the
fields objectives added in ``prepare`` (``mlm_labels``, ``itm_label``, ``region_masked``, ...).

Objectives of one task share values computed in ``forward`` (e.g. ``itc``'s similarities, which
``itm``'s hard negatives draw from) through ``EncoderOutput.shared``, never by writing into the
batch: each declares what it ``provides`` and what it ``uses``, and recipe validation checks that
every used value is provided by an objective before it in the same task.
"""
from __future__ import annotations

from typing import Any

KEY = "key"
TEXT = "text"
INPUT_IDS = "input_ids"
WORD_IDS = "word_ids"
TEXT_MASK = "text_mask"
FEATURES = "features"
BOXES = "boxes"
SOFT_LABELS = "soft_labels"
CONF = "conf"
IMAGE = "image"
REGION_MASK = "region_mask"
REGION_MASKED = "region_masked"  # (B, K) bool: regions a masked-region objective masked
META = "meta"

#: set in a batch to zero every region feature (boxes kept): evaluation's "blind" variants
ZERO_REGION_FEATURES = "zero_region_features"
#: flags: plain values (not per-sample tensors) that travel with every part of a batch
FLAGS = (ZERO_REGION_FEATURES,)

#: suffix of a sample's second image fields (``features2``, ...), prefix of its shard members (``2.``)
SECOND = "2"

#: the fields of a clean sample that make up its caption, and its image
SAMPLE_TEXT_FIELDS = (TEXT, INPUT_IDS, WORD_IDS)
SAMPLE_IMAGE_FIELDS = (FEATURES, BOXES, SOFT_LABELS, CONF, IMAGE)
#: the same in a batch (every one indexed by sample on the first axis)
BATCH_TEXT_FIELDS = (INPUT_IDS, TEXT_MASK)
BATCH_IMAGE_FIELDS = (FEATURES, BOXES, REGION_MASK, REGION_MASKED, SOFT_LABELS, CONF, IMAGE)
#: fields that live only in data-loader workers and are never collated
WORKER_ONLY = frozenset({WORD_IDS, META, TEXT, "image_bytes"})

#: the modality each group of sample fields belongs to
MODALITY_FIELDS = {"text": SAMPLE_TEXT_FIELDS, "image": SAMPLE_IMAGE_FIELDS}


def _flags(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in FLAGS if k in batch}


def text_part(batch: dict[str, Any]) -> dict[str, Any]:
    """The caption part of a batch: a trunk pass over it sees no regions."""
    return {**{k: batch[k] for k in BATCH_TEXT_FIELDS if k in batch}, **_flags(batch)}


def image_part(batch: dict[str, Any]) -> dict[str, Any]:
    """The image part of a batch: a trunk pass over it sees no words."""
    return {**{k: batch[k] for k in BATCH_IMAGE_FIELDS if k in batch}, **_flags(batch)}


def second_image(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its second image in place of the first (text and flags kept)."""
    out = {k: v for k, v in batch.items() if k not in BATCH_IMAGE_FIELDS}
    out.update({k: batch[k + SECOND] for k in BATCH_IMAGE_FIELDS if k + SECOND in batch})
    return out


def swap_image(sample: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``sample``'s caption with ``other``'s image (a mismatched pair). Its metadata no longer
    describes the image, so it is dropped."""
    out = {k: v for k, v in sample.items() if k not in SAMPLE_IMAGE_FIELDS}
    out.update({k: other[k] for k in SAMPLE_IMAGE_FIELDS if k in other})
    out[META] = None
    return out


def has_field(sample: dict[str, Any], name: str) -> bool:
    """Whether a clean sample carries ``name``: a sample field (``soft_labels``), a key of its
    metadata as ``meta.KEY`` (``meta.answer_ids``), or any of several joined by ``|``
    (``meta.target_region|meta.target_box``)."""
    if "|" in name:
        return any(has_field(sample, n) for n in name.split("|"))
    if name.startswith(META + "."):
        meta = sample.get(META)
        return isinstance(meta, dict) and meta.get(name[len(META) + 1:]) is not None
    return sample.get(name) is not None


def modalities(sample: dict[str, Any]) -> set[str]:
    """The modalities a clean sample carries: "text" (a caption), "image" (regions or pixels)."""
    out = set()
    if INPUT_IDS in sample:
        out.add("text")
    if FEATURES in sample or IMAGE in sample:
        out.add("image")
    return out
