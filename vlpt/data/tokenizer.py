"""Tokenization through the `tokenizers` library, for any BERT-style vocabulary.

Accepts a ``tokenizer.json`` file, or a folder holding ``tokenizer.json`` or
``vocab.txt`` (a Hugging Face BERT checkpoint). It deliberately avoids
``BertTokenizerFast(vocab_file=...)``, which transformers 5 silently ignores
(every word becomes ``[UNK]``).

A ``tokenizer.json`` saved by other tools often has padding and truncation switched on
(sentence-transformers and many exports pad every text to 128 ids). vlpt tokenizes each caption
on its own, without either: captions are never padded here (the collator pads a batch) and never
cut (longer ones are dropped, as UNITER does), so both settings are switched off when a file is
read and :meth:`TextTokenizer.note` says so.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class TextTokenizer:
    """A WordPiece tokenizer that adds ``[CLS] … [SEP]`` itself and reports word ids."""

    def __init__(self, tokenizer, source: str = ""):
        #: what the file asked for and vlpt switched off (see the module docstring)
        self.saved_padding, self.saved_truncation = tokenizer.padding, tokenizer.truncation
        if tokenizer.padding is not None:
            tokenizer.no_padding()
        if tokenizer.truncation is not None:
            tokenizer.no_truncation()
        self.tok = tokenizer
        self.source = source
        ids = {s: tokenizer.token_to_id(s) for s in SPECIALS}
        missing = [s for s, i in ids.items() if i is None]
        if missing:
            raise UserError(f"tokenizer '{source}' lacks the special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[s] for s in SPECIALS)
        self.special_ids = frozenset(ids.values())
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_path(cls, path: str | Path) -> "TextTokenizer":
        from tokenizers import Tokenizer

        p = Path(path).expanduser()
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                p = p / "tokenizer.json"
            elif (p / "vocab.txt").is_file():
                from tokenizers.implementations import BertWordPieceTokenizer

                lower = True
                cfg = p / "tokenizer_config.json"
                if cfg.is_file():
                    lower = bool(json.loads(cfg.read_text()).get("do_lower_case", True))
                return cls(BertWordPieceTokenizer(str(p / "vocab.txt"), lowercase=lower)._tokenizer, str(path))
            else:
                raise UserError(f"tokenizer folder '{path}' has neither tokenizer.json nor vocab.txt")
        if not p.is_file():
            raise UserError(f"tokenizer '{path}' not found")
        try:
            return cls(Tokenizer.from_file(str(p)), str(path))
        except Exception as e:
            raise UserError(f"tokenizer '{path}' could not be read: {e}") from None

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """``[CLS] pieces [SEP]`` ids and, per id, the caption word it came from (-1 for specials)."""
        enc = self.tok.encode(text, add_special_tokens=False)
        words = [-1 if w is None else w for w in enc.word_ids]
        return [self.cls_id, *enc.ids, self.sep_id], [-1, *words, -1]

    def note(self, max_text_len: int) -> str | None:
        """One line about the file's own padding/truncation, which vlpt does not apply (None if none)."""
        parts = []
        if self.saved_padding:
            length = self.saved_padding.get("length")
            parts.append(f"pads every text{f' to {length} ids' if length else ''}")
        if self.saved_truncation:
            parts.append(f"truncates at {self.saved_truncation.get('max_length')} ids")
        if not parts:
            return None
        return (f"tokenizer '{self.source}' {' and '.join(parts)}; vlpt tokenizes each caption without padding "
                f"or truncation and drops captions longer than data.max_text_len ({max_text_len} ids)")

    def save(self, path: str | Path) -> None:
        """``tokenizer.json`` as vlpt uses it (no padding, no truncation)."""
        self.tok.save(str(path))

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` so ``AutoTokenizer`` loads the folder."""
        out = Path(out_dir)
        self.save(out / "tokenizer.json")
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
            "cls_token": "[CLS]", "mask_token": "[MASK]",
        }
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    # picklable, so data-loader workers started with "spawn" (macOS, Windows) get a copy
    def __getstate__(self):
        return {"json": self.tok.to_str(), "source": self.source}

    def __setstate__(self, state):
        from tokenizers import Tokenizer

        self.__init__(Tokenizer.from_str(state["json"]), state["source"])
