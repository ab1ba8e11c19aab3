"""Building ``tokenizer.json`` files: one token per word (a closed grammar such as the shapes
data's), or a WordPiece vocabulary learned from captions — those of any shards, whoever wrote them
(``vlpt data tokenizer SHARDS --out tokenizer.json``), so data made elsewhere needs no tokenizer
code of its own. The files load in ``tokenizers``, ``transformers.AutoTokenizer`` (with a
``tokenizer_config.json``) and vlpt (``model.tokenizer``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Iterator

#: BERT's special tokens in vlpt's id order ([PAD] = 0 ... [MASK] = 4)
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def word_tokenizer(words: Iterable[str], specials: tuple[str, ...] = SPECIAL_TOKENS):
    """A WordPiece tokenizer in which every one of ``words`` is exactly one token.

    The vocabulary is ``specials`` followed by the sorted ``words``. It is built directly instead
    of with ``WordPieceTrainer`` because the trainer may split rare words into sub-words, and
    one-token-per-word is what makes word-level grounding labels (word index -> token index)
    trivial. Normalizer BertNormalizer(lowercase=True), pre-tokenizer BertPreTokenizer,
    post-processor ``[CLS] $A [SEP]`` (pairs: ``[CLS] $A [SEP] $B [SEP]``), a WordPiece decoder.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in sorted(set(words) - set(specials)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(specials))
    return tok


def wordpiece_tokenizer(captions: Iterable[str], vocab_size: int, lowercase: bool = True):
    """A BERT-style WordPiece tokenizer trained on ``captions`` ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(captions, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return tok


def shard_captions(urls: list[str], limit: int | None = None, progress: bool = True) -> Iterator[str]:
    """The captions (``txt`` members, UTF-8) of ``urls``, in order; nothing else is decoded."""
    from tqdm.auto import tqdm

    from .stream import read_tar_samples

    bar = tqdm(total=limit, desc="captions", unit=" captions", disable=not progress, file=sys.stderr)
    seen = 0
    for url in urls:
        for raw in read_tar_samples(url, lambda *a: None):
            text = raw.get("txt")
            if text is None:
                continue
            try:
                yield text.decode("utf-8").strip()
            except UnicodeDecodeError:
                continue
            seen += 1
            bar.update(1)
            if limit is not None and seen >= limit:
                bar.close()
                return
    bar.close()


def main(args) -> int:
    """``vlpt data tokenizer SHARDS --out FILE``: a WordPiece tokenizer.json from the shards' captions."""
    from ..errors import UserError
    from .inspect import expand

    if args.vocab_size < len(SPECIAL_TOKENS) + 1:
        raise UserError(f"--vocab-size must be more than the {len(SPECIAL_TOKENS)} special tokens, got {args.vocab_size}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder; name the tokenizer file, e.g. {out / 'tokenizer.json'}")
    urls = expand(args.shards)
    captions = [c for c in shard_captions(urls, args.limit, progress=not args.quiet) if c]
    if not captions:
        raise UserError(f"no captions (txt members) in {len(urls)} shard(s): nothing to learn a vocabulary from")
    tok = wordpiece_tokenizer(captions, args.vocab_size, lowercase=not args.cased)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    print(f"wrote {out}: {tok.get_vocab_size()} word pieces from {len(captions)} captions of {len(urls)} shard(s); "
          f"use it with model.tokenizer={out}")
    return 0
