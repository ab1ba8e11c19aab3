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
import hashlib
import io
import json
import os
import random
import sys
import tarfile
import time
from pathlib import Path


from vlpt.errors import UserError, run_command, tool_parser  # noqa: E402

PROG = "captions_to_shards"
#: fixed tar member time: the same input and settings give the same shard bytes
TAR_MTIME = 0
#: file names of missing images listed in the report (the count is always complete)
REPORT_MISSING = 10


# --------------------------------------------------------------------------------------
# reading the captions file
# --------------------------------------------------------------------------------------


def _json_scalar(v):
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)


def read_coco(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"'{path}' is not valid JSON ({e})") from None
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


def read_jsonl(path: Path, image_col: str, caption_col: str) -> list[dict]:
    def records():
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"'{path}' line {i} is not valid JSON ({e.msg})") from None
    try:
        return _table_rows(records(), path, image_col, caption_col)
    except UnicodeDecodeError:
        raise UserError(f"'{path}' is not UTF-8 text") from None


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
        return read_jsonl(path, image_col, caption_col)
    return read_csv(path, image_col, caption_col)


# --------------------------------------------------------------------------------------
# writing one shard (runs in a worker process)
# --------------------------------------------------------------------------------------


def encode_image(path: str, resize: int | None, side: str, quality: int) -> tuple[bytes, dict]:
    """JPEG bytes of the image and its sizes; raises OSError (missing) or ValueError (unreadable)."""
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            scale = 1.0
            if resize:
                scale = resize / (min(w, h) if side == "shorter" else max(w, h))
            if scale >= 1.0 and im.format == "JPEG" and im.mode in ("RGB", "L"):
                im.verify()  # cheap integrity check; the bytes are stored as they are
                return data, {"width": w, "height": h, "orig_width": w, "orig_height": h}
            tw, th = (max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1.0 else (w, h)
            if scale < 1.0:
                im.draft("RGB", (tw, th))  # JPEG: decode at a reduced scale, much faster
            im = im.convert("RGB")
            if im.size != (tw, th):
                im = im.resize((tw, th), Image.BICUBIC, reducing_gap=3.0)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
    except Image.UnidentifiedImageError:
        raise ValueError("not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    return buf.getvalue(), {"width": tw, "height": th, "orig_width": w, "orig_height": h}


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    info.uname = info.gname = "vlpt"
    tar.addfile(info, io.BytesIO(data))


def write_shard(job: dict) -> dict:
    """Write one shard to a temporary name, then rename it; return its counts."""
    out = Path(job["out"])
    final = out / job["name"]
    tmp = out / f".{job['name']}.tmp-{os.getpid()}"
    stats = {"name": job["name"], "samples": 0, "missing": 0, "unreadable": 0, "missing_files": [],
             "unreadable_files": []}
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in job["rows"]:
                path = row["path"]
                try:
                    jpg, sizes = encode_image(path, job["resize"], job["side"], job["quality"])
                except OSError:
                    stats["missing"] += 1
                    if len(stats["missing_files"]) < REPORT_MISSING:
                        stats["missing_files"].append(path)
                    continue
                except ValueError as e:
                    stats["unreadable"] += 1
                    if len(stats["unreadable_files"]) < REPORT_MISSING:
                        stats["unreadable_files"].append(f"{path} ({e})")
                    continue
                meta = {"image": row["image"], **sizes, **row["meta"]}
                key = row["key"]
                _add_member(tar, f"{key}.txt", row["caption"].encode("utf-8"))
                _add_member(tar, f"{key}.jpg", jpg)
                _add_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode())
                stats["samples"] += 1
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return stats


# --------------------------------------------------------------------------------------
# progress and tokenizer
# --------------------------------------------------------------------------------------


class _Progress:
    """tqdm when installed, else a line on stderr every few seconds."""

    def __init__(self, total: int, desc: str, unit: str, disable: bool = False):
        self.bar = None
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.n, self.last = 0, 0.0
        if disable:
            return
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        except ImportError:
            pass

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix_str(postfix)
        elif not self.disable and (time.monotonic() - self.last > 5 or self.n >= self.total):
            self.last = time.monotonic()
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}s {postfix}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_tokenizer(captions: list[str], vocab_size: int):
    """A BERT-style WordPiece tokenizer trained on the captions ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(captions, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return tok


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def plan(args) -> tuple[list[dict], int]:
    """The rows in shard order with keys and paths; the number of rows dropped for a bad caption."""
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
    if args.limit is not None:
        kept = kept[: args.limit]
    if args.shuffle:
        random.Random(args.seed).shuffle(kept)
    return kept, bad


def run(args) -> int:
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {args.shard_size}")
    if args.resize is not None and args.resize < 8:
        raise UserError(f"--resize must be at least 8 pixels, got {args.resize}")
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be in 1..100, got {args.quality}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    rows, bad_captions = plan(args)
    if not rows:
        raise UserError(f"'{args.captions}' holds no (image, caption) pair with a non-empty caption")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    settings = {"shard_size": args.shard_size, "resize": args.resize, "resize_side": args.resize_side,
                "quality": args.quality, "shuffle": args.shuffle, "seed": args.seed, "prefix": args.prefix}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in rows:
        digest.update(json.dumps([r["key"], r["image"], r["caption"], r["meta"]], sort_keys=True).encode())
    fingerprint = digest.hexdigest()[:16]

    n_shards = (len(rows) + args.shard_size - 1) // args.shard_size
    names = [f"{args.prefix}-{i:06d}.tar" for i in range(n_shards)]
    info_path = out / "info.json"
    info = {}
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError:
            info = {}
    existing = sorted(p.name for p in out.glob(f"{args.prefix}-*.tar"))
    if existing and info.get("fingerprint") != fingerprint:
        if not args.overwrite:
            raise UserError(f"'{out}' already holds {len(existing)} '{args.prefix}-*.tar' shard(s) written from "
                            "another input or other settings; pass --overwrite to replace them, or choose another --out")
        for name in existing:
            (out / name).unlink()
        info = {}
    for stale in out.glob(f".{args.prefix}-*.tar.tmp-*"):  # left by an interrupted run
        stale.unlink(missing_ok=True)

    done = {n: s for n, s in (info.get("shard_stats") or {}).items() if (out / n).is_file()}
    todo = [i for i, n in enumerate(names) if not (out / n).is_file()]
    info = {"fingerprint": fingerprint, "source": str(args.captions), "settings": settings,
            "rows": len(rows), "bad_captions": bad_captions, "shards": names, "shard_stats": done}
    _write_json(info_path, info)
    skipped = n_shards - len(todo)
    if skipped:
        print(f"{PROG}: {skipped} of {n_shards} shard(s) already complete in {out}; writing the other {len(todo)}",
              file=sys.stderr)

    jobs = [{"out": str(out), "name": names[i], "resize": args.resize, "side": args.resize_side,
             "quality": args.quality, "rows": rows[i * args.shard_size:(i + 1) * args.shard_size]} for i in todo]
    bar = _Progress(sum(len(j["rows"]) for j in jobs), PROG, "sample", disable=args.quiet or not jobs)
    totals = {"missing": 0, "unreadable": 0}

    def finished(stats: dict, rows_in: int) -> None:
        info["shard_stats"][stats["name"]] = stats
        _write_json(info_path, info)
        totals["missing"] += stats["missing"]
        totals["unreadable"] += stats["unreadable"]
        bar.update(rows_in, f"missing {totals['missing']}" if totals["missing"] else "")

    try:
        if args.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                finished(write_shard(job), len(job["rows"]))
        else:
            import multiprocessing as mp

            sizes = {j["name"]: len(j["rows"]) for j in jobs}
            with mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(args.workers) as pool:
                for stats in pool.imap_unordered(write_shard, jobs):
                    finished(stats, sizes[stats["name"]])
    finally:
        bar.close()

    if args.vocab_size and not (out / "tokenizer.json").is_file():
        train_tokenizer([r["caption"] for r in rows], args.vocab_size).save(str(out / "tokenizer.json"))

    stats = info["shard_stats"]
    samples = sum(s["samples"] for s in stats.values())
    missing = sum(s["missing"] for s in stats.values())
    unreadable = sum(s["unreadable"] for s in stats.values())
    info.update(samples=samples, missing_images=missing, unreadable_images=unreadable)
    _write_json(info_path, info)
    print(f"{PROG}: {samples} samples in {n_shards} shard(s) in {out} "
          f"(pattern {args.prefix}-{{000000..{n_shards - 1:06d}}}.tar)", file=sys.stderr)
    if bad_captions:
        print(f"{PROG}: skipped {bad_captions} row(s) with an empty or non-text caption", file=sys.stderr)
    for kind, count in (("missing", missing), ("unreadable", unreadable)):
        if count:
            examples = [f for s in stats.values() for f in s[f"{kind}_files"]][:REPORT_MISSING]
            print(f"{PROG}: skipped {count} {kind} image(s), e.g.: " + "; ".join(examples), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("captions_to_shards", __doc__)
    p.add_argument("captions", help="COCO captions JSON, JSON Lines or CSV file")
    p.add_argument("--images", help="folder the image paths are relative to (default: the captions file's folder)")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--format", choices=("auto", "coco", "jsonl", "csv"), default="auto",
                   help="input format (default: from the extension: .json COCO, .jsonl, .csv)")
    p.add_argument("--image-column", default="image", help="JSONL/CSV column with the image path (default: image)")
    p.add_argument("--caption-column", default="caption", help="JSONL/CSV column with the caption (default: caption)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--prefix", default="shard", help="shard names PREFIX-000000.tar (default: shard)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes writing shards in parallel (default: the CPU count, at most 8)")
    p.add_argument("--resize", type=int, default=None, metavar="N",
                   help="scale larger images down so their shorter side (see --resize-side) is N pixels")
    p.add_argument("--resize-side", choices=("shorter", "longer"), default="shorter",
                   help="which side --resize sets (default: shorter)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default: 90)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row shuffle (default: 0)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the input's row order")
    p.add_argument("--limit", type=int, default=None, help="convert only the first N rows (for a try-out)")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="WordPiece vocabulary of the tokenizer.json written beside the shards; 0: write none "
                        "(default: 8000)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards that an earlier run wrote from other input or settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, run, args, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
