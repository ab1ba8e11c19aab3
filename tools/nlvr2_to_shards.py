#!/usr/bin/env python
"""Convert NLVR2 (one statement about a pair of images) to vlpt's webdataset shards.

Input, as https://lil.nlp.cornell.edu/nlvr/ distributes it:

* a JSON Lines file (``train.json``, ``dev.json``, ``test1.json``), one statement per line:
  ``{"identifier": "dev-850-0-0", "sentence": "...", "label": "True", "directory": 74,
  "left_url": ..., "right_url": ...}`` (``directory`` in train only);
* the images (``--images``, the folder that holds ``train/``, ``dev/``, ``test1/``): the pair of
  ``dev-850-0-0`` is ``dev/dev-850-0-img0.png`` and ``dev/dev-850-0-img1.png`` (the identifier
  without its last ``-N``), in train under the ``directory``: ``train/74/train-10171-0-img0.png``.
  Found as well: the same names straight in ``--images`` or in ``--images/<directory>``, and
  files named as the last part of ``left_url``/``right_url`` (for images fetched by URL).

One sample per statement:

* ``__key__``  the identifier
* ``txt``      the statement
* ``jpg``      the left image, ``2.jpg`` the right one (webdataset splits keys at the first
               dot, so ``KEY.2.jpg`` is the sample's member ``2.jpg``). JPEG files are copied
               byte for byte; others (NLVR2's PNGs) are re-encoded as JPEG (``--quality``);
               ``--resize`` as in captions_to_shards
* ``json``     ``identifier``, ``label`` (true/false), and ``directory`` where given

A statement with either image missing is skipped; missing images are counted and reported.
A label other than True/False is skipped and counted (test statements without labels need
``--no-labels``: their ``label`` is then null). Shards are written in parallel
(``--workers``), each renamed when complete; rerunning the same command skips them.

Examples::

    python tools/nlvr2_to_shards.py nlvr2/data/train.json --images nlvr2/images --out /data/nlvr2-train-raw \\
        --prefix nlvr2-train
    python tools/nlvr2_to_shards.py nlvr2/data/dev.json --images nlvr2/images --out /data/nlvr2-dev-raw

Then add regions to both images: ``python tools/extract_regions.py "/data/nlvr2-train-raw/*.tar"
--out /data/nlvr2-train --grid 6`` writes ``regions.npz`` and ``2.regions.npz``.

Exit code 2 with one line on stderr for a user mistake (missing file, not JSON Lines).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from vlpt.data.converter_cli import add_output_arguments, check_output_arguments, convert, converter_entry, order_rows
from vlpt.data.shard_writer import ImageOptions, KeyMaker, ShardSink, read_jsonl_file
from vlpt.errors import UserError, tool_parser

PROG = "nlvr2_to_shards"
LABELS = {"True": True, "False": False, "true": True, "false": False, True: True, False: False}


def image_candidates(root: Path, identifier: str, side: int, directory, url) -> list[str]:
    """Where the ``side`` (0 left, 1 right) image of a statement may be, most likely first."""
    split, stem = identifier.split("-", 1)[0], identifier.rsplit("-", 1)[0]
    name = f"{stem}-img{side}.png"
    folders = [root / split / str(directory), root / str(directory)] if directory is not None else []
    folders += [root / split, root]
    out = [str(f / name) for f in folders]
    if isinstance(url, str) and url.rstrip("/"):
        out.append(str(root / url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]))
    return out


def write_row(sink: ShardSink, row: dict, opts: ImageOptions) -> None:
    members = {"txt": row["text"]}
    for ext, candidates in (("jpg", row["paths"][0]), ("2.jpg", row["paths"][1])):
        path = next((p for p in candidates if Path(p).is_file()), candidates[0])
        image = sink.image(path, opts)
        if image is None:
            return
        members[ext] = image[0]
    sink.add(row["key"], {**members, "json": row["meta"]})


def plan(args) -> tuple[list[dict], dict]:
    """Rows (one per statement) and the statements dropped, by reason."""
    root = Path(args.images)
    rows, dropped, make_key = [], Counter(), KeyMaker()
    for line, rec in read_jsonl_file(Path(args.statements), "NLVR2 file"):
        if not isinstance(rec, dict) or not isinstance(rec.get("identifier"), str) or "-" not in rec["identifier"]:
            raise UserError(f"'{args.statements}' line {line} has no 'identifier' such as 'dev-850-0-0'")
        text = " ".join(str(rec.get("sentence") or "").split())
        if not text:
            dropped["statement without a sentence"] += 1
            continue
        given = rec.get("label")
        label = None if args.no_labels or not isinstance(given, (str, bool)) else LABELS.get(given)
        if label is None and not args.no_labels:
            dropped["label other than True/False"] += 1
            continue
        ident, directory = rec["identifier"], rec.get("directory")
        meta = {"identifier": ident, "label": label, **({"directory": directory} if directory is not None else {})}
        paths = [image_candidates(root, ident, side, directory, rec.get(url))
                 for side, url in ((0, "left_url"), (1, "right_url"))]
        rows.append({"key": make_key(ident), "text": text, "paths": paths, "meta": meta})
    return rows, dict(dropped)


def run(args) -> int:
    check_output_arguments(args, images=args.images)
    rows, dropped = plan(args)
    convert(args, PROG, order_rows(rows, args), write_row, settings={"no_labels": args.no_labels},
            info_extra={"statements": str(args.statements)}, skipped_rows=dropped)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(PROG, __doc__)
    p.add_argument("statements", help="NLVR2 JSON Lines file (train.json, dev.json, test1.json)")
    p.add_argument("--images", required=True, help="folder holding train/, dev/, test1/ (or the split's own folder)")
    p.add_argument("--no-labels", action="store_true", help="statements without labels (label: null)")
    add_output_arguments(p, prefix="nlvr2")
    return p


main = converter_entry(PROG, build_parser, run)  # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
