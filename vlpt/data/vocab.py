"""Building ``tokenizer.json`` files: one token per word (a closed grammar such as the shapes
data's), or a WordPiece vocabulary learned from captions."""
from __future__ import annotations

from typing import Iterable

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
