"""The plugin contract: everything an objective is and does.

An objective is an ``nn.Module`` (its heads are checkpointed with the model)
with two halves that run in different places:

* :meth:`Objective.prepare` runs in data-loader workers, once per sample, on
  plain Python/numpy data: it makes the objective's *view* of a clean sample
  (masked words and their labels, a swapped negative image, ...).
* :meth:`Objective.forward` runs in the training process on a padded batch and
  the shared trunk's output, and returns an :class:`ObjectiveOutput`.

Several objectives can share one task (one prepared batch, one trunk forward
pass); their ``prepare`` hooks and then their ``forward`` calls run in the order the
recipe lists them. What one leaves for the ones after it (``itc``'s similarities, which
``itm``'s hard negatives draw from) passes through ``EncoderOutput.shared``, declared
with ``provides`` and ``uses`` and checked when the recipe is validated (see
:mod:`vlpt.batch`).

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
    #: values an objective leaves for the objectives after it in the task (names it ``provides``)
    shared: dict[str, Any] = field(default_factory=dict)

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
    #: the pipeline then passes a ``pool`` of other clean samples (the 64 most recent; with a token
    #: budget, the current bucket).
    wants_pool: ClassVar[bool] = False
    #: objectives that must share this one's task, by name
    requires: ClassVar[tuple[str, ...]] = ()
    #: fields a sample must carry besides its modalities: region fields (``"soft_labels"``) or
    #: metadata keys (``"meta.answer_ids"``). A source whose samples carry none of them does not feed
    #: the task (none that does: exit 2 before training); a sample lacking one is skipped and counted.
    sample_fields: ClassVar[tuple[str, ...]] = ()
    #: padding value per batch field this objective adds (default 0)
    pad_values: ClassVar[dict[str, Any]] = {}
    #: values ``forward`` leaves in ``out.shared`` for the objectives after it in the task
    provides: ClassVar[tuple[str, ...]] = ()
    #: values ``forward`` reads from ``out.shared``: an objective before it in the task must provide each
    uses: ClassVar[tuple[str, ...]] = ()
    #: ``True`` if it needs every pair of a batch to be a matching caption and image
    needs_matched_pairs: ClassVar[bool] = False
    #: ``True`` if ``forward`` reads every position's final state (``out.hidden``, ``out.text`` or
    #: ``out.regions``): the task then runs the trunk's last layer on every position before any of
    #: its objectives reads, so an objective before this one that reads only ``[CLS]`` or a few
    #: rows takes them from that same pass (one computation, one dropout draw) instead of its own
    needs_all_states: ClassVar[bool] = False

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

    def init_from_pretrained(self, weights: dict[str, torch.Tensor]) -> str | None:
        """Called when the model starts from a vlpt run (``model.init_from``), after the encoder is
        loaded, with that run's weights by name (``objectives.itm.head.weight``, ...): a fresh head may
        start from a pretrained one (UNITER's retrieval finetune starts its rank head from ITM's).
        Returns what it took, for the run's report, or None (default: nothing)."""
        return None

    @classmethod
    def provided(cls, options: Any) -> tuple[str, ...]:
        """The shared values this objective provides with these options (default: ``provides``)."""
        return tuple(cls.provides)

    @classmethod
    def used(cls, options: Any) -> tuple[str, ...]:
        """The shared values it uses with these options (default: ``uses``)."""
        return tuple(cls.uses)

    @classmethod
    def swaps_images(cls, options: Any) -> bool:
        """Whether ``prepare`` pairs some captions with another sample's image (a negative)."""
        return False

    @classmethod
    def check_task(cls, options: Any, task: list[tuple[str, Any]]) -> str | None:
        """What else is wrong with the task this objective is in, or None; checked before training.

        ``task`` lists the task's objectives as (name, options), in recipe order. Shared values,
        companions and matched pairs are checked already (see :func:`vlpt.tasks.check_task`).
        """
        return None

    # -- worker side -----------------------------------------------------------
    def prepare(self, sample: dict, rng: np.random.Generator, pool: Sequence[dict] | None = None) -> dict:
        """Return this objective's view of ``sample`` (a new or updated dict).

        ``sample`` holds ``input_ids`` (list[int], with [CLS] ... [SEP]),
        ``word_ids``, ``features`` (K, D) float16/32, ``boxes`` (K, 4), optional
        ``soft_labels``, ``meta`` (the sample's JSON metadata) and ``key`` (see
        :mod:`vlpt.batch`). Add per-sample fields (numpy arrays or ints); the
        collator pads them (see ``vlpt.data.collate``).
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

