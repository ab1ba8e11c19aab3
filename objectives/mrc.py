"""Masked region classification (UNITER's MRC and MRC-kl), conditional on an intact caption.

Regions are masked as in MRFR (p = 0.15, at least one; features zeroed, mask
vector added, boxes kept). The head (dense, GELU, LayerNorm, Linear to the
detector's classes) predicts, for each masked region:

* ``mrc``: the detector's arg-max class excluding background (class 0); cross-entropy.
* ``mrc_kl``: the detector's whole class distribution; KL(detector ‖ model).

Both need ``soft_labels`` in the data; a recipe that uses them on data without
soft labels fails at recipe validation. The head's Linears start as UNITER's do,
N(0, 0.02) with zero bias; its LayerNorm gain takes weight decay, as in UNITER.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlpt import EncoderOutput, Objective, ObjectiveOutput, register_objective

from vlpt.data.masking import mask_sample_regions
from vlpt.model.heads import init_linear, prediction_transform
from vlpt.model.packing import list_masked_regions, masked_region_rows


class _MaskedRegionClassification(Objective):
    needs = {"text", "image"}
    sample_fields = ("soft_labels",)  # checked on the first sample of every source before training
    pad_values = {"region_masked": False}
    decay_also = ("transform.2.weight",)  # UNITER decays this LayerNorm gain (see vlpt.train.optim)

    @dataclass
    class Options:
        prob: float = 0.15  # chance a region is masked
        num_classes: int = 1601  # the detector's classes incl. background (UNITER: 1601; shapes data: 33)

    def __init__(self, options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        H = model.config.hidden_size
        n = self.num_classes = options.num_classes
        self.transform = prediction_transform(H)
        self.classifier = nn.Linear(H, n)
        init_linear(self.transform[0], self.classifier)

    def prepare(self, sample, rng, pool=None):
        return list_masked_regions(mask_sample_regions(sample, rng, self.options.prob))

    def masked(self, out: EncoderOutput, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the masked regions (n, C) and the detector's distributions there (n, C)."""
        hidden, at = masked_region_rows(out, batch)  # (n, H), (n,) into (B·K)
        soft = batch["soft_labels"]  # (B, K, C)
        return self.logits(hidden), soft.reshape(-1, soft.shape[-1]).index_select(0, at)

    def logits(self, hidden):
        return self.classifier(self.transform(hidden)).float()

    @torch.no_grad()
    def evaluate(self, model, data) -> dict[str, float]:
        rng = np.random.default_rng(0)
        views = [self.prepare(dict(s), rng) for s in data.samples if "soft_labels" in s]
        correct = total = 0
        for batch in data.batches(views):
            out = data.encode(model, batch)
            masked = batch["region_masked"]
            pred = self.logits(out.regions[masked])[:, 1:].argmax(-1)
            target = batch["soft_labels"][masked][:, 1:].argmax(-1)
            correct += int((pred == target).sum())
            total += int(masked.sum())
        acc = correct / max(total, 1)
        # one name for "masked-region class accuracy" whichever loss trained the head
        return {"mrc_acc": acc} if self.name == "mrc" else {f"{self.name}_acc": acc, "mrc_acc": acc}


@register_objective("mrc")
class MaskedRegionClassification(_MaskedRegionClassification):
    def forward(self, out: EncoderOutput, batch) -> ObjectiveOutput:
        logits, soft = self.masked(out, batch)  # (n, C), (n, C)
        target = soft[:, 1:].argmax(-1) + 1  # arg-max excluding background
        loss = F.cross_entropy(logits, target)
        return ObjectiveOutput(loss, {"acc": (logits.argmax(-1) == target).float().mean().detach()})


@register_objective("mrc_kl")
class MaskedRegionClassificationKL(_MaskedRegionClassification):
    @dataclass
    class Options(_MaskedRegionClassification.Options):
        # "elements": mean over regions × classes, as UNITER's code (its task ratios were tuned with it);
        # "regions": sum over classes, mean over regions — the KL itself, num_classes times larger
        reduction: Literal["elements", "regions"] = "elements"

    def forward(self, out: EncoderOutput, batch) -> ObjectiveOutput:
        logits, soft = self.masked(out, batch)  # (n, C), (n, C)
        logp = F.log_softmax(logits, dim=-1)  # (n, C)
        target = soft.float()
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
        kl = F.kl_div(logp, target, reduction="none")  # (n, C)
        loss = kl.mean() if self.options.reduction == "elements" else kl.sum(-1).mean()
        acc = (logp[:, 1:].argmax(-1) == target[:, 1:].argmax(-1)).float().mean()
        return ObjectiveOutput(loss, {"acc": acc.detach()})
