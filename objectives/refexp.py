"""Referring expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg, UNITER's RE finetuning).

An expression ("the man on the left in a red shirt") picks one region of the image. Each region's
final state is scored by a small head; a softmax over the image's regions (padding excluded) is
trained with cross-entropy towards the referred region, as UNITER's ``loss: cls`` does (its loss is
the sum over the batch, vlpt's the mean: recipes/finetune/refcoco.yaml divides clip and eps by the
batch size to match), with its two-layer head (``mlp: 2``, its RefCOCO+ config: dense, GELU,
LayerNorm, one score) or one dense layer (``mlp: 1``, its RefCOCO and RefCOCOg configs).

Data (``tools/refcoco_to_shards.py`` or the shapes suite): the expression as the caption, the
image's regions, and in the sample's ``json`` the referred region's row (``target_region``) or
its box (``target_box``, normalized x1, y1, x2, y2): the target is then the region that overlaps
the box most (IoU).

Evaluation reports ``refexp_acc`` (the top-scored region is the target), ``refexp_iou50`` when
samples carry a box (the top region's box overlaps the gold box with IoU > 0.5, RefCOCO's usual
metric on detected regions), and ``refexp_acc_blind`` (every region feature zeroed: only boxes
and the expression remain).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlpt import EncoderOutput, Objective, ObjectiveOutput, register_objective
from vlpt.batch import META
from vlpt.model.heads import init_linear, mlp_head


def box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """(K,) IoU of each of ``boxes`` (K, 4) with ``box`` (4,), all x1, y1, x2, y2."""
    x1, y1 = np.maximum(boxes[:, 0], box[0]), np.maximum(boxes[:, 1], box[1])
    x2, y2 = np.minimum(boxes[:, 2], box[2]), np.minimum(boxes[:, 3], box[3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return inter / np.maximum(union, 1e-12)


@register_objective("refexp")
class ReferringExpression(Objective):
    needs = {"text", "image"}
    needs_all_states = True  # every region is scored
    sample_fields = ("meta.target_region|meta.target_box",)

    @dataclass
    class Options:
        mlp: int = 2  # the region head: 2 (dense, GELU, LayerNorm, score; UNITER's RefCOCO+) or 1 (one dense layer)

    @classmethod
    def check_task(cls, options, task):
        return None if options.mlp in (1, 2) else f"mlp is 1 or 2 (layers of the region head), got {options.mlp}"

    def __init__(self, options: Options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        H = model.config.hidden_size
        if options.mlp == 2:
            self.head = mlp_head(H, 1, width=H)
        else:
            self.head = nn.Linear(H, 1)
            init_linear(self.head)

    def prepare(self, sample, rng, pool=None):
        meta = sample[META]
        box = np.asarray(meta.get("target_box", [np.nan] * 4), dtype=np.float32)
        if meta.get("target_region") is not None:
            target = int(meta["target_region"])
        else:
            target = int(box_iou(sample["boxes"], box).argmax())
        if not 0 <= target < len(sample["boxes"]):  # e.g. regions cut by data.max_regions
            target = int(box_iou(sample["boxes"], box).argmax()) if np.isfinite(box).all() else 0
        sample["refexp_target"] = target
        sample["refexp_box"] = box
        return sample

    def scores(self, out: EncoderOutput, batch) -> torch.Tensor:
        """(B, K) one score per region; padding at -1e4 (never picked, no softmax weight)."""
        scores = self.head(out.regions).squeeze(-1).float()
        mask = batch.get("region_mask")
        return scores if mask is None else scores.masked_fill(~mask, -1e4)

    def forward(self, out: EncoderOutput, batch) -> ObjectiveOutput:
        scores = self.scores(out, batch)
        target = batch["refexp_target"]
        loss = F.cross_entropy(scores, target)
        return ObjectiveOutput(loss, {"acc": (scores.argmax(-1) == target).float().mean().detach()})

    @torch.no_grad()
    def evaluate(self, model, data) -> dict[str, float]:
        rng = np.random.default_rng(0)
        views = [self.prepare(dict(s), rng) for s in data.samples
                 if "boxes" in s and any(k in (s.get(META) or {}) for k in ("target_region", "target_box"))]
        if not views:
            return {}

        def accuracy(batch):
            pred = self.scores(data.encode(model, batch), batch).argmax(-1)
            return (pred == batch["refexp_target"]).sum(), len(pred)

        def iou50(batch):
            pred = self.scores(data.encode(model, batch), batch).argmax(-1).cpu().numpy()
            boxes, gold = batch["boxes"].cpu().numpy(), batch["refexp_box"].cpu().numpy()
            has = np.isfinite(gold).all(1)
            hits = [box_iou(boxes[i, p][None], gold[i])[0] > 0.5 for i, p in enumerate(pred) if has[i]]
            return sum(hits), len(hits)

        metrics = {"refexp_acc": data.mean_score(views, accuracy),
                   "refexp_acc_blind": data.mean_score(views, accuracy, blind=True)}
        if any(np.isfinite(v["refexp_box"]).all() for v in views):
            metrics["refexp_iou50"] = data.mean_score(views, iou50)
        return metrics
