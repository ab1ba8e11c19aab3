"""Visual question answering (UNITER's VQA finetuning).

A question about an image is read with the image as one sequence; an answer classifier on the
pooled ``[CLS]`` state scores every answer of a closed vocabulary (VQA v2: the 3,129 answers given
at least 9 times in training). Targets are soft, as VQA's accuracy is: an answer that ``n`` of a
question's 10 annotators gave scores min(1, n / 3) averaged over the 10 sets of 9 of them (VQA v2's
official evaluation; 0.3, 0.6, 0.9 and 1 for n = 1, 2, 3 and 4 or more, the scores of the BUTD
preprocessing whose targets UNITER trains on). The loss is binary cross-entropy per answer, scaled by the
vocabulary size as UNITER's ``train_vqa.py`` does (``loss.mean() * num_answers``: summed over
answers, averaged over questions). The head is UNITER's: dense to 2H, GELU, LayerNorm, dense to
the answers.

Data (see ``docs/data.md``, written by ``tools/vqa_to_shards.py`` or the shapes suite): the
question as the caption, the image's regions, and in the sample's ``json`` the annotators' answer
counts by index into ``answer_vocab.json`` (``answer_ids``). ``num_answers`` must be the size of
that vocabulary.

Evaluation reports ``vqa_acc`` — the mean soft score of the top answer over every question, those
whose answers are all outside the vocabulary included (they score 0, as in UNITER's evaluation) —
and ``vqa_acc_blind``, the same with every region feature zeroed: how much of the
accuracy the question alone gives.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vlpt import EncoderOutput, Objective, ObjectiveOutput, register_objective
from vlpt.batch import META
from vlpt.model.heads import mlp_head


def vqa_accuracy(n: int, annotators: int = 10) -> float:
    """VQA v2's accuracy of an answer ``n`` of a question's ``annotators`` gave: min(1, matches / 3)
    averaged over every set of ``annotators - 1`` of them (n of the sets leave out one who gave it).
    With one answer per question (``annotators: 1``, e.g. GQA) it is an exact match."""
    m = max(int(annotators), int(n))
    if n <= 0 or m < 2:
        return float(n > 0)
    return (n * min(1.0, (n - 1) / 3) + (m - n) * min(1.0, n / 3)) / m


def soft_scores(counts: dict, num_answers: int, annotators: int = 10) -> np.ndarray:
    """(num_answers,) float32: :func:`vqa_accuracy` for each answer index and its annotator count."""
    target = np.zeros(num_answers, dtype=np.float32)
    for index, n in counts.items():
        i = int(index)
        if not 0 <= i < num_answers:
            raise ValueError(f"answer id {i} is outside the vocabulary of num_answers = {num_answers}: set the "
                             "objective's num_answers to the length of the data's answer_vocab.json")
        target[i] = vqa_accuracy(int(n), annotators)
    return target


def top_answer_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) the soft score of each question's top-scoring answer (VQA accuracy per question)."""
    return target.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)


@register_objective("vqa")
class VisualQuestionAnswering(Objective):
    needs = {"text", "image"}
    sample_fields = ("meta.answer_ids",)

    @dataclass
    class Options:
        num_answers: int = 3129  # the answer vocabulary's size (VQA v2: 3129; see answer_vocab.json)
        annotators: int = 10  # answers per question (VQA v2: 10), over which the accuracy is averaged

    #: batch field of the (B, num_answers) soft targets, and the metric prefix
    target_field = "vqa_target"
    metric = "vqa_acc"

    def __init__(self, options: Options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        self.head = mlp_head(model.config.hidden_size, self.num_outputs())

    def num_outputs(self) -> int:
        return self.options.num_answers

    def target(self, meta: dict) -> np.ndarray:
        return soft_scores(meta["answer_ids"], self.options.num_answers, self.options.annotators)

    def prepare(self, sample, rng, pool=None):
        sample[self.target_field] = self.target(sample[META])
        return sample

    def forward(self, out: EncoderOutput, batch) -> ObjectiveOutput:
        logits = self.head(out.pooled).float()  # (B, C)
        target = batch[self.target_field]  # (B, C) soft scores
        loss = F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
        return ObjectiveOutput(loss, {"acc": top_answer_score(logits, target).mean().detach()})

    @torch.no_grad()
    def evaluate(self, model, data) -> dict[str, float]:
        rng = np.random.default_rng(0)
        views = [self.prepare(dict(s), rng) for s in data.samples if (s.get(META) or {}).get(self.sample_field) is not None]
        if not views:
            return {}

        def score(batch):
            logits = self.head(data.encode(model, batch).pooled).float()
            return top_answer_score(logits, batch[self.target_field]).sum(), len(logits)

        return {self.metric: data.mean_score(views, score), f"{self.metric}_blind": data.mean_score(views, score, True)}

    @property
    def sample_field(self) -> str:
        return self.sample_fields[0].split(".", 1)[1]
