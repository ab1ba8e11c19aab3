"""Sharded training (FSDP2): what changes when no rank holds every weight.

Under DDP each rank holds the whole model, and rank 0 writes ``model.safetensors``. Under FSDP2
(``torch.distributed.fsdp.fully_shard``, through accelerate; each ``TrunkLayer`` is a unit,
embeddings, pooler and heads share the root unit) a rank holds a slice of every weight and of
its optimizer state, so:

* **checkpoints** are written by every rank at once with ``torch.distributed.checkpoint`` (DCP):
  ``sharded/`` holds each rank's slices (``__R_0.distcp``) and one ``.metadata`` index, written in
  DCP's own format. DCP would read that index with an unrestricted ``pickle.load`` and non-tensor
  values with ``torch.load(weights_only=False)``; vlpt reads both through
  :class:`DataOnlyReader` / :class:`DataOnlyLoadPlanner`, which build only DCP's metadata records,
  tensors and plain values, so a checkpoint still never runs code;
* **resuming** loads after ``accelerator.prepare`` (the slices go into the sharded parameters),
  and a run can resume on another number of ranks (DCP reshards);
* **evaluation** runs on every rank together (a forward pass gathers each unit's weights from all
  ranks), with the root unit gathered explicitly: objectives call the encoder, not the root;
* ``vlpt eval`` / ``vlpt export`` read ``sharded/`` in one process into whole tensors
  (:func:`read_model_state`); no cluster is needed.

accelerate 1.15 sets FSDP up only on accelerators; on CPU ranks (``torchrun`` with gloo) it
falls back to plain multi-CPU data parallelism. torch's ``fully_shard`` runs on gloo, so
:func:`enable_fsdp_on_cpu_ranks` switches accelerate's state to FSDP there: the CPU test then
runs the code a GPU run runs.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..run_dir import SHARDED, SHARDED_INDEX

MODEL_KEY, OPTIMIZER_KEY = "model", "optimizer"


# -- which kind of run ---------------------------------------------------------------------------
def enable_fsdp_on_cpu_ranks(accelerator) -> None:
    """Give accelerate FSDP on CPU ranks when the launch asked for it (``ACCELERATE_USE_FSDP``)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    from accelerate.state import PartialState

    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # both shared states: accelerate copies the process state into the accelerator state now and then
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP


def sharding(accelerator) -> str | None:
    """``"fsdp2"`` for a sharded run, None for DDP or one process; a user error for what vlpt
    cannot checkpoint yet (FSDP1, DeepSpeed: docs/cluster.md, "Sharded training")."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise UserError("DeepSpeed is not supported by vlpt's trainer yet (its ZeRO optimizer state cannot be "
                        "checkpointed as plain data, see docs/cluster.md); shard with recipes/launch/fsdp-1x8.yaml "
                        "(FSDP2) or train with DDP")
    if kind == DistributedType.FSDP:
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise UserError("FSDP1 (fsdp_version: 1) is not supported by vlpt's checkpoints; set fsdp_version: 2 "
                            "in the launch config (recipes/launch/fsdp-1x8.yaml)")
        return "fsdp2"
    return None


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a sharded tensor (a plain tensor is its own)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


@contextlib.contextmanager
def gathered_root(model) -> Iterator[None]:
    """The root unit's weights gathered for the duration (collective: every rank enters)."""
    unshard = getattr(model, "unshard", None)
    if unshard is None:
        yield
        return
    unshard()
    try:
        yield
    finally:
        model.reshard()


# -- reading DCP's files as data -----------------------------------------------------------------
def _allowed_globals() -> dict[tuple[str, str], Any]:
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed = {(metadata.__name__, n): getattr(metadata, n) for n in (
        "Metadata", "StorageMeta", "BytesStorageMetadata", "TensorStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "_MEM_FORMAT_ENCODING")}
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a layout from its name
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records, torch sizes, dtypes and layouts, paths; refuses anything else."""

    allowed = None

    def find_class(self, module: str, name: str):
        if type(self).allowed is None:
            type(self).allowed = _allowed_globals()
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a checkpoint's index")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it refers to a persistent id")


def read_metadata(folder: str | Path):
    """The ``.metadata`` index of a DCP folder, read without running code from it."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = Path(folder) / SHARDED_INDEX
    try:
        meta = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        if not isinstance(meta, Metadata):
            raise pickle.UnpicklingError(f"it holds a {type(meta).__name__}, not a checkpoint index")
    except FileNotFoundError:
        raise UserError(f"'{path}' not found: the sharded checkpoint is incomplete") from None
    except Exception as e:  # refused, truncated, or not a pickle
        raise UserError(f"refusing to read '{path}': {str(e).splitlines()[0][:160] or type(e).__name__}") from None
    if getattr(meta, "storage_meta", None) is None:
        meta.storage_meta = StorageMeta()
    return meta


def _data_only_classes():
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    class DataOnlyReader(FileSystemReader):
        """DCP's file reader with a restricted reading of the index (tensors are read with
        ``torch.load(weights_only=True)`` by DCP itself)."""

        def read_metadata(self, *args, **kwargs):
            meta = read_metadata(self.path)
            meta.storage_meta.load_id = self.load_id
            return meta

    class DataOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's planner, with non-tensor values read by ``torch.load(weights_only=True)``."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            from torch.distributed.checkpoint._traverse import (
                set_element,  # as DCP's own planner does
            )

            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return DataOnlyReader, DataOnlyLoadPlanner


def _load(state: dict, folder: Path, no_dist: bool = False) -> None:
    import torch.distributed.checkpoint as dcp

    reader, planner = _data_only_classes()
    dcp.load(state, storage_reader=reader(str(folder)), planner=planner(), no_dist=no_dist)


# -- saving and loading a sharded run -------------------------------------------------------------
def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer


def save_sharded_state(ckpt: Path, model, optimizer) -> None:
    """Every rank writes its slices of the weights and optimizer state to ``ckpt/sharded`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, _inner(optimizer))
    dcp.save({MODEL_KEY: model_state, OPTIMIZER_KEY: optim_state},
             storage_writer=dcp.FileSystemWriter(str(Path(ckpt) / SHARDED)))


def load_sharded_state(ckpt: Path, model, optimizer) -> None:
    """Read ``ckpt/sharded`` into the sharded model and optimizer (collective; any rank count)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model_state, optim_state = get_state_dict(model, _inner(optimizer))
    # Parameters that had no gradient yet (a task not drawn so far) had no optimizer state when
    # saved: ask only for what was saved, so they start fresh, as in the run that saved it.
    saved = {tuple(map(str, p)) for p in (read_metadata(Path(ckpt) / SHARDED).planner_data or {}).values()}
    for name in list(optim_state["state"]):
        kept = {k: v for k, v in optim_state["state"][name].items() if (OPTIMIZER_KEY, "state", name, k) in saved}
        if kept:
            optim_state["state"][name] = kept
        else:
            del optim_state["state"][name]
    state = {MODEL_KEY: model_state, OPTIMIZER_KEY: optim_state}
    _load(state, Path(ckpt) / SHARDED)
    set_model_state_dict(model, state[MODEL_KEY])
    set_optimizer_state_dict(model, _inner(optimizer), state[OPTIMIZER_KEY], options=StateDictOptions(strict=False))


def read_model_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of a sharded checkpoint, whole, in this one process (no process group): the
    index gives each tensor's name, size and dtype, DCP puts the slices together."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(ckpt) / SHARDED
    meta = read_metadata(folder)
    weights = {}
    for key, item in meta.state_dict_metadata.items():
        path = (meta.planner_data or {}).get(key, tuple(key.split(".", 1)))  # (MODEL_KEY, name) for a weight
        if path[0] == MODEL_KEY and isinstance(item, TensorStorageMetadata):
            weights[".".join(map(str, path[1:]))] = torch.empty(item.size, dtype=item.properties.dtype)
    state = {MODEL_KEY: weights}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        _load(state, folder, no_dist=True)
    return state[MODEL_KEY]


def sharded_unreadable(folder: Path) -> str | None:
    """Why the DCP folder cannot be read (None if it can): its index must load, and every file it
    names must hold the bytes it points at (a write cut short leaves a file too small)."""
    meta = read_metadata(folder)
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in need.items():
        path = Path(folder) / name
        have = path.stat().st_size if path.is_file() else -1
        if have < size:
            return f"{SHARDED}/{name} holds {max(have, 0)} of its {size} bytes"
    return None
