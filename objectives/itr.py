"""Image-text retrieval finetuning with hard negatives (UNITER's ``train_itm_hard_negatives.py``).

A rank head scores a (caption, image) pair from its pooled ``[CLS]`` state. Training follows
UNITER's hard-negative recipe, with the batch as the candidate pool: every caption is scored
against every image of the batch (and every image against every caption) with the model in eval
mode and no gradient; for each caption the ``hard_negatives`` best-scored images of *other*
pictures are kept (and the same for each image), and the triplet loss

    max(0, margin + sigmoid(s_negative) - sigmoid(s_positive))

is trained on the positive and its hard negatives, both ways. Negatives never come from the
positive's own picture: a COCO image has five captions, and another caption of the same image
is no negative. A sample's picture is its ``json`` ``image_id`` (or its key when it has none).

UNITER draws 399 random candidates per positive from the whole data set and keeps 31; here the
candidates are the batch's (B - 1), so the batch size sets how hard the negatives get.

Started from a vlpt run that trained ITM, the rank head starts as UNITER's does (its
``init_output``): the ITM head's matched-class row and bias (``init_from_itm``, default on).

Evaluation reports ``itr_t2i_r{1,5,10}`` (each held-out caption ranks every held-out picture)
and ``itr_i2t_r{1,5,10}`` (each picture ranks every caption; a hit when any of its captions is
within the top k), over the whole held-out set (``eval.samples`` captions).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vlpt import EncoderOutput, Objective, ObjectiveOutput, register_objective
from vlpt.batch import BATCH_IMAGE_FIELDS, BATCH_TEXT_FIELDS, META, swap_image
from vlpt.eval import recall_at_any


def picture_id(sample: dict) -> int:
    """A stable integer for the sample's picture: its ``image_id``, else its key."""
    meta = sample.get(META) or {}
    return zlib.crc32(str(meta.get("image_id", sample.get("key", ""))).encode())


def pair_batch(batch: dict, captions: torch.Tensor, images: torch.Tensor) -> dict:
    """The batch's captions ``captions`` paired with its images ``images`` (both (N,) indices)."""
    out = {k: v for k, v in batch.items() if not torch.is_tensor(v)}  # flags
    out.update({k: batch[k][captions] for k in BATCH_TEXT_FIELDS if torch.is_tensor(batch.get(k))})
    out.update({k: batch[k][images] for k in BATCH_IMAGE_FIELDS if torch.is_tensor(batch.get(k))})
    return out


@register_objective("itr")
class ImageTextRetrieval(Objective):
    needs = {"text", "image"}
    needs_matched_pairs = True

    @dataclass
    class Options:
        margin: float = 0.2  # of the triplet loss (UNITER: 0.2)
        hard_negatives: int = 31  # kept per positive, each way (UNITER: 31 of 399 candidates)
        init_from_itm: bool = True  # from a run with ITM: the rank head starts as its matched row (UNITER)

    def __init__(self, options: Options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        # UNITER's rank head has a bias, copied from its ITM head's; without that start (init_from_itm:
        # false) none: an offset shared by every pair changes no ranking
        self.rank = nn.Linear(model.config.hidden_size, 1, bias=self.options.init_from_itm)
        nn.init.normal_(self.rank.weight, std=0.02)
        if self.rank.bias is not None:
            nn.init.zeros_(self.rank.bias)

    def init_from_pretrained(self, weights):
        w, b = weights.get("objectives.itm.head.weight"), weights.get("objectives.itm.head.bias")
        if not self.options.init_from_itm or w is None or b is None or tuple(w.shape) != (2, self.rank.in_features):
            return None
        with torch.no_grad():
            self.rank.weight.copy_(w[1:])
            self.rank.bias.copy_(b[1:])
        return "rank head from the pretrained ITM head's matched row (UNITER's init_output)"

    def prepare(self, sample, rng, pool=None):
        sample["itr_picture"] = picture_id(sample)
        return sample

    def score(self, model, batch: dict, captions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self.rank(model(pair_batch(batch, captions, images)).pooled).squeeze(-1).float()  # (N,)

    @torch.no_grad()
    def _hard(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """For each caption the hardest images of other pictures, and for each image the hardest
        captions, (B, k) each, scored in eval mode (UNITER scores its candidates the same way)."""
        B = batch["input_ids"].shape[0]
        was = model.training
        model.eval()
        rows = torch.arange(B, device=batch["input_ids"].device)
        scores = self.score(model, batch, rows.repeat_interleave(B), rows.repeat(B)).view(B, B)  # [caption, image]
        model.train(was)
        same = batch["itr_picture"][:, None] == batch["itr_picture"][None, :]  # (B, B): never a negative
        scores = scores.masked_fill(same, -torch.inf)
        k = min(self.options.hard_negatives, int((~same).sum(1).min()))
        return scores.topk(k, dim=1).indices, scores.t().topk(k, dim=1).indices

    def forward(self, out: EncoderOutput, batch) -> ObjectiveOutput:
        model, B = out.model, out.pooled.shape[0]
        positive = torch.sigmoid(self.rank(out.pooled).squeeze(-1).float())  # (B,)
        image_neg, caption_neg = self._hard(model, batch)  # (B, k) each
        k = image_neg.shape[1]
        if k == 0:  # every sample of the batch shows the same picture: nothing to rank against
            return ObjectiveOutput(positive.sum() * 0, {})
        rows = torch.arange(B, device=positive.device).repeat_interleave(k)
        neg_i = torch.sigmoid(self.score(model, batch, rows, image_neg.reshape(-1))).view(B, k)
        neg_t = torch.sigmoid(self.score(model, batch, caption_neg.reshape(-1), rows)).view(B, k)
        m = self.options.margin
        loss = (torch.clamp(m + neg_i - positive[:, None], min=0).mean()
                + torch.clamp(m + neg_t - positive[:, None], min=0).mean())
        acc = ((positive[:, None] > neg_i).float().mean() + (positive[:, None] > neg_t).float().mean()) / 2
        return ObjectiveOutput(loss, {"acc": acc.detach()})

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, data) -> dict[str, float]:
        samples = [s for s in data.samples if "features" in s or "image" in s]
        pictures = [picture_id(s) for s in samples]
        first = {p: i for i, p in reversed(list(enumerate(pictures)))}  # one sample per picture shows it
        images = sorted(first.values())
        if len(images) < 2:
            return {}
        views = [swap_image(samples[c], samples[i]) for c in range(len(samples)) for i in images]
        scores = []
        for batch in data.batches(views):
            scores.append(self.rank(data.encode(model, batch).pooled).squeeze(-1).float().cpu().numpy())
        scores = np.concatenate(scores).reshape(len(samples), len(images))  # [caption, picture]
        positive = np.array(pictures)[:, None] == np.array([pictures[i] for i in images])[None, :]
        metrics = {}
        for k in (1, 5, 10):
            metrics[f"itr_t2i_r{k}"] = recall_at_any(scores, positive, k)
            metrics[f"itr_i2t_r{k}"] = recall_at_any(scores.T, positive.T, k)
        return metrics
