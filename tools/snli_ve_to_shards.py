#!/usr/bin/env python
"""Convert SNLI-VE (visual entailment: does the image entail the sentence?) to vlpt's shards.

Input, as https://github.com/necla-ml/SNLI-VE builds it:

* a JSON Lines file (``snli_ve_train.jsonl``, ``snli_ve_dev.jsonl``, ``snli_ve_test.jsonl``),
  one (premise image, hypothesis) pair per line: ``{"Flickr30K_ID": "3416050480",
  "sentence2": "...", "gold_label": "entailment", "pairID": "3416050480.jpg#4r1n", ...}``;
* the Flickr30K images (``--images``): ``<Flickr30K_ID>.jpg`` (``--image-pattern`` for another
  naming, with ``{id}``).

One sample per pair:

* ``__key__``  the ``pairID`` with every character other than letters, digits, ``_`` and ``-``
               replaced by ``_`` (``3416050480_jpg_4r1n``); a line without ``pairID`` gets
               ``line<N>`` (its line number) as its pair id
* ``txt``      the hypothesis (``sentence2``)
* ``jpg``      the premise image (JPEG copied byte for byte; ``--resize`` as in captions_to_shards)
* ``json``     ``pair_id`` (as given), ``image_id`` (the Flickr30K id), ``label``: entailment,
               neutral or contradiction

Pairs with another ``gold_label`` (SNLI's ``-``: no consensus) are skipped and counted; missing
images are skipped, counted and reported. Shards are written in parallel (``--workers``), each
renamed when complete; rerunning the same command skips the complete shards.

Examples::

    python tools/snli_ve_to_shards.py snli_ve_train.jsonl --images flickr30k-images \\
        --out /data/snli-ve-train-raw --prefix snli-ve-train
    python tools/snli_ve_to_shards.py snli_ve_test.jsonl --images flickr30k-images --out /data/snli-ve-test-raw

Then add regions: ``python tools/extract_regions.py "/data/snli-ve-train-raw/*.tar" --out /data/snli-ve-train
--grid 6``.

Exit code 2 with one line on stderr for a user mistake (missing file, not JSON Lines).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from vlpt.data.converter_cli import add_output_arguments, check_output_arguments, convert, converter_entry, order_rows
from vlpt.data.shard_writer import KeyMaker, read_jsonl_file, write_image_text_row
from vlpt.errors import UserError, tool_parser

PROG = "snli_ve_to_shards"
LABELS = ("entailment", "neutral", "contradiction")


def plan(args) -> tuple[list[dict], dict]:
    """Rows (one per pair) and the pairs dropped, by reason."""
    root = Path(args.images)
    rows, dropped, make_key = [], Counter(), KeyMaker()
    for line, rec in read_jsonl_file(Path(args.pairs), "SNLI-VE file"):
        if not isinstance(rec, dict) or "Flickr30K_ID" not in rec:
            raise UserError(f"'{args.pairs}' line {line} has no 'Flickr30K_ID'")
        text = " ".join(str(rec.get("sentence2") or "").split())
        if not text:
            dropped["pair without a hypothesis (sentence2)"] += 1
            continue
        label = rec.get("gold_label")
        if label not in LABELS:
            dropped["gold_label other than entailment/neutral/contradiction"] += 1
            continue
        image_id = rec["Flickr30K_ID"]
        pair_id = rec.get("pairID", f"line{line}")
        path = root / args.image_pattern.replace("{id}", str(image_id))
        rows.append({"key": make_key(pair_id), "text": text, "path": str(path),
                     "meta": {"pair_id": pair_id, "image_id": image_id, "label": label}})
    return rows, dict(dropped)


def run(args) -> int:
    check_output_arguments(args, images=args.images)
    if "{id}" not in args.image_pattern:
        raise UserError(f"--image-pattern '{args.image_pattern}' has no '{{id}}' for the Flickr30K id")
    rows, dropped = plan(args)
    convert(args, PROG, order_rows(rows, args), write_image_text_row, settings={"image_pattern": args.image_pattern},
            info_extra={"pairs": str(args.pairs)}, skipped_rows=dropped)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(PROG, __doc__)
    p.add_argument("pairs", help="SNLI-VE JSON Lines file (snli_ve_train.jsonl, ...)")
    p.add_argument("--images", required=True, help="folder of the Flickr30K images")
    p.add_argument("--image-pattern", default="{id}.jpg",
                   help="image file name from the Flickr30K id (default: {id}.jpg)")
    add_output_arguments(p, prefix="snli-ve")
    return p


main = converter_entry(PROG, build_parser, run)  # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
