"""AdamW with UNITER's parameter groups, and warmup-then-decay schedules.

UNITER's no-decay rule is by parameter name: anything named ``bias``, ``LayerNorm.bias`` or
``LayerNorm.weight``. vlpt's rule is by kind (biases, LayerNorm weights and other 1-d parameters
take no decay), and the modules whose parameters UNITER names otherwise list them in
``decay_also``: the region embedder's feature and box LayerNorms and its mask vector, the MRFR and
MRC heads' LayerNorm. So vlpt decays exactly what UNITER decays.

The optimizer is PyTorch's fused AdamW where the device has the kernel (CPU and CUDA in torch 2.x):
one kernel over all parameters instead of a dozen element-wise passes, and it can skip a
non-finite update on the device (``found_inf``) and take the gradient clipping factor as its
``grad_scale``, so the training step never reads the device (see ``Trainer.train_step``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..recipe import TrainConfig


def decayed_anyway(model: nn.Module) -> set[int]:
    """Ids of the parameters that modules list in ``decay_also`` (names relative to the module)."""
    out: set[int] = set()
    for module in model.modules():
        for name in getattr(module, "decay_also", ()):
            out.add(id(module.get_parameter(name)))
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights; none on biases and LayerNorm weights (BERT / UNITER), except the
    parameters UNITER decays all the same (``decay_also``)."""
    decay, no_decay = [], []
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    also = decayed_anyway(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in also and (name.endswith("bias") or id(p) in norm_params or p.ndim < 2):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_supported(model: nn.Module, device: torch.device | None = None) -> bool:
    """Whether PyTorch's fused AdamW serves every parameter of ``model`` (floating point) on
    ``device`` (default: where the parameters are now)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    kinds = set(_get_fused_kernels_supported_devices())
    return all(p.is_floating_point() and (device or p.device).type in kinds for p in model.parameters())


def head_groups(model: nn.Module, weight_decay: float, lr: float, head_lr_mul: float) -> list[dict]:
    """:func:`param_groups` of the encoder (``model.vl``) at ``lr``, then those of the objectives'
    heads at ``lr × head_lr_mul``, as UNITER's VQA finetune trains its answer head (``lr_mul``). The
    schedule scales each group's own lr, so the heads keep the ratio throughout."""
    heads = nn.ModuleDict({name: m for name, m in model.named_children() if name != "vl"})
    encoder = {id(p) for p in model.vl.parameters()}  # a head tied to an encoder weight leaves it there
    return ([{**g, "lr": lr} for g in param_groups(model.vl, weight_decay)]
            + [{**g, "params": [p for p in g["params"] if id(p) not in encoder], "lr": lr * head_lr_mul}
               for g in param_groups(heads, weight_decay)])


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (with ``train.head_lr_mul`` other than 1, :func:`head_groups`:
    four groups instead of two); ``fused``: None picks the fused kernel where supported (False:
    PyTorch's default implementation)."""
    if fused is None:
        fused = fused_supported(model)
    if cfg.head_lr_mul != 1.0:  # a PretrainModel: its encoder is model.vl
        groups = head_groups(model, cfg.weight_decay, cfg.lr, cfg.head_lr_mul)
    else:  # the two groups of every run before head_lr_mul (their checkpoints' optimizer states fit)
        groups = param_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def clipped_step(optimizer: torch.optim.Optimizer, parameters, clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused AdamW update with gradient-norm clipping, all on the device: returns the norm of
    the gradients (before clipping) and a 0-d flag, 1.0 where it was not finite and the update was
    skipped (weights, Adam moments and step counts as they were).

    ``clip_grad_norm_`` multiplies every gradient by ``min(1, clip / (norm + 1e-6))``; here that
    factor's inverse is the kernel's ``grad_scale`` (it divides the gradients as it reads them), so
    no extra pass over the gradients, and ``found_inf`` makes the kernel skip a non-finite update.
    ``optimizer`` is the fused AdamW itself or a wrapper holding it as ``.optimizer`` (accelerate's),
    whose ``step`` then runs."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not inner.defaults.get("fused"):
        raise ValueError("clipped_step needs a fused AdamW (build_optimizer(..., fused=True))")
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)  # () on the device
    found_inf = (~torch.isfinite(norm)).to(torch.float32)
    inner.grad_scale = ((norm.float() + 1e-6) / clip).clamp_min(1.0) if clip else None
    inner.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        inner.grad_scale = inner.found_inf = None
    return norm, found_inf


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR at ``step`` (0-based update index)."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min(max(step - cfg.warmup, 0) / span, 1.0)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress  # linear decay to zero


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
