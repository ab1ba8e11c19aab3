#!/usr/bin/env python
"""Turn images and captions into webdataset shards in vlpt's sample schema.

Input: a captions file and the folder its image paths are relative to.

* COCO captions JSON (``captions_train2014.json``):
  ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``
* JSON Lines: one object per line, e.g. ``{"image": "cats/001.jpg", "caption": "a cat on a mat"}``
* CSV with a header row, e.g. ``image,caption``

Column names are ``image`` and ``caption`` unless ``--image-column`` /
``--caption-column`` say otherwise; any other column of a JSONL/CSV row is kept in
the sample's ``json`` metadata.

Output: ``PREFIX-000000.tar``, ``PREFIX-000001.tar``, ... in ``--out``, each with
``--shard-size`` samples (fewer where images are missing), one sample per
(image, caption) pair:

* ``__key__``      the row's index in the input, ``000000042`` (COCO: the annotation's)
* ``txt``          the caption, UTF-8
* ``jpg``          the image, JPEG. With ``--resize N`` an image larger than N is
                   scaled down, aspect ratio kept, so that its SHORTER side is N
                   (``--resize-side longer``: its longer side); smaller images are
                   not enlarged. JPEG files are copied byte for byte when no resize
                   applies; other formats are re-encoded (``--quality``).
* ``json``         metadata: ``image`` (the path as given), ``width``/``height`` of the
                   stored image, ``orig_width``/``orig_height``, COCO's ``image_id`` and
                   ``caption_id``, other JSONL/CSV columns

plus ``tokenizer.json`` (a WordPiece vocabulary trained on the captions, unless
``--vocab-size 0``; ``vlpt train`` uses it when the recipe sets no
``model.tokenizer``) and ``info.json`` (settings and per-shard counts).

Rows are shuffled with ``--seed`` before sharding (``--no-shuffle`` keeps the
input order), so the five captions of a COCO image spread over the shards
instead of sitting side by side (side by side, an image-text-matching negative
drawn from nearby samples would often be the same image).

Missing or unreadable images are skipped, counted and reported; they are not
fatal. Shards are written in parallel (``--workers``), each to a temporary name
renamed when complete: a second run with the same input and settings skips the
shards already written, so an interrupted conversion resumes where it stopped.

Then extract region features (``tools/extract_regions.py``) and train.

Examples::

    python tools/captions_to_shards.py annotations/captions_train2014.json \\
        --images train2014 --out /data/coco-raw --resize 512 --workers 8
    python tools/captions_to_shards.py pairs.jsonl --images photos --out /data/mine --shard-size 500
    python tools/captions_to_shards.py pairs.csv --image-column path --caption-column text --out /data/mine

Exit code 2 with one line on stderr for a user mistake (missing file, bad column).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from vlpt.data.converter_cli import add_output_arguments, check_output_arguments, convert, converter_entry, order_rows
from vlpt.data.shard_writer import ImageOptions, ShardSink, read_json_file, read_jsonl_file
from vlpt.data.vocab import wordpiece_tokenizer
from vlpt.errors import UserError, tool_parser

PROG = "captions_to_shards"


# --------------------------------------------------------------------------------------
# reading the captions file
# --------------------------------------------------------------------------------------


def _json_scalar(v):
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)


def read_coco(path: Path) -> list[dict]:
    data = read_json_file(path, "captions file")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise UserError(f"'{path}' is not a COCO captions file (needs 'images' and 'annotations'); "
                        "for one (image, caption) pair per line use JSON Lines (.jsonl)")
    files = {}
    for im in data["images"]:
        try:
            files[im["id"]] = im["file_name"]
        except (KeyError, TypeError):
            raise UserError(f"'{path}': every entry of 'images' needs 'id' and 'file_name'") from None
    rows = []
    for i, ann in enumerate(data["annotations"]):
        try:
            image_id, caption = ann["image_id"], ann["caption"]
        except (KeyError, TypeError):
            raise UserError(f"'{path}': annotation {i} lacks 'image_id' or 'caption'") from None
        if image_id not in files:
            raise UserError(f"'{path}': annotation {i} refers to image_id {image_id!r}, which 'images' does not list")
        meta = {"image_id": image_id}
        if "id" in ann:
            meta["caption_id"] = ann["id"]
        rows.append({"image": files[image_id], "caption": caption, "meta": meta})
    return rows


def _table_rows(records, path: Path, image_col: str, caption_col: str) -> list[dict]:
    rows = []
    for i, rec in records:
        if not isinstance(rec, dict):
            raise UserError(f"'{path}' row {i}: expected an object with '{image_col}' and '{caption_col}'")
        missing = [c for c in (image_col, caption_col) if c not in rec]
        if missing:
            found = ", ".join(repr(k) for k in rec) or "none"
            raise UserError(f"'{path}' row {i} has no column {missing[0]!r} (columns: {found}); "
                            f"set --image-column / --caption-column")
        meta = {k: _json_scalar(v) for k, v in rec.items() if k not in (image_col, caption_col)}
        rows.append({"image": str(rec[image_col]), "caption": rec[caption_col], "meta": meta})
    return rows


def read_csv(path: Path, image_col: str, caption_col: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            return _table_rows(((i, r) for i, r in enumerate(reader, 2)), path, image_col, caption_col)
    except UnicodeDecodeError:
        raise UserError(f"'{path}' is not UTF-8 text") from None
    except csv.Error as e:
        raise UserError(f"'{path}' is not valid CSV ({e})") from None


def read_rows(path: Path, fmt: str, image_col: str, caption_col: str) -> list[dict]:
    if not path.is_file():
        raise UserError(f"captions file '{path}' not found")
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = {".json": "coco", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv"}.get(suffix)
        if fmt is None:
            raise UserError(f"cannot tell the format of '{path}' from its extension; pass --format coco|jsonl|csv")
    if fmt == "coco":
        return read_coco(path)
    if fmt == "jsonl":
        return _table_rows(read_jsonl_file(path, "captions file"), path, image_col, caption_col)
    return read_csv(path, image_col, caption_col)


# --------------------------------------------------------------------------------------
# one sample (runs in a worker process)
# --------------------------------------------------------------------------------------


def write_row(sink: ShardSink, row: dict, opts: ImageOptions) -> None:
    image = sink.image(row["path"], opts)
    if image is None:
        return
    jpg, sizes = image
    sink.add(row["key"], {"txt": row["caption"], "jpg": jpg, "json": {"image": row["image"], **sizes, **row["meta"]}})


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def plan(args) -> tuple[list[dict], int]:
    """The rows with keys and paths (before ordering); the number of rows dropped for a bad caption."""
    rows = read_rows(Path(args.captions), args.format, args.image_column, args.caption_column)
    images = Path(args.images) if args.images else Path(args.captions).resolve().parent
    if not images.is_dir():
        raise UserError(f"images folder '{images}' not found")
    kept, bad = [], 0
    width = max(9, len(str(len(rows))))
    for i, row in enumerate(rows):
        caption = row["caption"]
        if not isinstance(caption, str) or not caption.strip():
            bad += 1
            continue
        caption = " ".join(caption.split())  # one line, single spaces
        kept.append({"key": f"{i:0{width}d}", "image": row["image"], "path": str(images / row["image"]),
                     "caption": caption, "meta": row["meta"]})
    return kept, bad


def run(args) -> int:
    check_output_arguments(args)
    rows, bad_captions = plan(args)
    if not rows:
        raise UserError(f"'{args.captions}' holds no (image, caption) pair with a non-empty caption")
    rows = order_rows(rows, args)
    out = Path(args.out)
    convert(args, PROG, rows, write_row, info_extra={"source": str(args.captions)},
            skipped_rows={"empty or non-text caption": bad_captions})
    if args.vocab_size and not (out / "tokenizer.json").is_file():
        wordpiece_tokenizer([r["caption"] for r in rows], args.vocab_size).save(str(out / "tokenizer.json"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("captions_to_shards", __doc__)
    p.add_argument("captions", help="COCO captions JSON, JSON Lines or CSV file")
    p.add_argument("--images", help="folder the image paths are relative to (default: the captions file's folder)")
    p.add_argument("--format", choices=("auto", "coco", "jsonl", "csv"), default="auto",
                   help="input format (default: from the extension: .json COCO, .jsonl, .csv)")
    p.add_argument("--image-column", default="image", help="JSONL/CSV column with the image path (default: image)")
    p.add_argument("--caption-column", default="caption", help="JSONL/CSV column with the caption (default: caption)")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="WordPiece vocabulary of the tokenizer.json written beside the shards; 0: write none "
                        "(default: 8000)")
    add_output_arguments(p, prefix="shard")
    return p


main = converter_entry(PROG, build_parser, run)  # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
