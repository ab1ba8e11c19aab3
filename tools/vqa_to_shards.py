#!/usr/bin/env python
"""Convert VQA v2 (questions, annotations, COCO images) to vlpt's webdataset shards.

Input, as https://visualqa.org distributes it:

* questions JSON (``v2_OpenEnded_mscoco_train2014_questions.json``):
  ``{"data_subtype": "train2014", "questions": [{"question_id", "image_id", "question"}]}``
* annotations JSON (``v2_mscoco_train2014_annotations.json``), optional:
  ``{"annotations": [{"question_id", "image_id", "question_type", "answer_type",
  "multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"}]}]}``.
  Without it (the test and test-dev questions) every question converts with empty answers.
* the COCO image folder (``--images``): file names ``COCO_<data_subtype>_%012d.jpg``
  (test-dev's images are test2015's), or ``--image-pattern`` (printf ``%012d`` or
  ``{image_id:012d}``, relative to ``--images``; may hold a subfolder).

One sample per question:

* ``__key__``  the question id
* ``txt``      the question
* ``jpg``      the image (JPEG copied byte for byte; ``--resize`` as in captions_to_shards)
* ``json``     ``question_id``, ``image_id``, ``question_type``, ``answer_type``,
               ``answers`` (each distinct annotator answer, normalized as VQA's evaluation
               normalizes answers, with how many of the 10 annotators gave it) and
               ``answer_ids`` (the same counts keyed by the answer's index in the answer
               vocabulary, as a string; answers outside it are left out)

The soft target of answer a is VQA v2's accuracy: min(1, count_a / 3) averaged over the 10 sets of 9
annotators (0.3, 0.6, 0.9, 1 for 1, 2, 3, 4+). The answer
vocabulary, ``answer_vocab.json`` beside the shards (a JSON list, index = position), is either
read (``--answer-vocab FILE``: a JSON list, or an ``{answer: index}`` object such as UNITER's
``ans2label.json``) or built as the BUTD/UNITER preprocessing builds it: every normalized
``multiple_choice_answer`` that at least ``--min-answer-count`` questions (default 9) have,
counted over ``--vocab-annotations`` (default: ``--annotations``; BUTD counts train and val),
most frequent first. Questions without annotations need ``--answer-vocab`` (the training
set's ``answer_vocab.json``), so the classifier's answers stay the same.

Answer normalization (VQA's evaluation script): newlines and tabs become spaces; the marks
``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` are deleted when the answer has one next to a
space or a comma inside a number (``1,000``), else each becomes a space; a period not followed
by a digit is deleted (``3.5`` stays); lowercase; number words ``none``/``zero`` .. ``ten``
become digits; the articles a, an, the are dropped; apostrophe-less contractions
(``dont``, ``isnt``, ``whats``) get their apostrophes back.

Missing images are skipped, counted and reported; questions without an annotation are
skipped and counted. Shards are written in parallel (``--workers``), each renamed when
complete; rerunning the same command skips the complete shards.

Examples::

    python tools/vqa_to_shards.py --questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --annotations v2_mscoco_train2014_annotations.json \\
        --vocab-annotations v2_mscoco_train2014_annotations.json v2_mscoco_val2014_annotations.json \\
        --images train2014 --out /data/vqa-train-raw --prefix vqa-train
    python tools/vqa_to_shards.py --questions v2_OpenEnded_mscoco_test-dev2015_questions.json \\
        --images test2015 --answer-vocab /data/vqa-train-raw/answer_vocab.json --out /data/vqa-testdev-raw

Then add regions: ``python tools/extract_regions.py "/data/vqa-train-raw/*.tar" --out /data/vqa-train --grid 6``.

Exit code 2 with one line on stderr for a user mistake (missing file, bad pattern).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import sys
from collections import Counter
from pathlib import Path

from vlpt.data.converter_cli import add_output_arguments, check_output_arguments, convert, converter_entry, order_rows
from vlpt.data.shard_writer import KeyMaker, read_json_file, write_image_text_row, write_json
from vlpt.errors import UserError, tool_parser
from vlpt_objectives.vqa import vqa_accuracy

PROG = "vqa_to_shards"
VOCAB_FILE = "answer_vocab.json"

# --------------------------------------------------------------------------------------
# answer normalization (as VQA's evaluation normalizes answers)
# --------------------------------------------------------------------------------------

#: marks deleted (next to a space, or with a comma inside a number) or turned into spaces
PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit: decimal points stay
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(("a", "an", "the"))
#: contractions whose apostrophes annotators leave out. Left out on purpose, as in the
#: evaluation's table: forms that are words without their apostrophe (it's/its, we'll/well,
#: she'll/shell, we're/were) and the I-forms (its table spells them capitalized, so they
#: never match lowercased answers).
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't "
    "wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_table(forms: list[str]) -> dict[str, str]:
    """Every spelling of each form with one or more of its apostrophes left out -> the form."""
    table = {}
    for form in forms:
        parts = form.split("'")
        for keep in itertools.product(("'", ""), repeat=len(parts) - 1):
            spelled = parts[0] + "".join(k + p for k, p in zip(keep, parts[1:]))
            if spelled != form:
                table[spelled] = form
    return table


CONTRACTIONS = _contraction_table(_CONTRACTIONS)


def _punctuation(text: str) -> str:
    delete = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        gone = delete or (mark + " ") in text or (" " + mark) in text  # tested on the answer as given
        out = out.replace(mark, "" if gone else " ")
    return _PERIOD.sub("", out)


def normalize_answer(text: str) -> str:
    """An answer as VQA's evaluation compares it: ``"Two."`` -> ``"2"``, ``"the dogs"`` -> ``"dogs"``."""
    text = _punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def soft_score(count: int) -> float:
    """The target of an answer ``count`` of the 10 annotators gave: VQA v2's accuracy (the ``vqa``
    objective computes the targets itself, from ``answer_ids``)."""
    return vqa_accuracy(count, 10)


def answer_counts(annotation: dict) -> dict[str, int]:
    """Normalized annotator answer -> how many annotators gave it (most frequent first)."""
    answers = annotation.get("answers") or []
    counts = Counter(normalize_answer(str(a.get("answer", ""))) for a in answers if isinstance(a, dict))
    counts.pop("", None)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# --------------------------------------------------------------------------------------
# the input files
# --------------------------------------------------------------------------------------


def read_questions(path: Path) -> tuple[list[dict], str | None]:
    data = read_json_file(path, "questions file")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise UserError(f"'{path}' is not a VQA questions file (needs a 'questions' list)")
    for i, q in enumerate(data["questions"]):
        if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= set(q):
            raise UserError(f"'{path}': question {i} lacks 'question_id', 'image_id' or 'question'")
        for key in ("question_id", "image_id"):  # VQA v2 writes integers; other VQA-style sets strings
            if isinstance(q[key], bool) or not isinstance(q[key], (int, str)):
                raise UserError(f"'{path}': question {i} has {key} {q[key]!r}; ids are integers or strings")
    return data["questions"], data.get("data_subtype")


def read_annotations(path: Path) -> dict:
    """question_id -> annotation."""
    data = read_json_file(path, "annotations file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UserError(f"'{path}' is not a VQA annotations file (needs an 'annotations' list)")
    out = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "question_id" not in ann or not isinstance(ann.get("answers"), list):
            raise UserError(f"'{path}': annotation {i} lacks 'question_id' or an 'answers' list")
        if isinstance(ann["question_id"], bool) or not isinstance(ann["question_id"], (int, str)):
            raise UserError(f"'{path}': annotation {i} has question_id {ann['question_id']!r}; ids are integers "
                            "or strings")
        out[ann["question_id"]] = ann
    return out


def build_vocab(annotation_sets: list[dict], min_count: int) -> list[str]:
    """Normalized multiple-choice answers of at least ``min_count`` questions, most frequent first
    (ties alphabetically)."""
    counts: Counter = Counter()
    for anns in annotation_sets:
        for ann in anns.values():
            answer = normalize_answer(str(ann.get("multiple_choice_answer", "")))
            if answer:
                counts[answer] += 1
    kept = [(a, n) for a, n in counts.items() if n >= min_count]
    return [a for a, _ in sorted(kept, key=lambda kv: (-kv[1], kv[0]))]


def read_vocab(path: Path) -> list[str]:
    data = read_json_file(path, "answer vocabulary")
    if isinstance(data, dict):  # {answer: index}, e.g. UNITER's ans2label.json
        indices = list(data.values())
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in indices) or \
                sorted(indices) != list(range(len(data))):
            raise UserError(f"answer vocabulary '{path}': the indices of an {{answer: index}} object must be "
                            "0..N-1, each once")
        data = sorted(data, key=data.get)
    if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
        raise UserError(f"answer vocabulary '{path}' must be a JSON list of answer strings")
    if len(set(data)) != len(data):
        raise UserError(f"answer vocabulary '{path}' lists an answer twice")
    return data


def image_name(pattern: str, image_id: int | str) -> str:
    """The image file name of ``image_id`` from a printf (``%012d``) or format (``{image_id:012d}``) pattern."""
    try:
        return pattern % image_id if "%" in pattern else pattern.format(image_id=image_id)
    except (TypeError, ValueError, KeyError, IndexError):
        if isinstance(image_id, str):
            raise UserError(f"image_id {image_id!r} is a string, and --image-pattern '{pattern}' formats integers; "
                            "pass a pattern for string ids, e.g. '{image_id}.jpg'") from None
        raise UserError(f"--image-pattern '{pattern}' does not format an image id (use %012d or "
                        "{image_id:012d})") from None


def check_pattern(pattern: str) -> None:
    if image_name(pattern, 1) == image_name(pattern, 2):
        raise UserError(f"--image-pattern '{pattern}' gives every image the same name; it needs %012d or "
                        "{image_id:012d}")


def default_pattern(data_subtype: str | None) -> str:
    subtype = data_subtype or "train2014"
    if subtype.startswith("test-dev"):  # test-dev's images are test2015's
        subtype = subtype.replace("test-dev", "test")
    return f"COCO_{subtype}_%012d.jpg"


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def plan(args, questions: list[dict], annotations: dict | None, vocab: list[str], pattern: str):
    """Rows (one per question) and the questions dropped, by reason."""
    images = Path(args.images)
    index = {a: str(i) for i, a in enumerate(vocab)}
    rows, dropped, make_key = [], Counter(), KeyMaker()
    for q in questions:
        text = " ".join(str(q["question"]).split())
        if not text:
            dropped["empty question"] += 1
            continue
        ann = {}
        if annotations is not None:
            ann = annotations.get(q["question_id"])
            if ann is None:
                dropped["no annotation for the question"] += 1
                continue
        answers = answer_counts(ann)
        meta = {"question_id": q["question_id"], "image_id": q["image_id"],
                "question_type": ann.get("question_type", ""), "answer_type": ann.get("answer_type", ""),
                "answers": answers, "answer_ids": {index[a]: n for a, n in answers.items() if a in index}}
        name = image_name(pattern, q["image_id"])
        rows.append({"key": make_key(q["question_id"]), "text": text, "path": str(images / name), "meta": meta})
    return rows, dict(dropped)


def run(args) -> int:
    check_output_arguments(args, images=args.images)
    if args.min_answer_count < 1:
        raise UserError(f"--min-answer-count must be at least 1, got {args.min_answer_count}")
    questions, subtype = read_questions(Path(args.questions))
    pattern = args.image_pattern or default_pattern(subtype)
    check_pattern(pattern)
    annotations = read_annotations(Path(args.annotations)) if args.annotations else None
    if args.answer_vocab:
        vocab = read_vocab(Path(args.answer_vocab))
    elif annotations is None:
        raise UserError("questions without --annotations need --answer-vocab (the training set's answer_vocab.json)")
    else:
        sets = [read_annotations(Path(p)) for p in args.vocab_annotations] if args.vocab_annotations else [annotations]
        vocab = build_vocab(sets, args.min_answer_count)
        if not vocab:
            raise UserError(f"no answer is the multiple-choice answer of {args.min_answer_count} or more questions; "
                            "lower --min-answer-count")
    rows, dropped = plan(args, questions, annotations, vocab, pattern)
    rows = order_rows(rows, args)
    out = Path(args.out)
    vocab_sha = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
    convert(args, PROG, rows, write_image_text_row,
            settings={"answer_vocab_sha256": vocab_sha, "image_pattern": pattern},
            info_extra={"questions": str(args.questions), "annotations": args.annotations}, skipped_rows=dropped)
    if not args.answer_vocab or Path(args.answer_vocab).resolve() != (out / VOCAB_FILE).resolve():
        write_json(out / VOCAB_FILE, vocab)
    with_answer = sum(1 for r in rows if r["meta"]["answer_ids"])
    print(f"{PROG}: answer vocabulary of {len(vocab)} answers in {out / VOCAB_FILE}"
          + (f"; {with_answer} of {len(rows)} questions have an answer in it" if annotations is not None else ""),
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(PROG, __doc__)
    p.add_argument("--questions", required=True, help="VQA questions JSON")
    p.add_argument("--annotations", default=None, help="VQA annotations JSON (none for test/test-dev questions)")
    p.add_argument("--images", required=True, help="folder of the COCO images")
    p.add_argument("--image-pattern", default=None,
                   help="image file name from the image id, e.g. 'COCO_val2014_%%012d.jpg' (default: "
                        "COCO_<data_subtype>_%%012d.jpg from the questions file; train2014 when it names none)")
    p.add_argument("--answer-vocab", default=None, metavar="FILE",
                   help="answer vocabulary to use: a JSON list, or an {answer: index} object")
    p.add_argument("--vocab-annotations", nargs="+", default=None, metavar="FILE",
                   help="annotations to build the vocabulary from (default: --annotations)")
    p.add_argument("--min-answer-count", type=int, default=9,
                   help="questions a multiple-choice answer needs to enter the built vocabulary (default: 9)")
    add_output_arguments(p, prefix="vqa")
    return p


main = converter_entry(PROG, build_parser, run)  # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
