"""Image-text contrastive learning over unimodal passes of the shared trunk (CLIP / ALBEF's ITC).

The trunk reads each caption alone (``[CLS] words [SEP]``, no regions) and each
image alone (its regions, no words). A caption is embedded by the mean of its token
states (``text_pool: cls`` takes the pooled ``[CLS]`` instead, as ALBEF does), an
image by the mean of its region states (a region-only pass has no ``[CLS]``). Mean
pooling is the default because a trunk trained from scratch gives nearly the same
``[CLS]`` state to every caption at first: on the shapes data (hidden 128, 2 layers,
batch 32) ITC accuracy at update 40 was 0.86 with the mean and 0.27 with ``[CLS]``,
retrieval R@1 after 200 updates 0.92 vs 0.81.

Two linear projections map both to a small space (``embed_dim``), normalized; the
similarity of caption i and image j is ``cos(t_i, v_j) / τ`` with a learnable
temperature τ (initial 0.07, kept within ``[min_temperature, max_temperature]`` as
CLIP and ALBEF clamp it). The loss is the symmetric InfoNCE: each caption picks its
own image among all images of the batch, and each image its own caption.

**Across ranks** the negatives are every rank's batch: embeddings are gathered with
``torch.distributed.nn.functional.all_gather``, which passes gradients back to the
rank that computed them (a plain ``all_gather`` would cut them), so each rank's
loss is over its own captions against all images (and vice versa) and DDP's
gradient average equals the gradient of the loss over the global batch.

**Why unimodal passes**: in the joint pass every caption already sees its image,
so a similarity read from it could not rank other images cheaply. Two extra trunk
passes (text only, regions only) give embeddings whose dot products score all
B × B pairs at once. The task's joint pass still runs (the core always encodes the
task's batch); ``itc`` does not use it, so a task with ``itc`` alone costs one
forward pass more than it needs.

**Batches must hold matched pairs** (``needs_matched_pairs``). Put ``itc`` in a task of its
own or next to ``itm: {negatives: hard}``, which draws its negatives inside the batch from the
similarities cos / τ that ``itc`` leaves for it (``provides = ("itc_similarity",)``); ``itm``
with its default random negatives swaps images in ``prepare``, and recipe validation refuses
the pair. Masking objectives
in the same task would mask the text ``itc`` reads: keep them in other tasks
(``mixing: sum`` runs every task every update, as ALBEF sums ITC, ITM and MLM).

Evaluation reports ``itc_t2i_r{1,5,10}`` and ``itc_i2t_r{1,5,10}``: zero-shot
retrieval among ``eval.retrieval_candidates`` by ITC similarity (one unimodal pass
per caption and per image, much cheaper than ITM's pass per pair).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlpt.batch import image_part, text_part
from vlpt.eval import recall_at
from vlpt import EncoderOutput, Objective, ObjectiveOutput, UserError, register_objective


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` (B, d) concatenated over all ranks, and where this rank's rows start in it.

    Uses ``torch.distributed.nn.functional.all_gather``, whose backward sends each
    rank the gradient of its own rows: a plain ``all_gather`` would cut it. Ranks may
    hold different B (token-budget batches), so sizes are exchanged first and the
    rows padded to the largest. One process (or no process group): ``(x, 0)``.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x, 0
    return all_gather_rows(x)


def all_gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The gather itself (any world size): sizes first, then the padded, differentiable all_gather."""
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    with warnings.catch_warnings():  # torch 2.14 marks it deprecated in favour of a private module
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(F.pad(x, (0, 0, 0, max(sizes) - x.shape[0])))  # world × (max B, d)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[: dist.get_rank()])


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, scale: torch.Tensor, gather=gather_with_grad):
    """Symmetric InfoNCE. ``text``, ``image``: (B, d) normalized, row i of each a matched pair.

    Returns the loss (this rank's mean), this rank's (B, B) caption × image
    similarities (unscaled, detached) and the accuracy of picking the partner, both ways.
    """
    all_text, offset = gather(text)  # (N, d): every rank's captions
    all_image, _ = gather(image)  # (N, d): every rank's images
    target = torch.arange(text.shape[0], device=text.device) + offset  # where my partners sit among the N
    logits_t2i = scale * text @ all_image.t()  # (B, N): my captions against every image
    logits_i2t = scale * image @ all_text.t()  # (B, N): my images against every caption
    loss = (F.cross_entropy(logits_t2i.float(), target) + F.cross_entropy(logits_i2t.float(), target)) / 2
    acc = ((logits_t2i.argmax(-1) == target).float().mean() + (logits_i2t.argmax(-1) == target).float().mean())
    acc = acc / 2
    return loss, (text @ image.t()).detach(), acc


@register_objective("itc")
class ImageTextContrastive(Objective):
    needs = {"text", "image"}
    needs_matched_pairs = True
    provides = ("itc_similarity",)  # (B, B) caption × image, cos / τ: itm's hard negatives draw from it

    @dataclass
    class Options:
        embed_dim: int = 256  # projection size (ALBEF: 256)
        temperature: float = 0.07  # initial τ (CLIP, ALBEF)
        min_temperature: float = 0.01  # CLIP caps the logit scale at 100
        max_temperature: float = 0.5  # ALBEF's upper clamp
        learn_temperature: bool = True
        text_pool: Literal["mean", "cls"] = "mean"  # a caption's embedding: mean of token states, or pooled [CLS]

    def __init__(self, options: Options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        o = options
        if not 0 < o.min_temperature <= o.temperature <= o.max_temperature:
            raise UserError(f"itc: need 0 < min_temperature <= temperature <= max_temperature, got "
                            f"{o.min_temperature}, {o.temperature}, {o.max_temperature}")
        H = model.config.hidden_size
        self.text_proj = nn.Linear(H, o.embed_dim)
        self.image_proj = nn.Linear(H, o.embed_dim)
        for proj in (self.text_proj, self.image_proj):
            nn.init.normal_(proj.weight, std=0.02)
            nn.init.zeros_(proj.bias)
        # log(1/τ), as CLIP parametrizes it: steps in log space suit a scale that spans 2-100
        log_scale = torch.tensor(math.log(1 / o.temperature))
        self.logit_scale = nn.Parameter(log_scale, requires_grad=o.learn_temperature)

    @property
    def temperature(self) -> float:
        return float(1 / self.logit_scale.detach().exp())

    def clamp_temperature(self) -> None:
        """Keep τ within its bounds (ALBEF clamps the parameter in place before each use)."""
        o = self.options
        with torch.no_grad():
            self.logit_scale.clamp_(math.log(1 / o.max_temperature), math.log(1 / o.min_temperature))

    def embed(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized caption and image embeddings, (B, d) each, from two unimodal trunk passes."""
        if self.options.text_pool == "cls":
            text = model(text_part(batch)).pooled  # (B, H): the caption's pooled [CLS]
        else:
            words = model(text_part(batch)).text  # (B, T, H)
            m = batch["text_mask"].unsqueeze(-1).to(words.dtype)  # (B, T, 1)
            text = (words * m).sum(1) / m.sum(1).clamp_min(1)  # (B, H): mean over the caption's tokens
        regions = model(image_part(batch)).regions  # (B, K, H)
        mask = batch.get("region_mask")  # (B, K); absent with an image backbone (every grid cell is real)
        if mask is None:
            image = regions.mean(1)  # (B, H)
        else:
            m = mask.unsqueeze(-1).to(regions.dtype)  # (B, K, 1)
            image = (regions * m).sum(1) / m.sum(1).clamp_min(1)  # (B, H): mean over real regions
        text = F.normalize(self.text_proj(text).float(), dim=-1)  # (B, d)
        image = F.normalize(self.image_proj(image).float(), dim=-1)  # (B, d)
        return text, image

    def forward(self, out: EncoderOutput, batch) -> ObjectiveOutput:
        self.clamp_temperature()
        scale = self.logit_scale.exp()  # 1/τ
        text, image = self.embed(out.model, batch)
        loss, similarity, acc = contrastive_loss(text, image, scale)
        out.shared["itc_similarity"] = similarity * scale.detach()  # (B, B) caption × image, for itm after it
        return ObjectiveOutput(loss, {"acc": acc.detach(), "temperature": (1 / scale).detach()})

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, data) -> dict[str, float]:
        c = min(data.retrieval_candidates, len(data.samples))
        if c < 2:
            return {}
        texts, images = [], []
        for batch in data.batches([dict(s) for s in data.samples[:c]]):
            with data.autocast():
                t, v = self.embed(model, batch)
            texts.append(t)
            images.append(v)
        scores = (torch.cat(texts) @ torch.cat(images).t()).float().cpu().numpy()  # (c, c) caption × image
        metrics: dict[str, float] = {}
        for name, s in (("t2i", scores), ("i2t", scores.T)):
            for k in (1, 5, 10):
                metrics[f"itc_{name}_r{k}"] = recall_at(s, k)
        return metrics
