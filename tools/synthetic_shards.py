#!/usr/bin/env python
"""Write random shards in vlpt's sample schema at any size, plus a matching tokenizer.

For throughput and memory checks at real model sizes (e.g. UNITER-base: 2048-d
region features, 1601-class soft labels, a 28996-word vocabulary) where the
content does not matter, without downloading anything:

    python tools/synthetic_shards.py --out /tmp/syn --samples 20000
    vlpt train recipes/uniter-base.yaml "data.train=[{shards: '/tmp/syn/syn-{000000..000019}.tar'}]" \
        data.val=null model.tokenizer=/tmp/syn/tokenizer.json train.steps=100

Captions are random words ``w0 … wN`` (one token each); regions are random
features with random boxes and Dirichlet soft labels. Timestamps are fixed (tar members
and ``regions.npz`` members alike), so the same arguments write the same bytes.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from vlpt.data.samples import npz_bytes
from vlpt.errors import UserError, output_folder, run_command, tool_parser


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(vocab_size - len(specials)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def main(argv=None) -> int:
    p = tool_parser("synthetic_shards", __doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--feature-dim", type=int, default=2048)
    p.add_argument("--classes", type=int, default=1601, help="soft-label classes incl. background (0: none)")
    p.add_argument("--vocab-size", type=int, default=28996)
    p.add_argument("--regions", default="10-100", help="regions per image, MIN-MAX")
    p.add_argument("--caption-words", default="8-30", help="words per caption, MIN-MAX")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return run_command("synthetic_shards", write, args)


def span(flag: str, text: str, least: int) -> tuple[int, int]:
    """``MIN-MAX`` of a flag, both at least ``least`` and MIN <= MAX."""
    try:
        low, high = (int(x) for x in text.split("-"))
    except ValueError:
        raise UserError(f"{flag} must be MIN-MAX (e.g. 10-100), got '{text}'") from None
    if not least <= low <= high:
        raise UserError(f"{flag} must be MIN-MAX with {least} <= MIN <= MAX, got '{text}'")
    return low, high


def write(args) -> int:
    import webdataset as wds
    from tqdm import tqdm

    for flag, value, least in (("--samples", args.samples, 1), ("--shard-size", args.shard_size, 1),
                               ("--feature-dim", args.feature_dim, 1), ("--classes", args.classes, 0),
                               ("--vocab-size", args.vocab_size, 6)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    rmin, rmax = span("--regions", args.regions, 1)
    wmin, wmax = span("--caption-words", args.caption_words, 1)
    out = output_folder(args.out)
    build_tokenizer(args.vocab_size).save(str(out / "tokenizer.json"))
    rng = np.random.default_rng(args.seed)
    n_shards = (args.samples + args.shard_size - 1) // args.shard_size
    with tqdm(total=args.samples, desc="synthetic shards", unit="sample") as bar:
        for s in range(n_shards):
            with wds.TarWriter(str(out / f"syn-{s:06d}.tar"), mtime=0.0) as w:
                for i in range(s * args.shard_size, min(args.samples, (s + 1) * args.shard_size)):
                    k = int(rng.integers(rmin, rmax + 1))
                    xy = rng.random((k, 2)) * 0.7
                    wh = 0.05 + rng.random((k, 2)) * 0.25
                    arrays = {
                        "features": rng.random((k, args.feature_dim), dtype=np.float32).astype(np.float16),
                        "boxes": np.concatenate([xy, np.minimum(xy + wh, 1.0)], 1).astype(np.float32),
                        "conf": rng.random(k, dtype=np.float32),
                    }
                    if args.classes:
                        arrays["soft_labels"] = rng.dirichlet(np.full(args.classes, 0.05), size=k).astype(np.float16)
                    words = rng.integers(0, args.vocab_size - 5, int(rng.integers(wmin, wmax + 1)))
                    w.write({"__key__": f"syn{i:09d}", "txt": " ".join(f"w{x}" for x in words),
                             "regions.npz": npz_bytes(arrays)})
                    bar.update(1)
    (out / "info.json").write_text(json.dumps({"samples": args.samples, "shards": n_shards, **vars(args)}, indent=2))
    print(f"wrote {args.samples} samples in {n_shards} shards to {out} (pattern syn-{{000000..{n_shards - 1:06d}}}.tar)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
