"""Visual entailment (SNLI-VE, UNITER's VE finetuning): does the image entail the statement?

The premise is an image, the hypothesis a sentence: three classes, entailment, neutral and
contradiction. UNITER treats it as VQA with three answers (its ``UniterForVisualEntailment``
subclasses its VQA model): the same head on the pooled ``[CLS]`` state, binary cross-entropy on
the one-hot label scaled by the number of classes. So does this file: it is ``vqa`` with fixed
targets.

Data (``tools/snli_ve_to_shards.py``): the hypothesis as the caption, the image's regions, and
``label`` in the sample's ``json`` (a class name, or its index in ``LABELS``).

Evaluation reports ``ve_acc`` and ``ve_acc_blind`` (every region feature zeroed: how far the
sentence alone goes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlpt import UserError, register_objective
from vlpt_objectives.vqa import VisualQuestionAnswering

LABELS = ("entailment", "neutral", "contradiction")


def label_index(label) -> int:
    if isinstance(label, str) and label in LABELS:
        return LABELS.index(label)
    if isinstance(label, int) and 0 <= label < len(LABELS):
        return label
    raise UserError(f"ve: label {label!r} is none of {', '.join(LABELS)} (or 0-2)")


@register_objective("ve")
class VisualEntailment(VisualQuestionAnswering):
    sample_fields = ("meta.label",)
    target_field = "ve_target"
    metric = "ve_acc"

    @dataclass
    class Options:
        """No options: three classes, one-hot targets."""

    def num_outputs(self) -> int:
        return len(LABELS)

    def target(self, meta: dict) -> np.ndarray:
        return np.eye(len(LABELS), dtype=np.float32)[label_index(meta["label"])]
