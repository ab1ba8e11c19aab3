"""Masked language modeling, conditioned on the image (UNITER's MLM).

Each word piece is selected with p = 0.15 (at least one per caption); a selected
piece becomes ``[MASK]`` 80% of the time, a random token 10%, itself 10%. The
model predicts the original pieces from the rest of the caption *and* the
regions. Regions are untouched (conditional masking: one modality at a time).

The head is BERT's (dense, GELU, LayerNorm, then a decoder tied to the word
embeddings) and runs only on the masked positions, not on the whole sequence.
``prepare`` lists those positions (``mlm_positions``), so the step picks their
rows without asking the device how many there are.

Evaluation reports ``mlm_acc`` (held-out, standard masking) and, when samples
carry grounding metadata naming word roles (the shapes data: size / color /
shape words), ``attr_<role>_acc``: mask exactly one such word per caption and
predict it; ``attr_<role>_acc_blind`` does the same with every region feature
zeroed, showing how much the prediction relies on the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlpt import EncoderOutput, Objective, ObjectiveOutput, register_objective
from vlpt.batch import META
from vlpt.data.masking import IGNORE, mask_tokens
from vlpt.model.heads import init_linear, prediction_transform
from vlpt.model.packing import select_rows


@register_objective("mlm")
class MaskedLanguageModeling(Objective):
    needs = {"text", "image"}
    pad_values = {"mlm_labels": IGNORE}

    @dataclass
    class Options:
        prob: float = 0.15  # chance a word piece is selected
        mask_frac: float = 0.8  # selected -> [MASK]
        random_frac: float = 0.1  # selected -> random token (the rest stay unchanged)

    def __init__(self, options: Options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        H = model.config.hidden_size
        self.transform = prediction_transform(H)
        self.bias = nn.Parameter(torch.zeros(model.config.vocab_size))
        init_linear(self.transform[0])

    def prepare(self, sample, rng, pool=None):
        o, tok = self.options, self.tokenizer
        sample["input_ids"], sample["mlm_labels"] = mask_tokens(
            sample["input_ids"], rng, tok.mask_id, tok.vocab_size, tok.special_ids, o.prob, o.mask_frac, o.random_frac
        )
        sample["mlm_positions"] = np.flatnonzero(sample["mlm_labels"] != IGNORE).tolist()  # a list: stays on the host
        return sample

    def logits(self, hidden: torch.Tensor, model) -> torch.Tensor:  # (n, H) -> (n, V)
        return F.linear(self.transform(hidden), model.word_embeddings.weight, self.bias)

    def forward(self, out: EncoderOutput, batch) -> ObjectiveOutput:
        labels = batch["mlm_labels"]  # (B, T)
        hidden, at = select_rows(out, batch.get("mlm_positions"), labels != IGNORE)  # (n, H), (n,) into labels (B·T)
        logits = self.logits(hidden, out.model)  # (n, V): masked positions only
        target = labels.reshape(-1).index_select(0, at)  # (n,)
        loss = F.cross_entropy(logits.float(), target)
        acc = (logits.argmax(-1) == target).float().mean()
        return ObjectiveOutput(loss, {"acc": acc.detach()})

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def _accuracy(self, model, data, views, blind: bool = False) -> float:
        correct = total = 0
        for batch in data.batches(views):
            if blind:
                batch["zero_region_features"] = True
            out = data.encode(model, batch)
            labels = batch["mlm_labels"]
            selected = labels != IGNORE
            pred = self.logits(out.text[selected], out.model).argmax(-1)
            correct += int((pred == labels[selected]).sum())
            total += int(selected.sum())
        return correct / max(total, 1)

    def evaluate(self, model, data) -> dict[str, float]:
        rng = np.random.default_rng(0)
        views = [self.prepare(dict(s), rng) for s in data.samples]
        metrics = {"mlm_acc": self._accuracy(model, data, views)}
        roles = sorted({r for s in data.samples for o in _objects(s) for r in o.get("words", {})})
        for role in roles:
            views = [v for v in (self._mask_role(s, role, rng) for s in data.samples) if v is not None]
            if views:
                metrics[f"attr_{role}_acc"] = self._accuracy(model, data, views)
                metrics[f"attr_{role}_acc_blind"] = self._accuracy(model, data, views, blind=True)
        return metrics

    def _mask_role(self, sample: dict, role: str, rng: np.random.Generator) -> dict | None:
        """Mask every piece of one randomly chosen word playing ``role`` (e.g. a color word)."""
        words = [o["words"][role] for o in _objects(sample) if role in o.get("words", {})]
        if not words:
            return None
        word = words[rng.integers(len(words))]
        ids = np.asarray(sample["input_ids"])
        at = np.asarray(sample["word_ids"]) == word
        if not at.any():
            return None
        view = dict(sample)
        view["input_ids"] = np.where(at, self.tokenizer.mask_id, ids)
        view["mlm_labels"] = np.where(at, ids, IGNORE)
        return view


def _objects(sample: dict) -> list[dict]:
    g = sample.get(META) or {}
    return g.get("objects", []) if isinstance(g, dict) else []
