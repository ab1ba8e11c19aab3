#!/usr/bin/env python
"""Convert UNITER's data layout (image feature DB + text DB) to vlpt's webdataset shards.

UNITER keeps a data set in two databases:

* an **image DB** of detector region features, one ``.npz`` per image (file name such
  as ``coco_train2014_000000391895.npz``) with ``features`` [N, 2048] float16,
  ``norm_bb`` [N, 6] (normalized ``x1, y1, x2, y2, w, h``), ``conf`` [N] and
  ``soft_labels`` [N, 1601]. ``--img-db`` takes either the folder of ``.npz`` files or
  UNITER's LMDB (``img_db/coco_train2014/feat_th0.2_max100_min10/``, or its parent when
  it holds one such LMDB): keys are the file names, values an ``.npz`` (the
  ``_compressed`` DBs) or msgpack-numpy maps of the same arrays.
* a **text DB** (``txt_db/pretrain_coco_train.db/``): an LMDB of lz4-compressed msgpack
  entries, one per caption, with ``input_ids`` (BERT word pieces), ``img_fname`` and
  usually the caption text (``raw``), beside ``txt2img.json``, ``img2txts.json``,
  ``id2len.json`` and ``meta.json``. ``--txt-db`` takes that folder, or a JSON Lines
  file with the same entries, one per line (plus an ``id``), which needs none of the
  optional packages below.

Each caption becomes one sample:

* ``__key__``      the text id (characters other than letters, digits, ``_`` and ``-`` replaced by ``_``)
* ``txt``          the caption: the entry's ``raw`` text (``--text-field`` to pick another
                   field). Entries that hold only ``input_ids`` are detokenized with
                   ``--tokenizer`` (the BERT vocabulary UNITER tokenized with, e.g. a local
                   ``bert-base-cased`` folder: ``meta.json``'s ``toker``); without it the
                   conversion stops and says so
* ``regions.npz``  ``features`` (float16 as stored, ``--dtype float32`` to widen),
                   ``boxes`` = the first 4 columns of ``norm_bb`` (or ``bbox`` normalized
                   by the image size), ``soft_labels`` and ``conf`` when present
* ``json``         ``txt_id``, ``img_fname`` and the entry's other scalar fields

UNITER keeps ``max(min_bb, min(max_bb, #regions with conf > conf_th))`` regions per
image (the DB's name says which). The ``feat_th...`` DBs are already cut that way;
for an ``all`` DB or a folder of ``.npz`` files pass ``--conf-th 0.2 --min-bb 10
--max-bb 100`` to do the same (default: keep every stored region; vlpt's own
``data.max_regions`` still caps them at training time).

Captions whose image is missing from the image DB, or whose features are unreadable or
not finite, are skipped and counted. Rows are shuffled (``--seed``; ``--no-shuffle``
keeps the DB order) so an image's captions spread over the shards. Shards are written
in parallel (``--workers``), each to a temporary name renamed when complete; rerunning
the same command skips the complete shards. Decoding never unpickles:
``np.load(allow_pickle=False)``, and msgpack-numpy arrays are rebuilt from their raw
bytes (object arrays, which msgpack-numpy pickles, are refused).

Optional packages, only for LMDB inputs: ``pip install lmdb`` (any LMDB),
``msgpack`` (text DBs and msgpack image DBs), ``lz4`` (text DBs).

Examples::

    python tools/uniter_to_shards.py --img-db img_db/coco_train2014 \\
        --txt-db txt_db/pretrain_coco_train.db --out /data/uniter-coco --prefix coco
    python tools/uniter_to_shards.py --img-db /data/npz --txt-db captions.jsonl \\
        --out /data/mine --tokenizer /models/bert-base-cased --conf-th 0.2 --min-bb 10 --max-bb 100

Then train with ``model.region_feature_dim=2048`` and ``model.tokenizer`` (or
``model.init_from``) set to the BERT the text DB was tokenized with.

Exit code 2 with one line on stderr for a user mistake (missing DB, missing package).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from vlpt.data.samples import npz_bytes
from vlpt.data.converter_cli import add_output_arguments, check_output_arguments, convert, converter_main, order_rows
from vlpt.data.shard_writer import KeyMaker, ShardSink, summary
from vlpt.errors import UserError, tool_parser

PROG = "uniter_to_shards"
TEXT_FIELDS = ("raw", "caption", "sent", "sentence", "text")
REPORT = 10


def _require(module: str, package: str, what: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"reading {what} needs the Python package '{package}': pip install {package}") from None


# --------------------------------------------------------------------------------------
# safe decoding
# --------------------------------------------------------------------------------------


def _msgpack_numpy_hook(obj):
    """Rebuild msgpack-numpy arrays from their bytes; refuse object arrays (msgpack-numpy pickles those)."""
    if not isinstance(obj, dict):
        return obj
    get = lambda k: obj.get(k.encode(), obj.get(k))  # noqa: E731  (bytes or str keys, by version)
    nd = get("nd")
    if nd is None:
        if get("complex") is not None and get("data") is not None:
            raise ValueError("complex scalars are not supported")
        return obj
    kind, descr, data = get("kind"), get("type"), get("data")
    if kind in (b"V", "V") or isinstance(descr, (list, tuple)):
        raise ValueError("structured arrays are not supported")
    descr = descr.decode() if isinstance(descr, bytes) else descr
    dtype = np.dtype(descr)
    if dtype.hasobject:
        raise ValueError("object arrays are refused (they would be unpickled)")
    if nd:
        return np.frombuffer(data, dtype=dtype).reshape(get("shape")).copy()
    return np.frombuffer(data, dtype=dtype)[0]


def msgpack_loads(data: bytes):
    msgpack = _require("msgpack", "msgpack", "msgpack data")
    return msgpack.unpackb(data, raw=False, object_hook=_msgpack_numpy_hook, strict_map_key=False)


def decode_image_dump(data: bytes) -> dict[str, np.ndarray]:
    """An image DB value (npz or msgpack-numpy) -> arrays."""
    if data[:2] == b"PK":  # a zip: np.savez(_compressed)
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    out = msgpack_loads(data)
    if not isinstance(out, dict):
        raise ValueError("not a map of arrays")
    return {(k.decode() if isinstance(k, bytes) else k): np.asarray(v) for k, v in out.items()}


def regions_from_dump(d: dict[str, np.ndarray], opts: dict) -> dict[str, np.ndarray]:
    """UNITER's arrays -> vlpt's regions (features, boxes, soft_labels, conf); ValueError when unusable."""
    if "features" not in d:
        raise ValueError("no 'features'")
    feats = d["features"]
    if feats.ndim != 2 or len(feats) == 0:
        raise ValueError(f"features of shape {feats.shape}")
    if "norm_bb" in d:
        boxes = d["norm_bb"][:, :4]
    elif "bbox" in d:
        boxes = d["bbox"][:, :4].astype(np.float32)
        w = next((d[k] for k in ("image_w", "img_w", "width") if k in d), None)
        h = next((d[k] for k in ("image_h", "img_h", "height") if k in d), None)
        if w is not None and h is not None:
            boxes = boxes / np.array([w, h, w, h], dtype=np.float32).reshape(1, 4)
        elif boxes.size and boxes.max() > 1.0:
            raise ValueError("'bbox' in pixels without the image size (image_w/image_h)")
    else:
        raise ValueError("neither 'norm_bb' nor 'bbox'")
    if boxes.ndim != 2 or boxes.shape != (len(feats), 4):
        raise ValueError(f"boxes of shape {boxes.shape} for {len(feats)} regions")
    feat_dtype = np.float32 if opts["dtype"] == "float32" else np.float16
    out = {"features": feats.astype(feat_dtype), "boxes": boxes.astype(np.float32)}
    for name in ("soft_labels", "conf"):
        if name in d and len(d[name]) == len(feats):
            out[name] = d[name].astype(feat_dtype if name == "soft_labels" else np.float32)
    if opts["conf_th"] is not None:
        if "conf" not in d:
            raise ValueError("--conf-th needs 'conf'")
        nbb = int((d["conf"] > opts["conf_th"]).sum())
        nbb = min(opts["max_bb"] or len(feats), max(opts["min_bb"] or 0, nbb))
        out = {k: v[:nbb] for k, v in out.items()}
    if not all(np.isfinite(v).all() for v in out.values()):
        raise ValueError("non-finite values")
    return out


# --------------------------------------------------------------------------------------
# the databases
# --------------------------------------------------------------------------------------


def _is_lmdb(path: Path) -> bool:
    return path.is_dir() and (path / "data.mdb").is_file()


def resolve_img_db(path: Path) -> tuple[str, Path]:
    """("npz" | "lmdb", folder)."""
    if not path.exists():
        raise UserError(f"image DB '{path}' not found")
    if _is_lmdb(path):
        return "lmdb", path
    if path.is_dir():
        subs = [p for p in sorted(path.iterdir()) if _is_lmdb(p)]
        if len(subs) == 1:
            return "lmdb", subs[0]
        if len(subs) > 1:
            raise UserError(f"image DB '{path}' holds several LMDBs ({', '.join(p.name for p in subs)}): name one")
        if next(path.glob("*.npz"), None) is not None:
            return "npz", path
    raise UserError(f"image DB '{path}' is neither a folder of .npz files nor an LMDB (no data.mdb)")


class ImageDB:
    """Read-only access to one image's arrays by file name; opened lazily (once per process)."""

    def __init__(self, kind: str, path: Path):
        self.kind, self.path = kind, path
        self._txn = None
        self._cache: OrderedDict[str, dict] = OrderedDict()  # an image's captions often come together

    def _raw(self, fname: str) -> bytes | None:
        if self.kind == "npz":
            p = self.path / fname
            if not p.is_file() and not fname.endswith(".npz"):
                p = self.path / f"{fname}.npz"
            return p.read_bytes() if p.is_file() else None
        if self._txn is None:
            lmdb = _require("lmdb", "lmdb", "an LMDB")
            env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False, subdir=True)
            self._txn = env.begin(buffers=False)
        return self._txn.get(fname.encode("utf-8"))

    def get(self, fname: str) -> dict | None:
        if fname in self._cache:
            self._cache.move_to_end(fname)
            return self._cache[fname]
        raw = self._raw(fname)
        if raw is None:
            return None
        dump = decode_image_dump(raw)
        self._cache[fname] = dump
        if len(self._cache) > 32:
            self._cache.popitem(last=False)
        return dump


def read_txt_db(path: Path) -> tuple[list[tuple[str, dict]], dict]:
    """[(text id, entry)] in the DB's order, and meta.json (or {})."""
    if not path.exists():
        raise UserError(f"text DB '{path}' not found")
    if path.is_file():  # JSON Lines
        rows = []
        try:
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"'{path}' line {i} is not valid JSON ({e.msg})") from None
                    if not isinstance(entry, dict):
                        raise UserError(f"'{path}' line {i} is not a JSON object")
                    rows.append((str(entry.get("id", i)), entry))
        except UnicodeDecodeError:
            raise UserError(f"'{path}' is not UTF-8 text") from None
        return rows, {}
    if not _is_lmdb(path):
        raise UserError(f"text DB '{path}' is neither an LMDB folder (data.mdb) nor a JSON Lines file")
    lmdb = _require("lmdb", "lmdb", "a text DB")
    _require("msgpack", "msgpack", "a text DB")
    lz4 = _require("lz4.frame", "lz4", "a text DB").frame

    def side(name):
        p = path / name
        return json.loads(p.read_text()) if p.is_file() else None

    meta = side("meta.json") or {}
    txt2img = side("txt2img.json")
    def entry(value):  # an unreadable entry is counted, not fatal
        try:
            return None if value is None else msgpack_loads(lz4.decompress(value))
        except Exception:
            return None

    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)
    rows = []
    with env.begin() as txn:
        if txt2img is not None or side("id2len.json") is not None:
            ids = list(txt2img if txt2img is not None else side("id2len.json"))
            for id_ in ids:
                rows.append((str(id_), entry(txn.get(str(id_).encode("utf-8")))))
        else:
            for key, value in txn.cursor():
                rows.append((key.decode("utf-8", "replace"), entry(value)))
    env.close()
    for i, (id_, entry) in enumerate(rows):
        if isinstance(entry, dict) and "img_fname" not in entry and txt2img and id_ in txt2img:
            entry["img_fname"] = txt2img[id_]
    return rows, meta


# --------------------------------------------------------------------------------------
# writing one shard (runs in a worker process)
# --------------------------------------------------------------------------------------

_IMG_DB: ImageDB | None = None


def write_row(sink: ShardSink, row: dict, opts: dict) -> None:
    global _IMG_DB
    if _IMG_DB is None or (_IMG_DB.kind, str(_IMG_DB.path)) != (opts["img_kind"], opts["img_path"]):
        _IMG_DB = ImageDB(opts["img_kind"], Path(opts["img_path"]))
    fname = row["img_fname"]
    try:
        dump = _IMG_DB.get(fname)
        if dump is None:
            sink.skip("missing_image", f"{fname}: not in the image DB", file=fname)
            return
        regions = regions_from_dump(dump, opts)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        sink.skip("bad_features", f"{fname}: {e}")
        return
    sink.note("feature_dims", int(regions["features"].shape[1]))
    sink.add(row["key"], {"txt": row["text"], "regions.npz": npz_bytes(regions), "json": row["meta"]})


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def plan(args) -> tuple[list[dict], dict]:
    entries, meta = read_txt_db(Path(args.txt_db))
    if not entries:
        raise UserError(f"text DB '{args.txt_db}' holds no entry")
    tokenizer = None
    if args.tokenizer:
        from vlpt.data.tokenizer import TextTokenizer
        from vlpt.errors import UserError as VlptUserError

        try:
            tokenizer = TextTokenizer.from_path(args.tokenizer)
        except VlptUserError as e:
            raise UserError(str(e)) from None
    rows, make_key = [], KeyMaker()
    counts = {"missing_or_bad_entry": 0, "no_text": 0, "no_image_name": 0, "detokenized": 0}
    for id_, entry in entries:
        if not isinstance(entry, dict):
            counts["missing_or_bad_entry"] += 1
            continue
        fname = entry.get("img_fname")
        if isinstance(fname, (list, tuple)):  # NLVR2-style pairs: not a captioning entry
            fname = None
        if not isinstance(fname, str) or not fname:
            counts["no_image_name"] += 1
            continue
        fields = (args.text_field,) if args.text_field else TEXT_FIELDS
        text = next((entry[f] for f in fields if isinstance(entry.get(f), str) and entry[f].strip()), None)
        if text is None and entry.get("input_ids") is not None:
            if tokenizer is None:
                toker = meta.get("toker") or meta.get("tokenizer")
                raise UserError(f"text DB entries carry no caption text ({'/'.join(fields)}), only input_ids: "
                                "pass --tokenizer with the BERT vocabulary they were tokenized with"
                                + (f" ('{toker}' per meta.json)" if toker else "") + " to detokenize them")
            text = tokenizer.decode(np.asarray(entry["input_ids"]).reshape(-1).tolist())
            counts["detokenized"] += 1
        if text is None or not text.strip():
            counts["no_text"] += 1
            continue
        key = make_key(id_)
        meta_out = {"txt_id": id_, "img_fname": fname}
        for k, v in entry.items():
            if k not in meta_out and k not in TEXT_FIELDS and k not in ("id", "objects") \
                    and isinstance(v, (str, int, float, bool)):
                meta_out[k] = v
        rows.append({"key": key, "text": " ".join(text.split()), "img_fname": fname, "meta": meta_out})
    return order_rows(rows, args), counts


def run(args) -> int:
    check_output_arguments(args)
    if (args.min_bb is not None or args.max_bb is not None) and args.conf_th is None:
        raise UserError("--min-bb / --max-bb go with --conf-th")
    img_kind, img_path = resolve_img_db(Path(args.img_db))
    if img_kind == "lmdb":
        _require("lmdb", "lmdb", "an LMDB image DB")
    rows, counts = plan(args)
    if not rows:
        raise UserError(f"text DB '{args.txt_db}' has no usable entry ({counts})")
    opts = {"dtype": args.dtype, "conf_th": args.conf_th, "min_bb": args.min_bb, "max_bb": args.max_bb}
    info = convert(args, PROG, rows, write_row, {**opts, "img_kind": img_kind, "img_path": str(img_path)},
                   settings=opts, info_extra={"img_db": str(img_path), "txt_db": str(args.txt_db),
                                              "skipped_entries": counts}, report_skipped=False)
    dims = info["notes"].get("feature_dims", [])
    print(f"{summary(PROG, info, Path(args.out))}; feature size {'/'.join(map(str, dims)) or '-'}", file=sys.stderr)
    if counts["detokenized"]:
        print(f"{PROG}: {counts['detokenized']} caption(s) detokenized from input_ids with {args.tokenizer}",
              file=sys.stderr)
    skipped = {k: v for k, v in {**counts, **info["skipped"]}.items() if v and k != "detokenized"}
    if skipped:
        examples = [e for ex in info["examples"].values() for e in ex][:REPORT]
        print(f"{PROG}: skipped " + ", ".join(f"{k}: {v}" for k, v in skipped.items())
              + (f"; e.g. {'; '.join(examples)}" if examples else ""), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("uniter_to_shards", __doc__)
    p.add_argument("--img-db", required=True, help="folder of .npz files, or UNITER's image LMDB")
    p.add_argument("--txt-db", required=True, help="UNITER's text DB folder (LMDB), or a JSON Lines file of its entries")
    p.add_argument("--text-field", default=None,
                   help=f"entry field with the caption (default: the first of {', '.join(TEXT_FIELDS)})")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or BERT folder (vocab.txt) to detokenize entries that have only input_ids")
    p.add_argument("--conf-th", type=float, default=None, help="keep regions with conf above this (UNITER: 0.2)")
    p.add_argument("--min-bb", type=int, default=None, help="with --conf-th: keep at least this many (UNITER: 10)")
    p.add_argument("--max-bb", type=int, default=None, help="with --conf-th: keep at most this many (UNITER: 100)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="stored features and soft labels (default: float16, as UNITER stores them)")
    add_output_arguments(p, prefix="uniter", images=False)
    return p


def main(argv=None) -> int:
    return converter_main(PROG, build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
