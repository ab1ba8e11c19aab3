"""The synthetic "shapes" image-caption data set.

This is the default data set of vlpt: it can be generated and trained on in a
few CPU minutes, yet it poses a real grounding problem.  Every image shows one
to three objects (a colored circle, square, triangle or cross, small or large)
on a dark background, and its caption names every object exactly once, in a
random order, with a relation between the first two named objects that is
geometrically true::

    a large red circle left of a small blue square and a small gray cross

What a sample holds, and why
----------------------------
*   ``jpg`` -- the rendered image (JPEG, quality 90, no chroma subsampling:
    4:2:0 subsampling smears the color of a 12 px object into the background),
    for humans and for models that want pixels.
*   ``txt`` -- the caption: lowercase words separated by single spaces, no
    punctuation, so that ``caption.split(" ")`` is the word list every word
    index below refers to.
*   ``regions.npz`` -- what a single-stream vision-language transformer sees as
    its visual tokens, one row per object, in a random order that is independent
    of the caption order (so the position of a region never gives away which
    word it belongs to; only its content does):

    ``features`` float16 ``[N, FEATURE_DIM]``
        The object's box cropped out of the *rendered* uint8 image (before JPEG,
        so no compression artefacts), box-resampled to 8x8 RGB, scaled to
        [0, 1] and centered as ``2 f - 1``, flattened in (row, column, channel)
        order.  A raw crop is the simplest feature from which a *small* model
        can recover both attributes: the color is the mean of the bright pixels
        and the shape is the pattern of bright versus dark cells (a square fills
        the crop, a circle leaves the corners dark, a triangle the top corners,
        a cross all four corner blocks).  Centering matters: on a black
        background a gray object and a white one differ only in scale in [0, 1]
        features, which a model with layer norm partly normalizes away; in
        [-1, 1] the background sits at -1 and gray at about 0, so the two differ
        in sign and pattern, not just magnitude.
    ``boxes`` float32 ``[N, 4]``
        Normalized ``x1, y1, x2, y2`` in [0, 1] (``x2``/``y2`` exclusive pixel
        edges divided by the image size), for box/position embeddings and for
        checking relations.
    ``soft_labels`` float16 ``[N, NUM_CLASSES]``
        A noisy, detector-like class distribution over the color x shape
        classes (class 0 = background, class ``1 + color_idx * len(SHAPES) +
        shape_idx``), as region-classification objectives in the style of
        UNITER/LXMERT expect.  Its argmax (ignoring background) is the true class
        about 98% of the time.
    ``conf`` float32 ``[N]``
        A detector confidence, uniform in [0.6, 1.0]; it carries no information.

*   ``json`` -- the grounding: the objects in caption order, each with its region
    row and the caption word indices of its size, color and shape words, and
    the relation (its word span and the subject/object region rows).  It lets
    tests and evaluation check word-region alignment; a model must never be
    fed it, because the text is meant to be the only way to know which color
    and shape is where.

Within one image no two objects share both color and shape, so every object
phrase (and thus every word-region alignment) is unambiguous.

Determinism
-----------
Sample ``i`` of seed ``s`` is drawn from ``np.random.default_rng([s, i])`` alone,
so shards can be generated independently (in parallel) and the same seed gives
byte-identical samples (images, ``.npz`` files with fixed zip timestamps, and
tar files with a fixed mtime) with the same numpy/Pillow versions.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from .generated import atomic_folder, write_tar_shards
from .samples import npz_bytes
from .shapes_vocab import (CAPTION_WORDS, COLOR_RGB, COLORS, CROP_SIZE, FEATURE_DIM, NUM_CLASSES, RELATIONS,  # noqa: F401
                           RETIRED_WORDS, SHAPES, SIZES, SPECIAL_TOKENS, SUITE_WORDS, VOCAB_WORDS, class_index,
                           class_name, train_tokenizer)

__all__ = [
    # vocabulary and classes (vlpt.data.shapes_vocab's, here too)
    "COLORS", "COLOR_RGB", "SHAPES", "SIZES", "RELATIONS", "FEATURE_DIM", "NUM_CLASSES", "CROP_SIZE",
    "SPECIAL_TOKENS", "VOCAB_WORDS", "class_index", "class_name",
    # rendering (shared with the downstream suite, vlpt.data.shapes_tasks)
    "Box", "place_boxes", "relation_of", "render_objects", "regions_npz", "jpeg_bytes", "describe_objects",
    # samples, tokenizer, writing
    "make_sample", "decode_sample", "train_tokenizer",
    "check_write_arguments", "write_shapes",
]

# Object counts 1, 2, 3 and their probabilities.
_COUNT_PROBS = (0.1, 0.45, 0.45)
# Object side lengths in pixels at 64 px (inclusive ranges), scaled with image_size.
_SIDE_RANGE_64 = {"small": (12, 14), "large": (20, 24)}
# Minimum empty gap between object boxes in pixels at 64 px.
_GAP_64 = 2
# Background noise: uniform integers in [0, _BG_NOISE) per pixel and channel.
_BG_NOISE = 8
# Per-object color jitter, uniform integers in [-_JITTER, _JITTER] per channel.
_JITTER = 10
# Logit margin of the true class in the simulated detector (about 98% argmax accuracy).
_LABEL_MARGIN = 4.5
_JPEG_QUALITY = 90
_MIN_IMAGE_SIZE = 24


# --------------------------------------------------------------------------- rendering


def _scaled(px: int, image_size: int) -> int:
    return max(1, int(round(px * image_size / 64)))


#: A square object box ``(x, y, side)`` in pixels.
Box = tuple[int, int, int]


def place_boxes(rng: np.random.Generator, sizes: list[str], image_size: int) -> list[Box] | None:
    """Non-overlapping square boxes for objects of the given sizes, or None if one did not fit.

    Each object gets a bounded number of random positions that keep a gap to
    the boxes already placed; three large objects can crowd a 64 px image, so
    a caller retries (with new sizes or the same) until a layout fits.
    """
    gap = _scaled(_GAP_64, image_size)
    boxes: list[Box] = []
    for size in sizes:
        lo, hi = (_scaled(v, image_size) for v in _SIDE_RANGE_64[size])
        side = int(rng.integers(lo, hi + 1))
        for _ in range(50):
            x, y = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
            if all(
                x + side + gap <= bx or bx + bs + gap <= x or y + side + gap <= by or by + bs + gap <= y
                for bx, by, bs in boxes
            ):
                boxes.append((x, y, side))
                break
        else:
            return None
    return boxes


def _layout(rng: np.random.Generator, n: int, image_size: int) -> tuple[list[str], list[Box]]:
    """Random sizes and boxes for ``n`` objects; a layout that does not fit is drawn again, sizes
    included.  Small layouts always fit, so this terminates quickly."""
    while True:
        sizes = [SIZES[i] for i in rng.integers(0, len(SIZES), size=n)]
        boxes = place_boxes(rng, sizes, image_size)
        if boxes is not None:
            return sizes, boxes


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, side: int, rgb: tuple[int, ...]) -> None:
    """Draw ``shape`` filling the box ``[x, x + side) x [y, y + side)``.

    Every shape touches all four box edges, so the box is the tight bounding
    box and the 8x8 crop shows the shape at a fixed scale.
    """
    x2, y2 = x + side - 1, y + side - 1  # PIL's coordinates are inclusive
    if shape == "circle":
        draw.ellipse((x, y, x2, y2), fill=rgb)
    elif shape == "square":
        draw.rectangle((x, y, x2, y2), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x, y2), (x2, y2), ((x + x2) / 2, y)], fill=rgb)
    elif shape == "cross":
        arm = max(2, int(round(side / 3)))
        a0 = x + (side - arm) // 2
        b0 = y + (side - arm) // 2
        draw.rectangle((a0, y, a0 + arm - 1, y2), fill=rgb)
        draw.rectangle((x, b0, x2, b0 + arm - 1), fill=rgb)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {shape!r}")


def relation_of(a: Box, b: Box) -> str:
    """The true relation of box ``a`` to box ``b`` along the axis where their centers differ more.

    Ties go to the horizontal axis.  Boxes never overlap, so the centers differ
    on at least one axis and the chosen relation holds strictly.
    """
    dx = (b[0] + b[2] / 2) - (a[0] + a[2] / 2)
    dy = (b[1] + b[2] / 2) - (a[1] + a[2] / 2)
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _crop_features(image: np.ndarray, box: Box) -> np.ndarray:
    """8x8 RGB crop of the box, in [-1, 1] (see the module docstring for why)."""
    x, y, side = box
    crop = Image.fromarray(image[y : y + side, x : x + side]).resize((CROP_SIZE, CROP_SIZE), Image.BOX)
    f = np.asarray(crop, dtype=np.float32) / 255.0
    return (2.0 * f - 1.0).reshape(-1)


def _soft_labels(rng: np.random.Generator, classes: np.ndarray) -> np.ndarray:
    """Simulated detector output: softmax(margin * onehot + N(0, 1)) with a small background logit."""
    n = len(classes)
    logits = rng.normal(size=(n, NUM_CLASSES))
    logits[np.arange(n), classes] += _LABEL_MARGIN
    logits[:, 0] = rng.normal(-1.0, 0.5, size=n)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def render_objects(
    rng: np.random.Generator, colors: list[str], shapes: list[str], boxes: list[Box], image_size: int
) -> tuple[Image.Image, np.ndarray]:
    """The image of the given objects on a noisy dark background, as PIL and uint8 ``[H, W, 3]``.

    Draws the background noise, then one color jitter per object in order.
    """
    background = rng.integers(0, _BG_NOISE, size=(image_size, image_size, 3), dtype=np.uint8)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    for color, shape, box in zip(colors, shapes, boxes):
        jitter = rng.integers(-_JITTER, _JITTER + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLOR_RGB[color]) + jitter, 0, 255))
        _draw(draw, shape, *box, rgb)
    return img, np.asarray(img)


def regions_npz(
    rng: np.random.Generator, pixels: np.ndarray, boxes: list[Box], classes: np.ndarray, image_size: int
) -> bytes:
    """``regions.npz`` bytes for objects given in region-row order (``classes``: :func:`class_index` values).

    Features are crops of the rendered ``pixels``; soft labels and confidences are drawn from ``rng``.
    """
    features = np.stack([_crop_features(pixels, b) for b in boxes]).astype(np.float16)
    box_arr = np.array([[x, y, x + s, y + s] for x, y, s in boxes], dtype=np.float32) / np.float32(image_size)
    soft = _soft_labels(rng, np.asarray(classes)).astype(np.float16)
    conf = rng.uniform(0.6, 1.0, size=len(boxes)).astype(np.float32)
    return npz_bytes({"features": features, "boxes": box_arr, "soft_labels": soft, "conf": conf})


def jpeg_bytes(img: Image.Image) -> bytes:
    """The ``jpg`` entry (quality 90, no chroma subsampling; see the module docstring)."""
    jpg = io.BytesIO()
    img.save(jpg, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return jpg.getvalue()


def describe_objects(
    colors: list[str],
    shapes: list[str],
    sizes: list[str],
    boxes: list[Box],
    caption_order: list[int],
    region_of: list[int],
    with_size: list[bool] | None = None,
) -> tuple[str, list[dict], dict | None]:
    """The caption naming the objects in ``caption_order``, and its grounding.

    Returns ``(caption, objects, relation)`` as the module docstring describes
    ``json``; ``region_of[i]`` is the region row of object ``i``.  ``with_size``
    (per object, default all True) drops the size word of some objects, so one
    image can have several captions; a dropped word has no ``words`` entry (and
    ``a`` becomes ``an`` before ``orange``: never in the default grammar).
    """
    words: list[str] = []
    objects = []
    relation = None
    for pos, obj in enumerate(caption_order):
        if pos == 1:
            first = caption_order[0]
            rel = relation_of(boxes[first], boxes[obj])
            start = len(words)
            words.extend(rel.split(" "))
            relation = {
                "words": [start, len(words)],
                "subject": int(region_of[first]),
                "object": int(region_of[obj]),
                "relation": rel,
            }
        elif pos == 2:
            words.append("and")
        start = len(words)
        named = {"size": sizes[obj]} if with_size is None or with_size[obj] else {}
        named.update(color=colors[obj], shape=shapes[obj])
        words.append("an" if next(iter(named.values()))[0] in "aeiou" else "a")  # "an orange ..."
        word_index = {role: start + 1 + k for k, role in enumerate(named)}
        words.extend(named.values())
        objects.append(
            {
                "region": int(region_of[obj]),
                "color": colors[obj],
                "shape": shapes[obj],
                "size": sizes[obj],
                "words": word_index,
            }
        )
    return " ".join(words), objects, relation


def make_sample(rng: np.random.Generator, image_size: int = 64) -> dict:
    """One sample as a webdataset dict without ``__key__``.

    Returns ``{"jpg": bytes, "txt": str, "regions.npz": bytes, "json": bytes}``;
    the module docstring describes each entry.  All randomness comes from
    ``rng``, so a generator seeded per sample makes the sample reproducible.
    """
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE}, got {image_size}")
    n = int(rng.choice(len(_COUNT_PROBS), p=_COUNT_PROBS)) + 1
    # Distinct (color, shape) pairs: every object phrase names exactly one object.
    classes = rng.choice(len(COLORS) * len(SHAPES), size=n, replace=False)
    colors = [COLORS[c // len(SHAPES)] for c in classes]
    shapes = [SHAPES[c % len(SHAPES)] for c in classes]
    sizes, boxes = _layout(rng, n, image_size)
    img, pixels = render_objects(rng, colors, shapes, boxes, image_size)

    # Objects are indexed 0..n-1 in drawing order; the caption and the region rows
    # use two independent random permutations of them.
    caption_order = rng.permutation(n)
    region_order = rng.permutation(n)
    region_of = np.empty(n, dtype=np.int64)
    region_of[region_order] = np.arange(n)  # object index -> region row
    caption, objects, relation = describe_objects(colors, shapes, sizes, boxes, caption_order, region_of)

    npz = regions_npz(rng, pixels, [boxes[o] for o in region_order], classes[region_order] + 1, image_size)
    meta = {"width": image_size, "height": image_size, "objects": objects, "relation": relation}
    return {
        "jpg": jpeg_bytes(img),
        "txt": caption,
        "regions.npz": npz,
        "json": json.dumps(meta, separators=(",", ":")).encode("utf-8"),
    }


def decode_sample(sample: dict) -> dict:
    """Decode a raw sample (from :func:`make_sample` or a webdataset reader).

    Returns ``{"image": uint8 [H, W, 3], "caption": str, "regions": {name: array},
    "meta": dict}`` plus ``"__key__"`` when present.  Accepts ``txt`` as str or
    bytes, as webdataset yields bytes.  Meant for tests, inspection and
    evaluation, not for a training hot path.
    """
    txt = sample["txt"]
    with np.load(io.BytesIO(sample["regions.npz"]), allow_pickle=False) as z:
        regions = {k: z[k] for k in z.files}
    out = {
        "image": np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")),
        "caption": txt.decode("utf-8") if isinstance(txt, (bytes, bytearray)) else txt,
        "regions": regions,
        "meta": json.loads(sample["json"]),
    }
    if "__key__" in sample:
        out["__key__"] = sample["__key__"]
    return out


# --------------------------------------------------------------------------- writing


def _sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample ``index``.

    Independent of every other sample, so shards can be generated in parallel
    and any sample can be regenerated on its own.
    """
    return np.random.default_rng([seed, index])


def check_write_arguments(samples: int, shard_size: int, image_size: int,
                          names: tuple[str, str, str] = ("samples", "shard_size", "image_size")) -> None:
    """The ``ValueError`` of a data set that cannot be written, before anything is touched; ``names``:
    what the caller calls the three (e.g. a command's flags)."""
    if samples < 1:
        raise ValueError(f"{names[0]} must be >= 1, got {samples}")
    if shard_size < 1:
        raise ValueError(f"{names[1]} must be >= 1, got {shard_size}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"{names[2]} must be at least {_MIN_IMAGE_SIZE}, got {image_size}")


def write_shapes(
    out_dir,
    samples: int,
    seed: int = 0,
    shard_size: int = 2000,
    image_size: int = 64,
    progress: bool = True,
    desc: str | None = None,
) -> list[str]:
    """Write the data set to ``out_dir`` and return its shard paths.

    Produces ``shapes-000000.tar``, ``shapes-000001.tar``, ... (``shard_size``
    samples each, keys ``f"{seed:04d}-{index:08d}"``), ``tokenizer.json``
    (see :func:`train_tokenizer`) and ``info.json`` (``samples``, ``shards``,
    ``seed``, ``image_size``, ``colors``, ``shapes``, ``sizes``, ``relations``,
    ``feature_dim``, ``num_classes``, ``shard_size``), atomically (see
    :func:`atomic_folder`: ``info.json`` present means complete).
    """
    from tqdm.auto import tqdm

    check_write_arguments(samples, shard_size, image_size)
    captions: list[str] = []

    def groups(bar) -> Iterator[list[dict]]:
        for index in range(samples):
            sample = make_sample(_sample_rng(seed, index), image_size)
            captions.append(sample["txt"])
            yield [{"__key__": f"{seed:04d}-{index:08d}", **sample}]
            bar.update(1)

    with atomic_folder(out_dir) as tmp:
        with tqdm(total=samples, unit="sample", desc=desc or "shapes", disable=not progress) as bar:
            names = write_tar_shards(tmp, "shapes", groups(bar), shard_size)
        train_tokenizer(captions).save(str(tmp / "tokenizer.json"))
        info = {
            "samples": samples,
            "shards": names,
            "seed": seed,
            "image_size": image_size,
            "colors": list(COLORS),
            "shapes": list(SHAPES),
            "sizes": list(SIZES),
            "relations": list(RELATIONS),
            "feature_dim": FEATURE_DIM,
            "num_classes": NUM_CLASSES,
            "shard_size": shard_size,
        }
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return [str(Path(out_dir).absolute() / n) for n in names]
