"""The shapes world's words and classes: colors, shapes, sizes, relations, the region classes, and
the one vocabulary that the shapes captions (:mod:`vlpt.data.shapes`) and the downstream suite
(:mod:`vlpt.data.shapes_tasks`) share, with the tokenizer that covers it one token per word."""
from __future__ import annotations

from typing import Iterable

__all__ = [
    "COLORS", "COLOR_RGB", "SHAPES", "SIZES", "RELATIONS", "FEATURE_DIM", "NUM_CLASSES", "CROP_SIZE",
    "SPECIAL_TOKENS", "CAPTION_WORDS", "SUITE_WORDS", "RETIRED_WORDS", "VOCAB_WORDS", "class_index",
    "class_name", "train_tokenizer",
]

#: Color names and their base RGB values.  The values are at least ~85 apart
#: (Euclidean, 0-255) from each other even after the +-10 per-channel jitter,
#: and gray/white differ strongly from the black background.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 80, 245),
    "yellow": (240, 230, 30),
    "purple": (150, 40, 200),
    "orange": (250, 140, 10),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

#: Side of the square crop every region is resampled to.
CROP_SIZE: int = 8
#: 8 x 8 RGB crop, flattened in (row, column, channel) order.
FEATURE_DIM: int = CROP_SIZE * CROP_SIZE * 3
#: Background plus one class per (color, shape) pair.
NUM_CLASSES: int = 1 + len(COLORS) * len(SHAPES)

#: Special tokens of the caption tokenizer, in id order ([PAD] = 0 ... [MASK] = 4).
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: Every word the caption grammar can produce.
CAPTION_WORDS: tuple[str, ...] = tuple(
    sorted({"a", "and", *SIZES, *COLORS, *SHAPES, *(w for r in RELATIONS for w in r.split())})
)
#: The further words of the downstream suite's texts (``vlpt.data.shapes_tasks``). One vocabulary
#: for both: a finetune reads its questions with the pretrained model's tokenizer.
#: (:data:`RETIRED_WORDS` are no longer produced, and kept so that token ids stay those of earlier data.)
SUITE_WORDS: tuple[str, ...] = tuple(sorted(set("""circles squares triangles crosses an the what color shape is
    object objects how many are there left right image images has have more fewer than both same number of
    contain contains exactly one neither""".split()) - set(CAPTION_WORDS)))
#: Words of the suite's earlier NLVR2 statements (counts compared), in the vocabulary still: see above.
RETIRED_WORDS: tuple[str, ...] = ("fewer", "has", "have", "more", "number", "same", "than")
VOCAB_WORDS: tuple[str, ...] = tuple(sorted({*CAPTION_WORDS, *SUITE_WORDS}))


def class_index(color: str, shape: str) -> int:
    """Index of the (color, shape) class in ``soft_labels`` (0 is background)."""
    return 1 + COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


def class_name(index: int) -> str:
    """Inverse of :func:`class_index`: ``"red circle"``, or ``"background"`` for 0."""
    if index == 0:
        return "background"
    if not 0 < index < NUM_CLASSES:
        raise ValueError(f"class index {index} out of range [0, {NUM_CLASSES})")
    c, s = divmod(index - 1, len(SHAPES))
    return f"{COLORS[c]} {SHAPES[s]}"


def train_tokenizer(captions: Iterable[str]):
    """A WordPiece tokenizer in which every caption word is exactly one token: the special tokens
    ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4), then the sorted union of the words in ``captions``
    and the whole grammar (:data:`VOCAB_WORDS`), so the vocabulary is the same for every seed and
    sample count and models trained on different generations of the data share token ids (see
    :func:`vlpt.data.vocab.word_tokenizer`)."""
    from .vocab import word_tokenizer

    words = set(VOCAB_WORDS)
    for caption in captions:
        words.update(caption.lower().split())
    return word_tokenizer(words, SPECIAL_TOKENS)
