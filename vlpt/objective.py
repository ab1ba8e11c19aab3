"""The plugin contract: everything an objective is and does.

An objective is an ``nn.Module`` (its heads are checkpointed with the model)
with two halves that run in different places:

* :meth:`Objective.prepare` runs in data-loader workers, once per sample, on
  plain Python/numpy data: it makes the objective's *view* of a clean sample
  (masked words and their labels, a swapped negative image, ...).
* :meth:`Objective.forward` runs in the training process on a padded batch and
  the shared trunk's output, and returns an :class:`ObjectiveOutput`.

Several objectives can share one task (one prepared batch, one trunk forward
pass); their ``prepare`` hooks run in the order the recipe lists them.

Options are a dataclass nested in the objective (``Options``), so a recipe's
``tasks.<task>.objectives.<name>: {...}`` is validated against it before any
heavy work, with did-you-mean errors for typos.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

#: Modalities a sample can carry; an objective's ``needs`` is a subset.
MODALITIES = frozenset({"text", "image"})


@dataclass
class ObjectiveOutput:
    """What an objective returns: a scalar loss and metrics.

    Metrics may be 0-d tensors: the trainer turns them into floats only on the
    steps it logs, so the training step never waits for the device.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class EncoderOutput:
    """The shared trunk's output for one batch, handed to every objective of a task.

    ``hidden`` is ``(B, T + K, H)``: the first ``T`` positions are text (padded),
    the last ``K`` regions (padded). ``model`` is the :class:`vlpt.model.VLModel`
    itself, so heads can tie weights (e.g. the MLM decoder to the word embeddings)
    or run extra passes (e.g. unimodal encodings).
    """

    hidden: torch.Tensor  # (B, T + K, H)
    pooled: torch.Tensor  # (B, H)
    text_len: int  # T
    model: Any

    @property
    def text(self) -> torch.Tensor:  # (B, T, H)
        return self.hidden[:, : self.text_len]

    @property
    def regions(self) -> torch.Tensor:  # (B, K, H)
        return self.hidden[:, self.text_len :]


class Objective(nn.Module):
    """Base class of every pretraining objective (built-in or plugin).

    Subclasses set ``needs`` and may define a nested ``Options`` dataclass; they
    are registered with :func:`vlpt.register_objective`.
    """

    #: set by ``register_objective``
    name: ClassVar[str] = ""
    #: modalities a sample must carry for this objective ("text", "image")
    needs: ClassVar[frozenset[str] | set[str]] = frozenset({"text", "image"})
    #: ``True`` if ``prepare`` needs other samples (e.g. to draw negatives):
    #: the pipeline then passes a ``pool`` of recent clean samples.
    wants_pool: ClassVar[bool] = False
    #: objectives that must share this one's task (e.g. ``wra`` reads ``itm``'s labels)
    requires: ClassVar[tuple[str, ...]] = ()
    #: region fields the data must carry (besides features and boxes), e.g. ``("soft_labels",)``
    sample_fields: ClassVar[tuple[str, ...]] = ()
    #: padding value per batch field this objective adds (default 0)
    pad_values: ClassVar[dict[str, Any]] = {}

    @dataclass
    class Options:
        """No options."""

    def __init__(self, options: Any, model: nn.Module, tokenizer: Any):
        """Build heads.

        ``model`` is the :class:`~vlpt.model.VLModel` (read ``model.config`` and
        ``model.feature_dim`` for sizes; do not keep it as a submodule — reach
        shared weights through ``out.model`` in ``forward``). ``tokenizer`` is the
        :class:`~vlpt.data.tokenizer.TextTokenizer` (special ids, vocabulary size).
        """
        super().__init__()
        self.options = options
        self.tokenizer = tokenizer

    @classmethod
    def check_task(cls, options: Any, task: list[tuple[str, Any]]) -> str | None:
        """What is wrong with the task this objective is in, or None; checked before training.

        ``task`` lists the task's objectives as (name, options), in recipe order (the order
        their ``prepare`` and ``forward`` run in). E.g. an objective that reads what another
        one leaves in the batch says so here, instead of failing at the first step.
        """
        return None

    # -- worker side -----------------------------------------------------------
    def prepare(self, sample: dict, rng: np.random.Generator, pool: Sequence[dict] | None = None) -> dict:
        """Return this objective's view of ``sample`` (a new or updated dict).

        ``sample`` holds ``input_ids`` (list[int], with [CLS] ... [SEP]),
        ``word_ids``, ``features`` (K, D) float32, ``boxes`` (K, 4), optional
        ``soft_labels``, ``grounding`` and ``key``. Add per-sample fields
        (numpy arrays or ints); the collator pads them (see ``vlpt.data.collate``).
        """
        return sample

    # -- model side ------------------------------------------------------------
    def forward(self, out: EncoderOutput, batch: dict) -> ObjectiveOutput:  # pragma: no cover
        raise NotImplementedError

    # -- evaluation ------------------------------------------------------------
    def evaluate(self, model: nn.Module, eval_data: Any) -> dict[str, float]:
        """Held-out metrics (flat keys) for ``eval.json``; optional.

        ``eval_data`` is a :class:`vlpt.eval.EvalData` giving clean validation
        samples and helpers to prepare, collate and encode them.
        """
        return {}

