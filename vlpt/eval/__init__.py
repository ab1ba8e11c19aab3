"""Held-out evaluation: each objective reports its own metrics on clean validation samples."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..batch import ZERO_REGION_FEATURES
from ..data.collate import Collator, move_to
from ..data.samples import BadSample, DecodeSettings, decode_sample
from ..data.stream import read_tar_samples
from ..objective import EncoderOutput


def recall_at(scores: np.ndarray, k: int) -> float:
    """Recall@k of the diagonal (each row's true partner) in a (n, n) score matrix.

    Ties are broken at random, in expectation: a partner tied with t - 1 others, behind g
    better ones, is within the top k with probability clip((k - g) / t, 0, 1). (An
    untrained model under bf16 scores many pairs alike; counting ties for or against it
    would report recall of 1 or 0 instead of chance.)
    """
    d = np.diag(scores)[:, None]
    better, tied = (scores > d).sum(1), (scores == d).sum(1)
    return float(np.clip((k - better) / tied, 0, 1).mean())


def recall_at_any(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Recall@k where a query may have several true partners (an image and its five captions):
    a query counts when its best-scored partner is within the top k, ties broken at random in
    expectation as in :func:`recall_at`. ``scores`` and ``positive`` are (queries, candidates)."""
    best = np.where(positive, scores, -np.inf).max(1, keepdims=True)  # (n, 1)
    negative = ~positive
    better = ((scores > best) & negative).sum(1)
    tied = ((scores == best) & negative).sum(1) + 1
    return float(np.clip((k - better) / tied, 0, 1).mean())


def load_samples(urls: list[str], tokenizer, settings: DecodeSettings, limit: int) -> list[dict]:
    """The first ``limit`` usable samples of ``urls``, in order (bad ones skipped)."""
    out: list[dict] = []
    for url in urls:
        for raw in read_tar_samples(url, lambda reason, detail="": None):
            try:
                out.append(decode_sample(raw, tokenizer, settings))
            except BadSample:
                continue
            if len(out) >= limit:
                return out
    return out


class EvalData:
    """Validation samples plus the helpers an objective's ``evaluate`` needs."""

    def __init__(
        self,
        samples: list[dict],
        collator: Collator,
        device: torch.device,
        batch_size: int = 256,
        retrieval_candidates: int = 100,
        autocast: Callable[[], Any] = contextlib.nullcontext,
    ):
        self.samples = samples
        self.collator = collator
        self.device = device
        self.batch_size = batch_size
        self.retrieval_candidates = retrieval_candidates
        self.autocast = autocast

    def batches(self, views: list[dict], batch_size: int | None = None) -> Iterator[dict]:
        """Collated batches of ``views`` on the device, in order."""
        bs = batch_size or self.batch_size
        for i in range(0, len(views), bs):
            yield move_to(self.collator(views[i : i + bs]), self.device)

    @torch.no_grad()
    def encode(self, model, batch: dict) -> EncoderOutput:
        with self.autocast():
            return model(batch)

    @torch.no_grad()
    def mean_score(self, views: list[dict], score, blind: bool = False) -> float:
        """The mean of ``score(batch) -> (sum, count)`` over the batches of ``views``; with ``blind``,
        every region feature zeroed (boxes kept), to show how much a metric owes to the image."""
        total = count = 0.0
        for batch in self.batches(views):
            if blind:
                batch[ZERO_REGION_FEATURES] = True
            s, n = score(batch)
            total += float(s)
            count += float(n)
        return total / max(count, 1.0)


@torch.no_grad()
def evaluate(pretrain_model, data: EvalData) -> dict[str, float]:
    """Every objective's ``evaluate``, merged into one flat dict (eval mode, restored after)."""
    was_training = pretrain_model.training
    pretrain_model.eval()
    metrics: dict[str, float] = {}
    try:
        with data.autocast():  # heads run in the same precision as training
            for obj in pretrain_model.objectives.values():
                metrics.update(obj.evaluate(pretrain_model.vl, data))
    finally:
        pretrain_model.train(was_training)
    return metrics
