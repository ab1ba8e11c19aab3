"""The Accelerator of a run: precision, DDP settings, CPU ranks, trackers."""
from __future__ import annotations

import os
import sys

import torch

from ..errors import UserError
from ..recipe import Recipe
from .sharded import enable_fsdp_on_cpu_ranks


def tracker_names(recipe: Recipe) -> list[str]:
    """The recipe's trackers, checked to be known and installed (a missing extra is a user error)."""
    known = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in recipe.log.trackers:
        if name not in known:
            raise UserError(f"log.trackers: unknown tracker {name!r}; known: {', '.join(known)}")
        try:
            __import__(known[name] if name != "tensorboard" else "torch.utils.tensorboard")
        except ImportError:
            raise UserError(f"log.trackers: {name} is not installed; pip install 'vlpt[{name}]'") from None
    return list(recipe.log.trackers)


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    precision = recipe.train.precision
    if precision == "fp16" and not torch.cuda.is_available():
        print("vlpt: train.precision=fp16 needs a GPU; on CPU accelerate runs fp32 (use bf16 on CPU)", file=sys.stderr)
    # With task sampling, each update uses only its task's heads: DDP must expect unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=len(recipe.tasks) > 1 or recipe.mixing == "sample")
    # several processes and no GPU (e.g. torchrun on CPUs): accelerate only sets up gloo ranks when told cpu=True
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    trackers = tracker_names(recipe)
    accelerator = Accelerator(mixed_precision=precision, kwargs_handlers=[ddp], cpu=multi_cpu,
                              log_with=trackers or None, project_dir=recipe.output_dir if trackers else None)
    enable_fsdp_on_cpu_ranks(accelerator)  # an FSDP launch on CPU ranks: accelerate alone would run DDP
    return accelerator
