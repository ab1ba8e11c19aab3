"""Image-text matching (UNITER's ITM).

For each caption, with p = 0.5 the image is replaced by another sample's image
(the released UNITER code swaps only the image); a 2-way classifier on the
pooled ``[CLS]`` state tells matched from mismatched pairs (softmax
cross-entropy, as UNITER's code does).

Negatives come from a pool of other samples of the same worker's stream (with a token budget, the
whole current bucket in shuffle order, so not length-matched neighbours; with a fixed batch size,
the 64 most recent samples) and
never pair a caption with its own image, nor with another caption's copy of
it (COCO has five captions per image): a pool sample is rejected when it shows
the same picture (:func:`same_image`: the same ``image_id``, ``img_fname`` or
``image`` in the metadata, else identical region features or pixels), as
UNITER's sampler rejects by image file name. They are re-drawn on every pass.

``negatives: hard`` (ALBEF) draws them inside the batch instead, where the model
finds them hardest: ``prepare`` keeps every pair matched, and ``forward`` pairs each
caption with another image of the batch drawn with probability ∝ softmax of their
ITC similarity (its own image excluded), and each image with another caption the
same way, then runs the trunk on those 2B negatives: B positives, 2B negatives.
The similarities come from an objective before ``itm`` in the same task that
provides ``itc_similarity`` (``{itc: 1.0, itm: {negatives: hard}}``): one set of
unimodal passes serves both, and the negatives get harder as ITC learns. (Computing its own unimodal embeddings would
need projections trained by a contrastive loss: that is ``itc``.) A batch has no
identity beyond the sample, so two captions of one image count as negatives, as in
ALBEF. ``itm`` leaves the labels of the batch's pairs (``itm_label``, 1 = matched) for
the objectives after it, e.g. ``wra``; with hard negatives every pair of the batch is matched.

Evaluation reports ``itm_acc`` on balanced positives/negatives and zero-shot
retrieval: each of ``eval.retrieval_candidates`` captions ranks as many images
by the matched-class probability (``retrieval_t2i_r1/5/10``) and vice versa
(``retrieval_i2t_r*``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlpt.batch import BATCH_IMAGE_FIELDS, BATCH_TEXT_FIELDS, FLAGS, META, swap_image
from vlpt.eval import recall_at
from vlpt import EncoderOutput, Objective, ObjectiveOutput, register_objective
from vlpt.model.heads import init_linear


def hard_negatives(similarity: torch.Tensor, generator: torch.Generator | None = None):
    """ALBEF's in-batch hard negatives from a (B, B) caption × image similarity (B >= 2).

    Returns ``(image_for_caption, caption_for_image)``, each (B,): for caption i an image
    j != i drawn with probability ∝ softmax(similarity[i]), and for image j a caption the
    same way. The positive's weight is zeroed, so it is never drawn; the small floor
    keeps every other candidate possible when the softmax underflows.
    """
    def draw(sim: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(sim.float(), dim=1) + 1e-5  # (B, B)
        weights.fill_diagonal_(0)  # never the positive
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)

    return draw(similarity), draw(similarity.t())


#: metadata keys that name a sample's picture (COCO / VQA ids, UNITER's feature files, caption files)
IMAGE_ID_KEYS = ("image_id", "img_fname", "image")


def _image_name(sample: dict):
    meta = sample.get(META)
    if isinstance(meta, dict):
        return next(((k, meta[k]) for k in IMAGE_ID_KEYS if meta.get(k) is not None), None)
    return None


def same_image(a: dict, b: dict) -> bool:
    """Whether two clean samples show the same picture: by the name their metadata gives it when
    both have one, else by identical region features (or pixels)."""
    if a.get("key") is not None and a.get("key") == b.get("key"):
        return True
    name_a, name_b = _image_name(a), _image_name(b)
    if name_a is not None and name_b is not None:
        return name_a == name_b
    for field in ("features", "image"):
        x, y = a.get(field), b.get(field)
        if x is not None and y is not None:
            return x is y or (np.shape(x) == np.shape(y) and np.array_equal(x, y))
    return False


def negative_pairs(batch: dict, image_for_caption: torch.Tensor, caption_for_image: torch.Tensor) -> dict:
    """A batch of 2B mismatched pairs: every caption with its negative image, then every
    image with its negative caption."""
    neg = {k: batch[k] for k in FLAGS if k in batch}  # flags such as zero_region_features (not per-sample lists)
    for k in BATCH_TEXT_FIELDS:
        if torch.is_tensor(batch.get(k)):
            neg[k] = torch.cat([batch[k], batch[k][caption_for_image]])
    for k in BATCH_IMAGE_FIELDS:
        if torch.is_tensor(batch.get(k)):
            neg[k] = torch.cat([batch[k][image_for_caption], batch[k]])
    return neg


@register_objective("itm")
class ImageTextMatching(Objective):
    needs = {"text", "image"}
    wants_pool = True
    provides = ("itm_label",)  # (B,) 1 where the batch pairs a caption with its own image

    @dataclass
    class Options:
        neg_prob: float = 0.5  # chance a caption is paired with another sample's image (random negatives)
        negatives: Literal["random", "hard"] = "random"  # hard: in-batch, by ITC similarity (needs itc first)

    def __init__(self, options: Options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        self.head = nn.Linear(model.config.hidden_size, 2)
        init_linear(self.head)

    @classmethod
    def used(cls, options):
        return ("itc_similarity",) if options.negatives == "hard" else ()

    @classmethod
    def check_task(cls, options, task):
        if not 0.0 <= options.neg_prob <= 1.0:
            return f"neg_prob is a probability (0 to 1), got {options.neg_prob}"
        return None

    @classmethod
    def swaps_images(cls, options):
        return options.negatives == "random" and options.neg_prob > 0

    def prepare(self, sample, rng, pool=None):
        label = 1
        if self.options.negatives == "random" and pool and rng.random() < self.options.neg_prob:
            for _ in range(8):  # a pool sample with another picture; give up (keep positive) if none
                other = pool[rng.integers(len(pool))]
                if not same_image(other, sample):
                    sample, label = swap_image(sample, other), 0
                    break
        sample["itm_label"] = label
        return sample

    def forward(self, out: EncoderOutput, batch) -> ObjectiveOutput:
        if self.options.negatives == "hard":
            return self.forward_hard(out, batch)
        logits = self.head(out.pooled)  # (B, 2)
        target = batch["itm_label"]
        out.shared["itm_label"] = target
        loss = F.cross_entropy(logits.float(), target)
        acc = (logits.argmax(-1) == target).float().mean()
        return ObjectiveOutput(loss, {"acc": acc.detach()})

    def forward_hard(self, out: EncoderOutput, batch) -> ObjectiveOutput:
        similarity = out.shared["itc_similarity"]  # (B, B), from itc earlier in this task
        out.shared["itm_label"] = batch["itm_label"]  # the batch's own pairs: all matched
        pooled = out.pooled  # (B, H): the batch's matched pairs
        B = pooled.shape[0]
        if B >= 2:
            neg = negative_pairs(batch, *hard_negatives(similarity))
            pooled = torch.cat([pooled, out.model(neg).pooled])  # (3B, H)
        logits = self.head(pooled)  # (3B, 2)
        target = torch.zeros(pooled.shape[0], dtype=torch.long, device=pooled.device)
        target[:B] = 1
        loss = F.cross_entropy(logits.float(), target)
        acc = (logits.argmax(-1) == target).float().mean()
        return ObjectiveOutput(loss, {"acc": acc.detach()})

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def _match_prob(self, model, data, views) -> np.ndarray:
        probs = []
        for batch in data.batches(views):
            out = data.encode(model, batch)
            probs.append(self.head(out.pooled).float().softmax(-1)[:, 1].cpu().numpy())
        return np.concatenate(probs) if probs else np.zeros(0)

    def evaluate(self, model, data) -> dict[str, float]:
        samples = data.samples
        rng = np.random.default_rng(0)
        n = len(samples)
        metrics: dict[str, float] = {}
        if n >= 2:
            negatives = [(i + 1 + int(rng.integers(n - 1))) % n for i in range(n)]  # never i itself
            views = [dict(s) for s in samples] + [swap_image(samples[i], samples[j]) for i, j in enumerate(negatives)]
            p = self._match_prob(model, data, views)
            metrics["itm_acc"] = float(((p[:n] > 0.5).mean() + (p[n:] <= 0.5).mean()) / 2)
        c = min(data.retrieval_candidates, n)
        if c >= 2:
            pairs = [swap_image(samples[t], samples[v]) for t in range(c) for v in range(c)]
            scores = self._match_prob(model, data, pairs).reshape(c, c)  # [caption, image]
            for name, s in (("t2i", scores), ("i2t", scores.T)):
                for k in (1, 5, 10):  # where the true partner (the diagonal) ranks among all candidates
                    metrics[f"retrieval_{name}_r{k}"] = recall_at(s, k)
        return metrics
