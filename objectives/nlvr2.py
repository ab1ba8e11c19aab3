"""NLVR2: is a statement true of a pair of images? (UNITER's paired NLVR2 finetuning.)

Each sample holds one statement and two images. The statement is read with each image as its own
sequence — the task's trunk pass with the first (left) image, one more pass with the second
(right) one — and the two are joined into a binary classifier (true / false), in one of UNITER's
two paired heads (``head`` option):

* ``paired`` (``UniterForNlvr2Paired``): the two pooled ``[CLS]`` states, left then right, into
  one linear layer. Linear in each side's state, it cannot say "exactly one image ..." or "the
  same number ...", whose truth is no sum of a left and a right score.
* ``paired-attn`` (``UniterForNlvr2PairedAttn``, the head of UNITER's own NLVR2 config): every
  final state of each sequence attends to the other sequence's (one attention layer each way),
  is joined with what it read (dense, ReLU, dropout), pooled by learned attention weights, and
  the two pooled vectors go to the linear layer.

(UNITER can also give the second image a third token type; vlpt's regions share one type
embedding.)

Data (``tools/nlvr2_to_shards.py`` or the shapes suite): the statement as the caption, the left
image as usual (``regions.npz``), the right one under the prefix ``2.`` (``2.regions.npz``: the
sample's ``features2``, ``boxes2``), and ``label`` (true / false) in its ``json``.

Evaluation reports ``nlvr2_acc`` and ``nlvr2_acc_blind`` (both images' region features zeroed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlpt import EncoderOutput, Objective, ObjectiveOutput, UserError, register_objective
from vlpt.batch import META, second_image
from vlpt.model.heads import init_linear


def truth(label) -> int:
    """1 for a true statement, 0 for a false one (NLVR2 writes "True"/"False")."""
    if isinstance(label, bool) or label in (0, 1):
        return int(label)
    if isinstance(label, str) and label.lower() in ("true", "false"):
        return int(label.lower() == "true")
    raise UserError(f"nlvr2: label {label!r} is neither true nor false")


def key_mask(batch) -> torch.Tensor:
    """(B, T + K) True at the real text and region positions of a pass's states."""
    return torch.cat([batch["text_mask"], batch["region_mask"]], dim=1)


class AttentionPool(nn.Module):
    """A weighted mean of a sequence's states, the weights a softmax of ReLU(Linear) scores (UNITER's)."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.score = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, L, H), (B, L) -> (B, H)
        score = F.relu(self.score(x)).squeeze(-1).masked_fill(~mask, -1e4)
        return (self.dropout(score.softmax(-1)).unsqueeze(1) @ x).squeeze(1)


class PairAttention(nn.Module):
    """UNITER's paired-attn joint: each side's states attend to the other side's, are joined with
    what they read, and pooled; one module for both sides' pooling and joining, as in UNITER."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.left_reads_right = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.right_reads_left = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.join = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.pool = AttentionPool(hidden, dropout)
        init_linear(self.left_reads_right.out_proj, self.right_reads_left.out_proj, self.join[0], self.pool.score)

    def forward(self, left, left_mask, right, right_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, H) states and (B, L) masks of both sides -> their pooled (B, H) vectors."""
        read_r, _ = self.left_reads_right(left, right, right, key_padding_mask=~right_mask, need_weights=False)
        read_l, _ = self.right_reads_left(right, left, left, key_padding_mask=~left_mask, need_weights=False)
        left = self.join(torch.cat([read_r, left], dim=-1))
        right = self.join(torch.cat([read_l, right], dim=-1))
        return self.pool(left, left_mask), self.pool(right, right_mask)


@register_objective("nlvr2")
class Nlvr2Paired(Objective):
    needs = {"text", "image"}
    sample_fields = ("meta.label", "features2|image2")

    @dataclass
    class Options:
        head: Literal["paired", "paired-attn"] = "paired"  # pooled states, linear; or UNITER's NLVR2 config

    def __init__(self, options: Options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        H = model.config.hidden_size
        self.head = nn.Linear(2 * H, 2)
        init_linear(self.head)
        self.pair = PairAttention(H, model.config.heads, model.config.dropout) if options.head == "paired-attn" else None

    def prepare(self, sample, rng, pool=None):
        sample["nlvr2_label"] = truth(sample[META]["label"])
        return sample

    def logits(self, out: EncoderOutput, batch) -> torch.Tensor:
        """(B, 2) from the statement with its left image (``out``) and with its right image."""
        other = second_image(batch)
        right = out.model(other)
        if self.pair is None:
            return self.head(torch.cat([out.pooled, right.pooled], dim=-1)).float()
        left, right = self.pair(out.hidden, key_mask(batch), right.hidden, key_mask(other))
        return self.head(torch.cat([left, right], dim=-1)).float()

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
