"""Resumable, reproducible shard writing: what every converter in ``tools/`` shares.

A converter (``captions_to_shards``, ``vqa_to_shards``, ``uniter_to_shards``, ...) reads its
public format into *rows*: one JSON-able dict per sample, with a ``key`` and whatever its
``write_row(sink, row, options)`` needs to write that sample. This module does the rest:

* cuts the rows into shards of ``--shard-size`` named ``PREFIX-000000.tar``, ...;
* writes each shard to a temporary name and renames it when complete, so an interrupted
  run leaves no half shard under a final name, and a second run with the same input and
  settings skips the complete shards (``info.json`` keeps a fingerprint of both; a run with
  other input or settings into the same folder is refused unless ``--overwrite``);
* fixes tar member times and owners (and :func:`vlpt.data.samples.npz_bytes` fixes zip
  times), so the same input and settings give the same bytes;
* writes shards in parallel processes (``--workers``) with a progress bar (``--quiet``);
* counts what it skips by reason with a few examples each: missing and unreadable images
  (counted as distinct files, and as samples), and the converter's own reasons.

The command line converters share (``--out``, ``--shard-size``, ... and ``convert``) is in
:mod:`vlpt.data.converter_cli`. ``write_row`` runs in worker processes, so it must be a module-level function and
``options`` plain picklable data.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UserError, output_folder

#: fixed tar member time: the same input and settings give the same shard bytes
TAR_MTIME = 0
#: examples listed per skip reason in the report (the counts are always complete)
REPORT_EXAMPLES = 10
#: distinct missing/unreadable file names remembered per shard (to count distinct images)
LISTED_FILES = 1000
#: skip reasons whose examples are image files: reported as distinct images
IMAGE_REASONS = {"missing_image": "missing", "unreadable_image": "unreadable"}


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One tar member with a fixed time, mode and owner."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    info.uname = info.gname = "vlpt"
    tar.addfile(info, io.BytesIO(data))


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the ``json`` member of a sample."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_json(path: Path, obj: Any) -> None:
    """Write a JSON file atomically (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class KeyMaker:
    """Sample keys from ids: characters other than letters, digits, ``_`` and ``-`` become ``_``
    (webdataset splits keys at the first dot), and a key already given gets a ``_N`` suffix."""

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, text: Any) -> str:
        key = re.sub(r"[^A-Za-z0-9_-]", "_", str(text)) or "_"
        if key in self.seen:
            n = 1
            while f"{key}_{n}" in self.seen:
                n += 1
            key = f"{key}_{n}"
        self.seen.add(key)
        return key


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file's content; a missing or invalid file is a :class:`UserError`."""
    if not path.is_file():
        raise UserError(f"{what} '{path}' not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{what} '{path}' is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} '{path}' is not valid JSON ({e})") from None


def read_jsonl_file(path: Path, what: str) -> Iterator[tuple[int, Any]]:
    """(line number, object) of each non-empty line of a JSON Lines file."""
    if not path.is_file():
        raise UserError(f"{what} '{path}' not found")
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{what} '{path}' line {i} is not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} '{path}' is not UTF-8 text") from None


class Progress:
    """tqdm when installed, else a line on stderr every few seconds; ``total`` may be unknown."""

    def __init__(self, total: int | None, desc: str, unit: str = "sample", disable: bool = False):
        self.bar, self.total, self.desc, self.unit, self.disable = None, total, desc, unit, disable
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
        elif not self.disable and (time.monotonic() - self.last > 5 or self.n == self.total):
            self.last = time.monotonic()
            of = f"/{self.total}" if self.total is not None else ""
            print(f"{self.desc}: {self.n}{of} {self.unit}s {postfix}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored: ``resize`` scales larger images down so that their ``side``
    (shorter or longer) is that many pixels; re-encoded images use JPEG ``quality``."""

    resize: int | None = None
    side: str = "shorter"
    quality: int = 90


def encode_image(path: str, opts: ImageOptions) -> tuple[bytes, dict]:
    """JPEG bytes of the image and its sizes; raises OSError (missing) or ValueError (unreadable).

    A JPEG that needs no resize is stored byte for byte; anything else is re-encoded."""
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            scale = 1.0
            if opts.resize:
                scale = opts.resize / (min(w, h) if opts.side == "shorter" else max(w, h))
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
            im.save(buf, format="JPEG", quality=opts.quality)
    except Image.UnidentifiedImageError:
        raise ValueError("not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    return buf.getvalue(), {"width": tw, "height": th, "orig_width": w, "orig_height": h}


# --------------------------------------------------------------------------------------
# one shard (runs in a worker process)
# --------------------------------------------------------------------------------------


class ShardSink:
    """The shard being written, as a converter's ``write_row`` sees it."""

    def __init__(self, tar: tarfile.TarFile, name: str):
        self.tar = tar
        self.stats: dict[str, Any] = {"name": name, "samples": 0, "skipped": {}, "examples": {}, "files": {},
                                      "notes": {}}

    def add(self, key: str, members: dict[str, Any]) -> None:
        """One sample: extension -> bytes, text (UTF-8) or a JSON-able object (compact JSON)."""
        for ext, value in members.items():
            if isinstance(value, str):
                value = value.encode("utf-8")
            elif not isinstance(value, (bytes, bytearray)):
                value = json_bytes(value)
            add_member(self.tar, f"{key}.{ext}", bytes(value))
        self.stats["samples"] += 1

    def skip(self, reason: str, example: str = "", file: str | None = None) -> None:
        """Count one sample not written, by reason; ``file`` (an image) is counted as a distinct file."""
        self.stats["skipped"][reason] = self.stats["skipped"].get(reason, 0) + 1
        examples = self.stats["examples"].setdefault(reason, [])
        if example and len(examples) < REPORT_EXAMPLES and example not in examples:
            examples.append(example)
        if file is not None:
            files = self.stats["files"].setdefault(reason, [])
            if file not in files and len(files) <= LISTED_FILES:  # one past the limit: "at least"
                files.append(file)

    def image(self, path: str, opts: ImageOptions) -> tuple[bytes, dict] | None:
        """The stored image and its sizes; None (the sample counted as skipped) when missing/unreadable."""
        try:
            return encode_image(path, opts)
        except OSError:
            self.skip("missing_image", path, file=path)
        except ValueError as e:
            self.skip("unreadable_image", f"{path} ({e})", file=path)
        return None

    def note(self, name: str, value: Any) -> None:
        """Remember a value (e.g. a feature size); the report lists the distinct values."""
        values = self.stats["notes"].setdefault(name, [])
        if value not in values:
            values.append(value)


def write_image_text_row(sink: ShardSink, row: dict, opts: ImageOptions) -> None:
    """The ``write_row`` of a sample of one image and one text: ``row`` holds ``key``, ``text``,
    ``path`` (the image file) and ``meta`` (the ``json`` member)."""
    image = sink.image(row["path"], opts)
    if image is not None:
        sink.add(row["key"], {"txt": row["text"], "jpg": image[0], "json": row["meta"]})


def _write_shard(job: dict) -> dict:
    """Write one shard to a temporary name, then rename it; return its counts."""
    out = Path(job["out"])
    final = out / job["name"]
    tmp = out / f".{job['name']}.tmp-{os.getpid()}"
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            sink = ShardSink(tar, job["name"])
            for row in job["rows"]:
                job["write_row"](sink, row, job["options"])
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sink.stats


# --------------------------------------------------------------------------------------
# a set of shards
# --------------------------------------------------------------------------------------


def fingerprint(settings: dict, rows: list[dict], unhashed: tuple[str, ...] = ("path", "paths")) -> str:
    """What the shards are written from: the settings and every row (image locations left out,
    so the same files moved to another folder still resume)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for r in rows:
        digest.update(json.dumps({k: v for k, v in r.items() if k not in unhashed}, sort_keys=True,
                                 default=str).encode())
    return digest.hexdigest()[:16]


def _prepare_folder(out: Path, prefix: str, fp: str, overwrite: bool) -> dict:
    """The shard stats of an earlier run with the same fingerprint; refuse (or clear) other shards."""
    info_path = out / "info.json"
    try:
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    except json.JSONDecodeError:
        info = {}
    other = (info.get("settings") or {}).get("prefix")
    if other is not None and other != prefix and any(out.glob(f"{other}-*.tar")):
        raise UserError(f"'{out}' already holds the shards of another conversion ('{other}-*.tar', described by "
                        "its info.json); write each conversion to a folder of its own")
    existing = sorted(p.name for p in out.glob(f"{prefix}-*.tar"))
    if existing and info.get("fingerprint") != fp:
        if not overwrite:
            raise UserError(f"'{out}' already holds {len(existing)} '{prefix}-*.tar' shard(s) written from another "
                            "input or other settings; pass --overwrite to replace them, or choose another --out")
        for name in existing:
            (out / name).unlink()
        info = {}
    for stale in out.glob(f".{prefix}-*.tar.tmp-*"):  # left by an interrupted run
        stale.unlink(missing_ok=True)
    return {n: s for n, s in (info.get("shard_stats") or {}).items()
            if n.startswith(f"{prefix}-") and (out / n).is_file()}


def _totals(stats: list[dict]) -> dict:
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    files: dict[str, set] = {}
    notes: dict[str, set] = {}
    for s in stats:
        for reason, n in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
            ex = examples.setdefault(reason, [])
            ex.extend(e for e in s["examples"].get(reason, []) if e not in ex)
        for reason, names in s["files"].items():
            files.setdefault(reason, set()).update(names)
        for name, values in s["notes"].items():
            notes.setdefault(name, set()).update(values)
    capped = {r for s in stats for r, names in s["files"].items() if len(names) > LISTED_FILES}
    out = {"samples": sum(s["samples"] for s in stats), "skipped": skipped,
           "examples": {r: e[:REPORT_EXAMPLES] for r, e in examples.items()},
           "notes": {k: sorted(v) for k, v in notes.items()}}
    for reason, word in IMAGE_REASONS.items():
        out[f"{word}_images"] = len(files.get(reason, ()))
        out[f"{word}_images_at_least"] = reason in capped
    return out


def write_shards(rows: list[dict], write_row: Callable[[ShardSink, dict, Any], None], options: Any, *,
                 out: Path, prog: str, prefix: str, shard_size: int, settings: dict, workers: int = 1,
                 quiet: bool = False, overwrite: bool = False, info_extra: dict | None = None) -> dict:
    """Write (or complete) the shards of ``rows`` in ``out``; returns ``info.json``'s content."""
    output_folder(out)
    settings = {**settings, "shard_size": shard_size, "prefix": prefix}
    fp = fingerprint(settings, rows)
    done = _prepare_folder(out, prefix, fp, overwrite)
    n_shards = (len(rows) + shard_size - 1) // shard_size
    names = [f"{prefix}-{i:06d}.tar" for i in range(n_shards)]
    todo = [i for i, n in enumerate(names) if n not in done]
    info = {"fingerprint": fp, **(info_extra or {}), "settings": settings, "rows": len(rows), "shards": names,
            "shard_stats": done}
    info_path = out / "info.json"
    write_json(info_path, info)
    if done:
        print(f"{prog}: {len(done)} of {n_shards} shard(s) already complete in {out}; writing the other "
              f"{len(todo)}", file=sys.stderr)

    jobs = [{"out": str(out), "name": names[i], "write_row": write_row, "options": options,
             "rows": rows[i * shard_size:(i + 1) * shard_size]} for i in todo]
    sizes = {j["name"]: len(j["rows"]) for j in jobs}
    bar = Progress(sum(sizes.values()), prog, disable=quiet or not jobs)
    missing = 0

    def finished(stats: dict) -> None:
        nonlocal missing
        info["shard_stats"][stats["name"]] = stats
        write_json(info_path, info)
        missing += sum(stats["skipped"].get(r, 0) for r in IMAGE_REASONS)
        bar.update(sizes[stats["name"]], f"images missing or unreadable: {missing}" if missing else "")

    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                finished(_write_shard(job))
        else:
            import multiprocessing as mp

            context = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
            with context.Pool(min(workers, len(jobs))) as pool:
                for stats in pool.imap_unordered(_write_shard, jobs):
                    finished(stats)
    finally:
        bar.close()
    info.update(_totals([info["shard_stats"][n] for n in names if n in info["shard_stats"]]))
    write_json(info_path, info)
    return info


def summary(prog: str, info: dict, out: Path) -> str:
    """``PROG: N samples in S shard(s) in OUT (pattern PREFIX-{000000..S-1}.tar)``."""
    n = len(info["shards"])
    return (f"{prog}: {info['samples']} samples in {n} shard(s) in {out} "
            f"(pattern {info['settings']['prefix']}-{{000000..{max(n - 1, 0):06d}}}.tar)")


def report(prog: str, info: dict, out: Path) -> None:
    """The summary on stderr: samples and shards, then what was skipped, by reason, with examples."""
    print(summary(prog, info, out), file=sys.stderr)
    for reason, count in (info.get("skipped_rows") or {}).items():
        if count:
            print(f"{prog}: skipped {count} input row(s): {reason}", file=sys.stderr)
    for reason, count in info["skipped"].items():
        examples = "; ".join(info["examples"].get(reason, []))
        if reason in IMAGE_REASONS:
            word = IMAGE_REASONS[reason]
            images = info[f"{word}_images"]
            least = "at least " if info[f"{word}_images_at_least"] else ""
            samples = f" ({count} samples)" if count != images else ""
            print(f"{prog}: skipped {least}{images} {word} image(s){samples}, e.g.: {examples}", file=sys.stderr)
        else:
            print(f"{prog}: skipped {count} sample(s): {reason}" + (f", e.g.: {examples}" if examples else ""),
                  file=sys.stderr)
