#!/usr/bin/env python
"""Convert RefCOCO, RefCOCO+ or RefCOCOg (referring expressions) to vlpt's webdataset shards.

Input, as the ``refer`` toolkit distributes it (``refcoco/``, ``refcoco+/``, ``refcocog/``):

* ``refs(unc).p`` (``refs(umd).p``, ``refs(google).p``): the referring expressions, a list of
  ``{"ref_id", "ann_id", "image_id", "split", "category_id", "sent_ids",
  "sentences": [{"sent_id", "sent", "raw", "tokens"}]}``. The file is a Python pickle: it is
  read with vlpt's plain-data reader (``vlpt.data.plain_pickle``), which builds only lists,
  dicts, strings and numbers and refuses anything else, so it cannot run code. The same list
  as JSON (``.json``) needs no pickle at all.
* ``instances.json``: COCO's ``images`` (``id``, ``file_name``, ``width``, ``height``) and
  ``annotations`` (``id``, ``image_id``, ``bbox`` = ``[x, y, w, h]`` in pixels).
* the COCO train2014 images (``--images``), named by ``instances.json``'s ``file_name``.

One sample per (expression, sentence), as UNITER trains and evaluates (each sentence of a ref
is its own example; ``--split`` keeps only some splits: train, val, testA, testB, test):

* ``__key__``  ``<ref_id>_<sent_id>``
* ``txt``      the sentence (``sent``, the toolkit's lowercased form; ``--text-field raw``
               for the original)
* ``jpg``      the image (JPEG copied byte for byte; ``--resize`` as in captions_to_shards)
* ``json``     ``ref_id``, ``image_id``, ``split``, ``target_box`` (the referred object's
               box as ``[x1, y1, x2, y2]`` divided by the image width/height, in [0, 1]),
               ``ann_id``, ``sent_id``, ``category_id``. With ``--gt-boxes`` also ``boxes``:
               every COCO object box of the image, normalized the same way, and
               ``target_region``: the row of the referred object among them; then
               ``tools/extract_regions.py`` without ``--grid`` pools exactly those boxes
               (UNITER's "ground-truth boxes" setting), and the objective knows which region
               is the target. Without it, the objective takes the region of highest IoU with
               ``target_box``.

Refs whose annotation or image is not in ``instances.json``, or whose box is empty, are
skipped and counted; missing image files are skipped, counted and reported. Shards are
written in parallel (``--workers``), each renamed when complete; rerunning the same command
skips the complete shards.

Examples::

    python tools/refcoco_to_shards.py --refs "refcoco/refs(unc).p" --instances refcoco/instances.json \\
        --images train2014 --split train --out /data/refcoco-train-raw --prefix refcoco-train
    python tools/refcoco_to_shards.py --refs "refcocog/refs(umd).p" --instances refcocog/instances.json \\
        --images train2014 --split val --gt-boxes --out /data/refcocog-val-raw

Then add regions: ``python tools/extract_regions.py "/data/refcoco-train-raw/*.tar" --out /data/refcoco-train
--grid 6`` (or without ``--grid`` after ``--gt-boxes``).

Exit code 2 with one line on stderr for a user mistake (missing file, not plain data).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from vlpt.data.plain_pickle import load_plain_pickle
from vlpt.data.converter_cli import add_output_arguments, check_output_arguments, convert, converter_entry, order_rows
from vlpt.data.shard_writer import KeyMaker, read_json_file, write_image_text_row
from vlpt.errors import UserError, tool_parser

PROG = "refcoco_to_shards"
SPLITS = ("train", "val", "testA", "testB", "test")


def read_refs(path: Path) -> list[dict]:
    """The refs list from the toolkit's pickle (plain data only) or the same list as JSON."""
    if not path.is_file():
        raise UserError(f"refs file '{path}' not found")
    refs = read_json_file(path, "refs file") if path.suffix.lower() == ".json" else load_plain_pickle(path)
    if not isinstance(refs, list):
        raise UserError(f"refs file '{path}' holds a {type(refs).__name__}, not a list of refs")
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict) or not {"ref_id", "ann_id", "image_id", "sentences"} <= set(ref):
            raise UserError(f"refs file '{path}': ref {i} lacks 'ref_id', 'ann_id', 'image_id' or 'sentences'")
    return refs


def read_instances(path: Path) -> tuple[dict, dict, dict]:
    """images by id, annotations by id, annotation ids by image id."""
    data = read_json_file(path, "instances file")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise UserError(f"'{path}' is not a COCO instances file (needs 'images' and 'annotations')")
    try:
        images = {im["id"]: {"file_name": im["file_name"], "width": float(im["width"]),
                             "height": float(im["height"])} for im in data["images"]}
        anns = {a["id"]: {"image_id": a["image_id"], "bbox": [float(v) for v in a["bbox"]]}
                for a in data["annotations"]}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"'{path}': every image needs 'id', 'file_name', 'width', 'height' and every annotation "
                        "'id', 'image_id' and a 'bbox' of 4 numbers") from None
    by_image: dict = {}
    for ann_id, a in anns.items():
        by_image.setdefault(a["image_id"], []).append(ann_id)
    return images, anns, by_image


def normalized_box(bbox: list[float], image: dict) -> list[float] | None:
    """COCO ``[x, y, w, h]`` pixels -> ``[x1, y1, x2, y2]`` in [0, 1]; None for an empty box."""
    if len(bbox) != 4:
        return None
    x, y, w, h = bbox
    W, H = image["width"], image["height"]
    if W <= 0 or H <= 0:
        return None
    box = [min(max(v, 0.0), 1.0) for v in (x / W, y / H, (x + w) / W, (y + h) / H)]
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    return [round(v, 6) for v in box]


def image_boxes(image_id, images: dict, anns: dict, by_image: dict) -> dict:
    """annotation id -> normalized box, for every non-empty object box of the image (COCO order)."""
    out = {}
    for ann_id in sorted(by_image.get(image_id, [])):
        box = normalized_box(anns[ann_id]["bbox"], images[image_id])
        if box is not None:
            out[ann_id] = box
    return out


def _ref_meta(ref: dict, split, box: list[float], gt: dict | None) -> dict:
    """The ``json`` of the ref's samples; ``gt``: the image's boxes by annotation id (the target's among them)."""
    meta = {"ref_id": ref["ref_id"], "image_id": ref["image_id"], "split": split, "target_box": box,
            "ann_id": ref["ann_id"], "category_id": ref.get("category_id")}
    if gt is not None:
        meta["boxes"] = list(gt.values())
        meta["target_region"] = list(gt).index(ref["ann_id"])
    return meta


def plan(args, refs: list[dict], images: dict, anns: dict, by_image: dict) -> tuple[list[dict], dict]:
    """Rows (one per sentence of each kept ref) and the refs/sentences dropped, by reason."""
    splits = set(args.split) if args.split else None
    folder = Path(args.images)
    rows, dropped, make_key, gt_cache = [], Counter(), KeyMaker(), {}
    for ref in refs:
        split = ref.get("split")
        if splits is not None and split not in splits:
            continue
        ann, image = anns.get(ref["ann_id"]), images.get(ref["image_id"])
        if ann is None or image is None or ann["image_id"] != ref["image_id"]:
            dropped["ref whose annotation or image is not in instances.json"] += 1
            continue
        box = normalized_box(ann["bbox"], image)
        if box is None:
            dropped["ref with an empty box"] += 1
            continue
        gt = None
        if args.gt_boxes:
            if ref["image_id"] not in gt_cache:
                gt_cache[ref["image_id"]] = image_boxes(ref["image_id"], images, anns, by_image)
            gt = gt_cache[ref["image_id"]]
        meta = _ref_meta(ref, split, box, gt)
        for sent in ref["sentences"] if isinstance(ref["sentences"], list) else []:
            text = sent.get(args.text_field) if isinstance(sent, dict) else None
            if not isinstance(text, str) or not text.strip():
                dropped[f"sentence without '{args.text_field}' text"] += 1
                continue
            sent_id = sent.get("sent_id")
            rows.append({"key": make_key(f"{ref['ref_id']}_{sent_id}"), "text": " ".join(text.split()),
                         "path": str(folder / image["file_name"]), "meta": {**meta, "sent_id": sent_id}})
    return rows, dict(dropped)


def run(args) -> int:
    check_output_arguments(args, images=args.images)
    refs = read_refs(Path(args.refs))
    images, anns, by_image = read_instances(Path(args.instances))
    rows, dropped = plan(args, refs, images, anns, by_image)
    if not rows:
        found = sorted({str(r.get("split")) for r in refs})
        raise UserError(f"no expression to convert (splits asked: {args.split or 'all'}; the refs hold "
                        f"{', '.join(found)}; dropped: {dropped or 'none'})")
    per_split = Counter(r["meta"]["split"] for r in rows)
    convert(args, PROG, order_rows(rows, args), write_image_text_row,
            settings={"text_field": args.text_field, "gt_boxes": args.gt_boxes, "split": args.split},
            info_extra={"refs": str(args.refs), "instances": str(args.instances), "sentences_per_split": per_split},
            skipped_rows=dropped)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(PROG, __doc__)
    p.add_argument("--refs", required=True, help="refs(unc).p / refs(umd).p, or the same list as .json")
    p.add_argument("--instances", required=True, help="the data set's instances.json (COCO boxes, image sizes)")
    p.add_argument("--images", required=True, help="folder of the COCO train2014 images")
    p.add_argument("--split", nargs="+", choices=SPLITS, default=None,
                   help="convert only these splits (default: all)")
    p.add_argument("--text-field", choices=("sent", "raw"), default="sent",
                   help="sent: the toolkit's lowercased sentence; raw: as written (default: sent)")
    p.add_argument("--gt-boxes", action="store_true",
                   help="store every COCO box of the image (json 'boxes') and the target's row ('target_region')")
    add_output_arguments(p, prefix="refcoco")
    return p


main = converter_entry(PROG, build_parser, run)  # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
