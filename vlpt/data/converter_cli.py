"""The command line every converter in ``tools/`` shares: its output options, their checks, the
row order, and ``convert`` (rows -> shards + report, through :mod:`vlpt.data.shard_writer`)."""
from __future__ import annotations

import argparse
import functools
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError, run_command
from .shard_writer import ImageOptions, report, write_shards



def add_output_arguments(p: argparse.ArgumentParser, prefix: str, images: bool = True) -> None:
    """``--out``, ``--shard-size``, ``--prefix``, ``--workers``, ``--limit``, the row shuffle,
    ``--overwrite``, ``--quiet`` and, for converters that store images, ``--resize``/``--quality``."""
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--prefix", default=prefix, help=f"shard names PREFIX-000000.tar (default: {prefix})")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes writing shards in parallel (default: the CPU count, at most 8)")
    p.add_argument("--limit", type=int, default=None, help="convert only the first N samples (for a try-out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle (default: 0)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the input's order")
    if images:
        p.add_argument("--resize", type=int, default=None, metavar="N",
                       help="scale larger images down so their shorter side (see --resize-side) is N pixels")
        p.add_argument("--resize-side", choices=("shorter", "longer"), default="shorter",
                       help="which side --resize sets (default: shorter)")
        p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default: 90)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards that an earlier run wrote from other input or settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_output_arguments(args: argparse.Namespace, images: str | None = None) -> None:
    """One-line errors for values :func:`add_output_arguments`'s options cannot take (and an
    ``images`` folder that does not exist)."""
    if images is not None and not Path(images).is_dir():
        raise UserError(f"images folder '{images}' not found")
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {args.shard_size}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if getattr(args, "resize", None) is not None and args.resize < 8:
        raise UserError(f"--resize must be at least 8 pixels, got {args.resize}")
    if hasattr(args, "quality") and not 1 <= args.quality <= 100:
        raise UserError(f"--quality must be in 1..100, got {args.quality}")


def image_options(args: argparse.Namespace) -> ImageOptions:
    return ImageOptions(resize=args.resize, side=args.resize_side, quality=args.quality)


def order_rows(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """The first ``--limit`` rows, shuffled with ``--seed`` unless ``--no-shuffle``: samples of one
    image spread over the shards instead of sitting side by side (a negative drawn from nearby
    samples would often be the same image)."""
    if args.limit is not None:
        rows = rows[: args.limit]
    if args.shuffle:
        rows = list(rows)
        random.Random(args.seed).shuffle(rows)
    return rows


def convert(args: argparse.Namespace, prog: str, rows: list[dict], write_row: Callable, options: Any = None,
            settings: dict | None = None, info_extra: dict | None = None, skipped_rows: dict | None = None,
            report_skipped: bool = True) -> dict:
    """Write the shards of the rows (put in order by :func:`order_rows`) and print the report:
    the end of a converter's ``run``. ``skipped_rows``: input rows the converter dropped while
    reading, by reason (recorded in ``info.json`` and reported)."""
    if not rows:
        dropped = {k: v for k, v in (skipped_rows or {}).items() if v}
        raise UserError("the input holds no sample to convert" + (f" (dropped: {dropped})" if dropped else ""))
    if options is None and hasattr(args, "resize"):
        options = image_options(args)
    opts = asdict(options) if isinstance(options, ImageOptions) else {}
    info = write_shards(rows, write_row, options, out=Path(args.out), prog=prog, prefix=args.prefix,
                        shard_size=args.shard_size, workers=args.workers, quiet=args.quiet, overwrite=args.overwrite,
                        settings={**opts, **(settings or {}), "shuffle": args.shuffle, "seed": args.seed},
                        info_extra={**(info_extra or {}), "skipped_rows": skipped_rows or {}})
    if report_skipped:
        report(prog, info, Path(args.out))
    return info


def converter_main(prog: str, build_parser: Callable[[], argparse.ArgumentParser], run: Callable, argv=None) -> int:
    """A converter's ``main``: parse, run, a user mistake in one line (exit 2), Ctrl-C says how to resume."""
    args = build_parser().parse_args(argv)
    return run_command(prog, run, args, resumable=True)


def converter_entry(prog: str, build_parser: Callable[[], argparse.ArgumentParser], run: Callable) -> Callable:
    """A converter script's ``main(argv=None) -> exit code`` (:func:`converter_main` bound to it)."""
    return functools.partial(converter_main, prog, build_parser, run)
