"""``vlpt data inspect SHARDS...``: what a set of shards holds, read the way training reads it.

Prints the sample count; histograms of caption length (words) and regions per image;
the fields present (tar members per sample, and the arrays inside ``regions.npz``)
with their counts; the feature sizes; bad samples by reason; and per-shard counts.
Samples are decoded with :func:`vlpt.data.samples.decode_sample`, the training
stream's own safe decoder, so a sample counted bad here is one training skips
(``bad_regions``, ``nonfinite_regions``, ``empty_caption``, ``bad_caption``,
``caption_too_long``, ``bad_json``; ``bad_tar`` for a broken archive member).

Caption lengths are checked against ``data.max_text_len`` (60 word pieces by default)
with ``tokenizer.json`` beside the first shard when there is one, else in words plus
``[CLS]``/``[SEP]``.

    vlpt data inspect "/data/coco/shard-{000000..000009}.tar"
    vlpt data inspect "/data/coco/*.tar" --limit 5000 --json
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import UserError
from .samples import BadSample, DecodeSettings, decode_sample
from .shards import expand_shards

BAR_WIDTH = 30
MAX_BINS = 12


class WordTokenizer:
    """Stand-in when no tokenizer is available: one id per whitespace-separated word."""

    source = "words"

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        n = len(text.split())
        return [0] * (n + 2), [-1, *range(n), -1]


def expand(patterns: list[str]) -> list[str]:
    """Shard URLs from shard arguments (paths, brace patterns, globs, folders; see
    :mod:`vlpt.data.shards`); a missing local shard is a UserError."""
    urls = [u for pattern in patterns for u in expand_shards(pattern)]
    if not urls:
        raise UserError("no shard given")
    return urls


def _tokenizer(urls: list[str], path: str | None):
    from .tokenizer import TextTokenizer

    if path:
        return TextTokenizer.from_path(path)
    first = urls[0]
    if "://" not in first and not first.startswith("pipe:"):
        cand = Path(first).parent / "tokenizer.json"
        if cand.is_file():
            try:
                return TextTokenizer.from_path(cand)
            except UserError:
                pass
    return WordTokenizer()


def inspect_shards(urls: list[str], limit: int | None = None, tokenizer=None, max_text_len: int = 60,
                   max_regions: int = 100, feature_dim: int | None = None) -> dict[str, Any]:
    """Read the shards (at most ``limit`` samples) and return the summary as a dict."""
    from .stream import read_tar_samples

    tokenizer = tokenizer or WordTokenizer()
    settings = DecodeSettings(feature_dim=feature_dim, max_text_len=max_text_len, max_regions=max_regions)
    fields: Counter = Counter()
    region_arrays: Counter = Counter()
    feature_dims: Counter = Counter()
    modalities: Counter = Counter()
    bad: Counter = Counter()
    words: list[int] = []
    regions: list[int] = []
    shards: list[dict] = []
    read = 0
    for url in urls:
        if limit is not None and read >= limit:
            break
        shard = {"shard": url, "samples": 0, "bad": 0}
        shard_bad = Counter()

        def on_error(reason: str, detail: str = "") -> None:
            shard_bad[reason] += 1

        for raw in read_tar_samples(url, on_error):
            read += 1
            shard["samples"] += 1
            fields.update(k for k in raw if not k.startswith("__"))
            try:
                sample = decode_sample(raw, tokenizer, settings)
            except BadSample as e:
                shard_bad[e.reason] += 1
            else:
                if "text" in sample:
                    words.append(len(sample["text"].split()))
                if "features" in sample:
                    regions.append(len(sample["features"]))
                    feature_dims[int(sample["features"].shape[1])] += 1
                    region_arrays.update(k for k in ("features", "boxes", "soft_labels", "conf") if k in sample)
                has_text, has_image = "input_ids" in sample, "features" in sample or any(
                    e in raw for e in ("jpg", "jpeg", "png", "webp"))
                modalities[{(True, True): "text+image", (True, False): "text only",
                            (False, True): "image only", (False, False): "neither"}[(has_text, has_image)]] += 1
            if limit is not None and read >= limit:
                break
        shard["bad"] = sum(shard_bad.values())
        shard["bad_by_reason"] = dict(shard_bad)
        bad.update(shard_bad)
        shards.append(shard)
    good = read - sum(v for k, v in bad.items() if k != "bad_tar")
    return {
        "shards": len(shards),
        "shards_given": len(urls),
        "samples": read,
        "good_samples": good,
        "bad_samples": sum(bad.values()),
        "bad_by_reason": dict(bad.most_common()),
        "fields": dict(fields.most_common()),
        "regions_npz_arrays": dict(region_arrays.most_common()),
        "feature_dims": {str(k): v for k, v in sorted(feature_dims.items())},
        "modalities": dict(modalities.most_common()),
        "caption_words": _stats(words),
        "regions_per_image": _stats(regions),
        "per_shard": shards,
        "tokenizer": getattr(tokenizer, "source", "") or "words",
        "limit": limit,
    }


def _stats(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    lo, hi = min(values), max(values)
    width = max(1, math.ceil((hi - lo + 1) / MAX_BINS))
    hist = Counter((v - lo) // width for v in values)
    bins = [{"from": lo + b * width, "to": lo + (b + 1) * width - 1, "count": hist.get(b, 0)}
            for b in range((hi - lo) // width + 1)]
    ordered = sorted(values)
    return {"count": len(values), "min": lo, "max": hi, "mean": sum(values) / len(values),
            "median": ordered[len(ordered) // 2], "histogram": bins}


def _histogram(title: str, s: dict) -> list[str]:
    if not s["count"]:
        return [f"{title}: none"]
    lines = [f"{title}: min {s['min']}, median {s['median']}, mean {s['mean']:.1f}, max {s['max']} "
             f"({s['count']} samples)"]
    peak = max(b["count"] for b in s["histogram"]) or 1
    labels = [f"{b['from']}" if b["from"] == b["to"] else f"{b['from']}-{b['to']}" for b in s["histogram"]]
    label_w = max(len(label) for label in labels)
    for b, label in zip(s["histogram"], labels):
        eighths = round(BAR_WIDTH * 8 * b["count"] / peak)
        bar = "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]
        lines.append(f"  {label:>{label_w}} │{bar:<{BAR_WIDTH}} {b['count']}")
    return lines


def format_summary(r: dict[str, Any]) -> str:
    pct = lambda n: f"{100 * n / r['samples']:.1f}%" if r["samples"] else "-"  # noqa: E731
    out = [f"{r['samples']} samples in {r['shards']} shard(s)"
           + (f" (stopped at --limit {r['limit']}; {r['shards_given']} shard(s) given)" if r["limit"] and
              r["samples"] >= r["limit"] else "")
           + f": {r['good_samples']} usable, {r['bad_samples']} bad ({pct(r['bad_samples'])})"]
    if r["bad_by_reason"]:
        out.append("bad samples by reason (training skips these):")
        out += [f"  {k:<20} {v:>8}  {pct(v)}" for k, v in r["bad_by_reason"].items()]
    out.append("fields (tar members per sample):")
    out += [f"  {k:<20} {v:>8}  {pct(v)}" for k, v in r["fields"].items()]
    if r["regions_npz_arrays"]:
        out.append("regions.npz arrays (usable samples): " + ", ".join(f"{k} {v}" for k, v in r["regions_npz_arrays"].items()))
        out.append("feature sizes: " + ", ".join(f"D={k}: {v}" for k, v in r["feature_dims"].items())
                   + ("   <- more than one: set model.region_feature_dim to one of them" if len(r["feature_dims"]) > 1 else ""))
    if r["modalities"]:
        out.append("modalities (usable samples): " + ", ".join(f"{k} {v}" for k, v in r["modalities"].items()))
    out += _histogram("caption length (words)", r["caption_words"])
    out += _histogram("regions per image", r["regions_per_image"])
    out.append(f"caption limit checked with: {r['tokenizer']}")
    out.append("per shard:")
    w = max(len(s["shard"]) for s in r["per_shard"]) if r["per_shard"] else 5
    for s in r["per_shard"]:
        reasons = ", ".join(f"{k} {v}" for k, v in s["bad_by_reason"].items())
        out.append(f"  {s['shard']:<{w}}  {s['samples']:>7} samples  {s['bad']:>5} bad" + (f" ({reasons})" if reasons else ""))
    return "\n".join(out)


def main(args) -> int:
    """Entry point of ``vlpt data inspect`` (``args.shards``, ``args.limit``, ``args.json``)."""
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    urls = expand(args.shards)
    tokenizer = _tokenizer(urls, getattr(args, "tokenizer", None))
    result = inspect_shards(urls, args.limit, tokenizer, max_text_len=getattr(args, "max_text_len", None) or 60,
                            feature_dim=getattr(args, "feature_dim", None))
    try:
        print(json.dumps(result, indent=2) if args.json else format_summary(result), flush=True)
    except BrokenPipeError:  # `vlpt data inspect ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
