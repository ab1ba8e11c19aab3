"""NLVR2: is a statement true of a pair of images? (UNITER's "paired" NLVR2 finetuning.)

Each sample holds one statement and two images. The statement is read with each image as its own
sequence — the task's trunk pass with the first (left) image, one more pass with the second
(right) one — and the two pooled ``[CLS]`` states are joined, left then right, into a binary
classifier (true / false), as UNITER's ``UniterForNlvr2Paired`` does. (UNITER's paired model
can also give the second image a third token type; vlpt's regions share one type embedding.)

Data (``tools/nlvr2_to_shards.py`` or the shapes suite): the statement as the caption, the left
image as usual (``regions.npz``), the right one under the prefix ``2.`` (``2.regions.npz``: the
sample's ``features2``, ``boxes2``), and ``label`` (true / false) in its ``json``.

Evaluation reports ``nlvr2_acc`` and ``nlvr2_acc_blind`` (both images' region features zeroed).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlpt import EncoderOutput, Objective, ObjectiveOutput, UserError, register_objective
from vlpt.batch import META, second_image


def truth(label) -> int:
    """1 for a true statement, 0 for a false one (NLVR2 writes "True"/"False")."""
    if isinstance(label, bool) or label in (0, 1):
        return int(label)
    if isinstance(label, str) and label.lower() in ("true", "false"):
        return int(label.lower() == "true")
    raise UserError(f"nlvr2: label {label!r} is neither true nor false")


@register_objective("nlvr2")
class Nlvr2Paired(Objective):
    needs = {"text", "image"}
    sample_fields = ("meta.label", "features2|image2")

    @dataclass
    class Options:
        """No options: UNITER's paired set-up."""

    def __init__(self, options: Options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        H = model.config.hidden_size
        self.head = nn.Linear(2 * H, 2)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def prepare(self, sample, rng, pool=None):
        sample["nlvr2_label"] = truth(sample[META]["label"])
        return sample

    def logits(self, out: EncoderOutput, batch) -> torch.Tensor:
        """(B, 2) from the statement with its left image (``out``) and with its right image."""
        right = out.model(second_image(batch)).pooled  # (B, H)
        return self.head(torch.cat([out.pooled, right], dim=-1)).float()

    def forward(self, out: EncoderOutput, batch) -> ObjectiveOutput:
        logits = self.logits(out, batch)
        target = batch["nlvr2_label"]
        loss = F.cross_entropy(logits, target)
        return ObjectiveOutput(loss, {"acc": (logits.argmax(-1) == target).float().mean().detach()})

    @torch.no_grad()
    def evaluate(self, model, data) -> dict[str, float]:
        rng = np.random.default_rng(0)
        views = [self.prepare(dict(s), rng) for s in data.samples
                 if "label" in (s.get(META) or {}) and ("features2" in s or "image2" in s)]
        if not views:
            return {}

        def accuracy(batch):
            with data.autocast():
                pred = self.logits(data.encode(model, batch), batch).argmax(-1)
            return (pred == batch["nlvr2_label"]).sum(), len(pred)

        return {"nlvr2_acc": data.mean_score(views, accuracy),
                "nlvr2_acc_blind": data.mean_score(views, accuracy, blind=True)}
