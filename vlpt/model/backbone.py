"""An optional timm image backbone whose feature map becomes grid regions.

A grid of backbone features is the same thing as regions whose boxes are the
grid cells (ViLT / Pixel-BERT), so the one region embedder serves detector
regions, CNN grids and ViT patches alike.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError


def grid_boxes(h: int, w: int, device=None) -> torch.Tensor:
    """(h·w, 4) normalized x1, y1, x2, y2 of an h×w grid, row-major."""
    ys = torch.arange(h, device=device, dtype=torch.float32)
    xs = torch.arange(w, device=device, dtype=torch.float32)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x / w, y / h, (x + 1) / w, (y + 1) / h], dim=-1).reshape(-1, 4)


def create_timm_model(name: str, pretrained: str | None, **kwargs) -> nn.Module:
    """``timm.create_model`` with weights from a local file, the hub (``"hub"``) or none."""
    import timm

    try:
        if pretrained is None:
            return timm.create_model(name, pretrained=False, **kwargs)
        if pretrained == "hub":
            return timm.create_model(name, pretrained=True, **kwargs)
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UserError(f"backbone weights file '{pretrained}' not found")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"unknown timm model '{name}' ({e})") from None
        raise


class GridBackbone(nn.Module):
    """Images (B, 3, S, S) -> grid regions: features (B, h·w, C) and boxes (B, h·w, 4)."""

    def __init__(self, name: str, pretrained: str | None = None, frozen: bool = True):
        super().__init__()
        self.net = create_timm_model(name, pretrained, num_classes=0, global_pool="")
        self.frozen = frozen
        self.num_features = int(self.net.num_features)
        if frozen:
            self.net.requires_grad_(False)
            self.net.eval()
        cfg = getattr(self.net, "pretrained_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.net.eval()  # frozen batch-norm statistics stay frozen
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images - self.mean) / self.std
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            fmap = self.net.forward_features(x)
        if fmap.dim() == 4:  # CNN: (B, C, h, w)
            B, C, h, w = fmap.shape
            feats = fmap.flatten(2).transpose(1, 2)  # (B, h·w, C)
        else:  # ViT-like: (B, prefix + h·w, C)
            prefix = int(getattr(self.net, "num_prefix_tokens", 0))
            feats = fmap[:, prefix:]
            n = feats.shape[1]
            h = w = int(math.isqrt(n))
            if h * w != n:
                raise UserError(f"backbone tokens ({n}) do not form a square grid")
            B = feats.shape[0]
        boxes = grid_boxes(h, w, device=feats.device).expand(B, -1, -1)
        return feats, boxes
