"""Masked region feature regression (UNITER's MRFR), conditional: the caption stays intact.

Each region is masked with p = 0.15 (at least one per image): its feature is
zeroed on the data side and the region embedder adds the learned mask vector.
Boxes are kept (UNITER does not mask locations) and there is no 80/10/10.
The model regresses the original feature of every masked region from the rest of
the image and the caption; MSE, mean over all masked elements of the batch.

The head is UNITER's: dense, GELU, LayerNorm, then a linear map back to the
feature space whose weight is the region projection W_f transposed (``tied``);
``tied: false`` gives it a weight of its own. Its Linears start as UNITER's do,
N(0, 0.02) with zero bias; its LayerNorm gain takes weight decay, as in UNITER
(whose no-decay rule is by name, and this LayerNorm is not named so there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlpt import EncoderOutput, Objective, ObjectiveOutput, register_objective
from vlpt.data.masking import mask_sample_regions
from vlpt.model.heads import init_linear, prediction_transform
from vlpt.model.packing import list_masked_regions, masked_region_rows


@register_objective("mrfr")
class MaskedRegionFeatureRegression(Objective):
    needs = {"text", "image"}
    pad_values = {"region_masked": False}
    decay_also = ("transform.2.weight",)  # UNITER decays this LayerNorm gain (see vlpt.train.optim)

    @dataclass
    class Options:
        prob: float = 0.15  # chance a region is masked
        tied: bool = True  # output weight = region projection W_f transposed (UNITER)

    def __init__(self, options: Options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        H, D = model.config.hidden_size, model.feature_dim
        self.transform = prediction_transform(H)
        self.bias = nn.Parameter(torch.zeros(D))
        self.out = None if options.tied else nn.Linear(H, D, bias=False)
        init_linear(self.transform[0], *([] if options.tied else [self.out]))

    def prepare(self, sample, rng, pool=None):
        return list_masked_regions(mask_sample_regions(sample, rng, self.options.prob))

    def predict(self, hidden: torch.Tensor, model) -> torch.Tensor:  # (n, H) -> (n, D)
        h = self.transform(hidden)
        weight = model.region_embedder.feature_proj.weight.t() if self.out is None else self.out.weight  # (D, H)
        return F.linear(h, weight, self.bias)

    def forward(self, out: EncoderOutput, batch) -> ObjectiveOutput:
        hidden, at = masked_region_rows(out, batch)  # (n, H), (n,) into (B·K)
        pred = self.predict(hidden, out.model)  # (n, D)
        targets = batch["region_targets"]  # (B, K, D)
        target = targets.reshape(-1, targets.shape[-1]).index_select(0, at)  # (n, D)
        loss = F.mse_loss(pred.float(), target.float())
        return ObjectiveOutput(loss, {"mse": loss.detach()})

    @torch.no_grad()
    def evaluate(self, model, data) -> dict[str, float]:
        import numpy as np

        rng = np.random.default_rng(0)
        views = [self.prepare(dict(s), rng) for s in data.samples if "features" in s]
        total = count = 0.0
        for batch in data.batches(views):
            out = data.encode(model, batch)
            masked = batch["region_masked"]
            err = (self.predict(out.regions[masked], model).float() - batch["region_targets"][masked]) ** 2
            total += float(err.sum())
            count += err.numel()
        return {"mrfr_mse": total / max(count, 1)}
