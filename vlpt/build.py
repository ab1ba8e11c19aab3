"""Wiring a run's parts together from a recipe: tokenizer, model, objectives, streams, loaders.

Shared by ``vlpt train``, ``eval``, ``export`` and the benchmarks, so they all build exactly the
same model and the same batches for the same recipe. Each part is defined elsewhere (tasks in
:mod:`vlpt.tasks`, data in :mod:`vlpt.data`, the model in :mod:`vlpt.model`); this module only
connects them.
"""
from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass

import torch

from .checks import check_files, check_values
from .data.collate import Collator
from .data.samples import DecodeSettings
from .data.sources import default_tokenizer_path
from .data.stream import Source, TaskHead, TaskStream
from .data.tokenizer import TextTokenizer
from .errors import RecipeError
from .model import VLModel
from .init_from import apply_init_config, load_init_weights
from .recipe import ModelConfig, Recipe
from .tasks import PretrainModel, TaskSpec, merged_pad_values, resolve_tasks


@dataclass
class Built:
    recipe: Recipe
    tasks: list[TaskSpec]
    tokenizer: TextTokenizer
    model: PretrainModel
    init_report: str | None = None  # what model.init_from loaded, for the run's first lines


def validate(recipe: Recipe, data: bool = True) -> list[TaskSpec]:
    """Every check that needs no heavy work: files (``data=False``: not the data), objectives, tasks."""
    check_values(recipe)
    check_files(recipe, data=data)
    return resolve_tasks(recipe)


def model_config(recipe: Recipe, tokenizer_vocab: int | None) -> ModelConfig:
    """The model's sizes: the recipe's, the init checkpoint's (which win), the tokenizer's vocabulary."""
    mcfg = copy.deepcopy(recipe.model)
    if mcfg.init_from:
        apply_init_config(mcfg, mcfg.init_from)
    if mcfg.vocab_size is None:
        mcfg.vocab_size = tokenizer_vocab
    elif tokenizer_vocab is not None and mcfg.vocab_size < tokenizer_vocab:
        raise RecipeError(f"recipe key 'model.vocab_size' ({mcfg.vocab_size}) is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer_vocab})")
    return mcfg


def build_model(recipe: Recipe, tasks: list[TaskSpec] | None = None, load_init: bool = True) -> Built:
    """Tokenizer + :class:`PretrainModel` (``model.init_from`` loaded unless ``load_init=False``)."""
    tasks = tasks if tasks is not None else validate(recipe)
    tokenizer = TextTokenizer.from_path(default_tokenizer_path(recipe))
    mcfg = model_config(recipe, tokenizer.vocab_size)
    vl = VLModel(mcfg)
    vl.trunk.activation_checkpointing = mcfg.activation_checkpointing
    model = PretrainModel(vl, tasks, tokenizer)
    report = load_init_weights(model, mcfg.init_from, mcfg.init_heads) if mcfg.init_from and load_init else None
    return Built(recipe, tasks, tokenizer, model, report)


def decode_settings(recipe: Recipe, model: PretrainModel) -> DecodeSettings:
    bb = recipe.model.image_backbone
    return DecodeSettings(
        feature_dim=None if bb else model.vl.feature_dim,
        max_text_len=recipe.data.max_text_len,
        max_regions=recipe.data.max_regions,
        image_size=bb.image_size if bb else None,
    )


def _head(built: Built, task: TaskSpec) -> TaskHead:
    return TaskHead(task.name, built.model.pipeline(task.name),
                    Collator(built.tokenizer.pad_id, task.pad_values, keep_half=True), task.pool_size)


def task_stream(built: Built, task: TaskSpec | list[TaskSpec], index: int, sources: list[Source], rank: int = 0,
                world_size: int = 1) -> TaskStream:
    """The training stream of one task (or of several that share it) over the sources that feed it."""
    tasks = task if isinstance(task, list) else [task]
    r, d = built.recipe, built.recipe.data
    return TaskStream(
        sources, built.tokenizer, decode_settings(r, built.model), None, tasks[0].needs, None,
        heads=[_head(built, t) for t in tasks],
        sample_fields=tuple(dict.fromkeys(f for t in tasks for f in t.sample_fields)),
        batch_tokens=d.batch_tokens, batch_size=d.batch_size, bucket_size=d.bucket_size,
        size_multiple=d.size_multiple, shuffle_buffer=d.shuffle_buffer, seed=r.seed,
        stream_id=index, rank=rank, world_size=world_size, resample="auto" if d.resample is None else d.resample,
    )


def task_streams(built: Built, sources: list[Source], rank: int = 0, world_size: int = 1,
                 feeding: list[list[int]] | None = None, share: bool = False) -> dict[str, TaskStream]:
    """One stream per task; with ``feeding`` (from :func:`vlpt.data.sources.probe_sources`), a task reads
    only the sources that can feed it. With ``share`` (``mixing: sum``), the trained tasks (weight > 0)
    that read the same sources with the same needs share one stream: each sample is decoded once,
    and the stream's items hold every one of those tasks' batches of the same samples."""
    groups: dict[tuple, list[int]] = {}
    for i, task in enumerate(built.tasks):
        mine = tuple(range(len(sources))) if feeding is None else tuple(feeding[i])
        key = (mine, task.needs) if share and task.weight > 0 else ("own", i)
        groups.setdefault(key, []).append(i)
    streams = {}
    for key, members in groups.items():
        index = members[0]
        mine = sources if feeding is None else [sources[j] for j in feeding[index]]
        stream = task_stream(built, [built.tasks[i] for i in members], index, mine, rank, world_size)
        streams.update({built.tasks[i].name: stream for i in members})
    return streams


def eval_collator(built: Built) -> Collator:
    return Collator(built.tokenizer.pad_id, merged_pad_values(built.tasks))


def note(message: str) -> None:
    """A line on stderr from the main process only (the first rank of a distributed run)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"vlpt: {message}", file=sys.stderr)


def _ignore_stop_signals(_worker_id: int) -> None:
    """Data workers leave SIGTERM/SIGUSR1 to the training process: a cluster that signals
    the whole process group must not kill the workers before the checkpoint is written."""
    import signal

    for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def stop_workers(iterator) -> None:
    """Shut a loader iterator's workers down now, not at interpreter exit, and kill any that do
    not stop: they ignore SIGTERM, which is how Python's exit would otherwise try to end them."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in getattr(iterator, "_workers", []):
        if w.is_alive():
            w.kill()
            w.join(5)


def data_loader(stream: TaskStream, num_workers: int, seed: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The loader of a stream. ``pin_memory`` (training on a GPU): batches arrive in page-locked memory,
    collated straight into it without workers, so their copies to the device do not block the host."""
    for head in stream.heads:
        head.collator.pin = pin_memory and num_workers == 0
    # Its own generator: starting a loader's workers then draws nothing from torch's global
    # generator, so dropout draws the same numbers in a resumed run as in an uninterrupted one.
    kwargs = dict(batch_size=None, num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                  pin_memory=pin_memory)
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=_ignore_stop_signals)
    return torch.utils.data.DataLoader(stream, **kwargs)
