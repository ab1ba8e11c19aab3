"""Blind baselines of the shapes downstream suite: how well the text alone predicts a label.

The suite (:mod:`vlpt.data.shapes_tasks`) draws every label before the text that goes with it, so
no question, expression or statement should tell its answer more often than chance; this measures
it (``docs/shapes-suite.md`` reports the figures, ``tests/test_shapes_tasks.py`` checks them)."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Callable, Iterable

import numpy as np

from .shapes_tasks import QUESTION_ANSWERS

__all__ = ["blind_baseline"]

#: per task: a sample's json -> (type, label, number of possible labels), for the text-only predictor
_LABELS: dict[str, Callable[[dict], tuple[str, str, int]]] = {
    "vqa": lambda m: (m["question_type"], max(m["answers"], key=m["answers"].get),
                      len(QUESTION_ANSWERS[m["question_type"]])),
    "nlvr2": lambda m: (m["statement_type"], str(m["label"]), 2),
    "refexp": lambda m: (m["expression_type"], str(m["target_region"]), len(m["scene"])),
}


def _blind_items(task: str, samples: Iterable[dict]) -> list[tuple[str, str, str, int]]:
    """(type, text, label, number of possible labels) of each raw sample."""
    if task not in _LABELS:
        raise ValueError(f"no blind baseline for task {task!r}: the labelled tasks are {', '.join(_LABELS)}")
    labelled = [(_LABELS[task](json.loads(s["json"])), s["txt"]) for s in samples]
    return [(t, x.decode() if isinstance(x, bytes) else x, label, c) for (t, label, c), x in labelled]


def _text_only_accuracy(items: list[tuple], fit: list[tuple]) -> float:
    """Accuracy on ``items`` of: answer each text with its most frequent label in ``fit`` (unseen
    texts: the most frequent label of the type there)."""
    seen: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for qtype, text, label, _ in fit:
        seen["text", text][label] += 1
        seen["type", qtype][label] += 1
    guess = {key: max(sorted(c), key=c.get) for key, c in seen.items()}
    hits = sum(guess.get(("text", x), guess.get(("type", t))) == label for t, x, label, _ in items)
    return hits / max(len(items), 1)


def _uniform_in_sample(items: list[tuple], reps: int = 100) -> float:
    """What the in-sample text-only predictor scores on the same texts with labels drawn uniformly."""
    rng = np.random.default_rng(0)
    choices = np.array([c for *_, c in items])
    total = 0.0
    for _ in range(reps):
        labels = (rng.random(len(items)) * choices).astype(int)
        drawn = [(t, x, str(label), c) for (t, x, _, c), label in zip(items, labels)]
        total += _text_only_accuracy(drawn, drawn)
    return total / reps


def blind_baseline(task: str, samples: Iterable[dict], fit: Iterable[dict] | None = None) -> dict[str, dict]:
    """How well the text alone (question, expression, statement) predicts the label, per type and ``all``.

    The predictor answers each distinct text with its most frequent label in ``fit`` (a train
    split: the shortcut a model could learn) and is scored on ``samples`` (a held-out split).
    Without ``fit`` it is fit on ``samples`` themselves, which flatters it (a text seen once is
    always right), so ``uniform`` then reports what it would score on the same texts if every
    label were drawn uniformly.  ``chance`` is the mean of 1 / (number of possible labels).
    """
    items = _blind_items(task, samples)
    train = items if fit is None else _blind_items(task, fit)
    out = {}
    for qtype in sorted({t for t, *_ in items}) + ["all"]:
        mine = [it for it in items if qtype in ("all", it[0])]
        row = {"accuracy": _text_only_accuracy(mine, train), "samples": len(mine),
               "texts": len({x for _, x, _, _ in mine}), "chance": float(np.mean([1 / c for *_, c in mine]))}
        if fit is None:
            row["uniform"] = _uniform_in_sample(mine)
        out[qtype] = row
    return out
