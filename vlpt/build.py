"""Building a run's pieces from a recipe: tokenizer, model, objectives, data.

Shared by ``vlpt train``, ``eval``, ``export`` and the benchmarks, so they all
build exactly the same model for the same recipe.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .data.collate import Collator
from .data.samples import DecodeSettings
from .data.sources import default_tokenizer_path
from .data.stream import Source, TaskStream
from .data.tokenizer import TextTokenizer
from .model import VLModel
from .model.bert_io import apply_bert_config, load_bert_into
from .errors import RecipeError
from .recipe import ModelConfig, Recipe, TaskSpec, check_files, resolve_tasks
from .tasks import PretrainModel, task_pipeline


@dataclass
class Built:
    recipe: Recipe
    tasks: list[TaskSpec]
    tokenizer: TextTokenizer
    model: PretrainModel


def validate(recipe: Recipe) -> list[TaskSpec]:
    """Every check that needs no heavy work: files, objectives, options."""
    check_files(recipe)
    return resolve_tasks(recipe)


def model_config(recipe: Recipe, tokenizer_vocab: int | None) -> ModelConfig:
    """The model's sizes: the recipe's, the init checkpoint's (which win), the tokenizer's vocabulary."""
    mcfg = copy.deepcopy(recipe.model)
    if mcfg.init_from:
        apply_bert_config(mcfg, mcfg.init_from)
    if mcfg.vocab_size is None:
        mcfg.vocab_size = tokenizer_vocab
    elif tokenizer_vocab is not None and mcfg.vocab_size < tokenizer_vocab:
        raise RecipeError(f"recipe key 'model.vocab_size' ({mcfg.vocab_size}) is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer_vocab})")
    return mcfg


def build_model(recipe: Recipe, tasks: list[TaskSpec] | None = None, load_init: bool = True) -> Built:
    """Tokenizer + :class:`PretrainModel` (BERT weights loaded if ``model.init_from``)."""
    tasks = tasks if tasks is not None else validate(recipe)
    tokenizer = TextTokenizer.from_path(default_tokenizer_path(recipe))
    mcfg = model_config(recipe, tokenizer.vocab_size)
    vl = VLModel(mcfg)
    vl.trunk.activation_checkpointing = mcfg.activation_checkpointing
    if mcfg.init_from and load_init:
        load_bert_into(vl, mcfg.init_from)
    return Built(recipe, tasks, tokenizer, PretrainModel(vl, tasks, tokenizer))


def decode_settings(recipe: Recipe, model: PretrainModel) -> DecodeSettings:
    bb = recipe.model.image_backbone
    return DecodeSettings(
        feature_dim=None if bb else model.vl.feature_dim,
        max_text_len=recipe.data.max_text_len,
        max_regions=recipe.data.max_regions,
        image_size=bb.image_size if bb else None,
    )


def task_streams(built: Built, sources: list[Source], rank: int = 0, world_size: int = 1,
                 carried: list[set[str]] | None = None) -> dict[str, TaskStream]:
    """One stream per task; with ``carried`` (from :func:`probe_sources`), a task reads only the
    sources whose samples carry what its objectives need."""
    r = built.recipe
    d = r.data
    settings = decode_settings(r, built.model)
    streams = {}
    for i, task in enumerate(built.tasks):
        pipe = task_pipeline(built.model, task)
        mine = sources if carried is None else [s for s, c in zip(sources, carried) if set(pipe.needs) <= c]
        streams[task.name] = TaskStream(
            mine, built.tokenizer, settings, pipe, pipe.needs, Collator(built.tokenizer.pad_id, pipe.pad_values),
            batch_tokens=d.batch_tokens, batch_size=d.batch_size, bucket_size=d.bucket_size,
            size_multiple=d.size_multiple, shuffle_buffer=d.shuffle_buffer,
            pool_size=64 if pipe.wants_pool else 0, seed=r.seed, stream_id=i, rank=rank, world_size=world_size,
            resample="auto" if d.resample is None else d.resample,
        )
    return streams


def eval_collator(built: Built) -> Collator:
    pads: dict = {}
    for obj in built.model.objectives.values():
        pads.update(obj.pad_values)
    return Collator(built.tokenizer.pad_id, pads)


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


def data_loader(stream: TaskStream, num_workers: int, seed: int = 0) -> torch.utils.data.DataLoader:
    # Its own generator: starting a loader's workers then draws nothing from torch's global
    # generator, so dropout draws the same numbers in a resumed run as in an uninterrupted one.
    kwargs = dict(batch_size=None, num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=_ignore_stop_signals)
    return torch.utils.data.DataLoader(stream, **kwargs)


def probe_sources(tasks: list[TaskSpec], sources: list[Source], settings: DecodeSettings, tokenizer,
                  probe: int = 64) -> list[set[str]]:
    """What each source's samples carry, read from the first usable samples of its first shard.

    Fails before training (exit 2) when no source can feed a task's objectives (``needs``) or a
    source with regions lacks a field an objective reads (``sample_fields``). Returns the
    modalities per source, so :func:`task_streams` gives each task only the sources it can use
    (a caption-only source feeds a text-only ``mlm`` task and is kept away from ``itm``)."""
    from .data.samples import BadSample, decode_sample, modalities
    from .data.stream import read_tar_samples

    needed = {f: o.name for t in tasks for o in t.objectives for f in getattr(o.cls, "sample_fields", ())}
    carried: list[set[str]] = []
    for i, src in enumerate(sources):
        found: set[str] = set()
        seen = 0
        for raw in read_tar_samples(src.urls[0], lambda *a: None):
            try:
                sample = decode_sample(raw, tokenizer, settings)
            except BadSample:
                continue
            found |= modalities(sample)
            for field, objective in needed.items():
                if settings.image_size is None and "features" in sample and field not in sample:
                    raise RecipeError(
                        f"objective '{objective}' needs '{field}' in regions.npz, but the samples of "
                        f"data.train.{i} ('{src.urls[0]}') have none"
                    )
            seen += 1
            if seen >= probe:
                break
        carried.append(found)
    for task in tasks:  # a task's samples must meet all its objectives' needs at once
        needs = set().union(*(spec.cls.needs for spec in task.objectives))
        if sources and not any(needs <= c for c in carried):
            names = ", ".join(spec.name for spec in task.objectives)
            what = "; ".join(f"the samples of data.train.{i} ('{s.urls[0]}') carry only "
                             f"{'+'.join(sorted(c)) or 'nothing usable'}" for i, (s, c) in enumerate(zip(sources, carried)))
            raise RecipeError(f"recipe key 'tasks.{task.name}': its objectives ({names}) need "
                              f"{'+'.join(sorted(needs))}, but no source can feed it: {what}")
    return carried
