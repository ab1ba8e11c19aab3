#!/usr/bin/env python
"""Add region features (``regions.npz``) to image shards with any timm backbone.

Reads webdataset shards whose samples hold an image (``jpg``/``jpeg``/``png``/``webp``,
e.g. from ``tools/captions_to_shards.py``) and writes the same shards, same names,
to ``--out`` with one more member per sample, ``regions.npz``:

* ``features``    [N, D] float16 (``--dtype float32``): each region's pooled backbone
                  feature (the model's pre-logits, D = its ``num_features``)
* ``boxes``       [N, 4] float32, normalized ``x1, y1, x2, y2``
* ``soft_labels`` [N, C] float16: softmax of the backbone's own classifier head applied
                  to each region's pooled feature (C = its classes, 1000 for ImageNet
                  models); omitted when the model has no classifier
* ``conf``        [N] float32: each region's highest class probability

How: every image is resized to S x S (``--image-size``, default the model's input size;
the aspect ratio is not kept, as with vlpt's own ``model.image_backbone``, and normalized
boxes stay valid under that resize) and normalized with the model's mean/std; the
backbone's feature map (``forward_features``) is pooled over each box with RoIAlign
(``torchvision.ops.roi_align``, ``--pool``x``--pool`` bins), then the model's head
(``forward_head``; for ViT-style models, mean over the bins + ``get_classifier()``)
gives the feature and the class logits. CNNs (ResNet, ConvNeXt, EfficientNet, ...) and
ViT-style models whose tokens form a square grid are supported.

Boxes: ``--grid G`` pools a regular G x G grid (``--grid 6``: 36 regions). Without
``--grid`` each sample's own boxes are used: ``boxes`` in its ``regions.npz`` or a
``"boxes"`` list in its ``json`` metadata, normalized ``x1, y1, x2, y2``.

A sample with a second image (``2.jpg``/``2.png``/..., NLVR2's right image from
``tools/nlvr2_to_shards.py``) gets ``2.regions.npz`` for it too, the same way (its own
boxes: ``boxes`` in ``2.regions.npz`` or a ``"boxes2"`` list in ``json``); both images of a
sample go through the same forward pass.

Weights: ``--pretrained hub`` (default) downloads the model's pretrained weights (online
only); ``--weights PATH`` loads a local ``.safetensors`` file or a PyTorch state dict
(``torch.load(weights_only=True)``: never unpickles code); ``--pretrained none`` keeps
random weights (for tests and plumbing checks only: the features mean nothing).

Everything else in a sample is copied unchanged. A sample without an image is copied
as it is; one whose image cannot be read, or whose boxes are missing or invalid, is
dropped and counted. Decoding is safe (``np.load(allow_pickle=False)``, JSON, Pillow).
Each output shard is written to a temporary name and renamed when complete, so a second
run skips the shards already done. ``tokenizer.json`` and ``answer_vocab.json`` (VQA)
beside the input shards are copied to ``--out``; ``extract_regions.json`` there records the
settings and ``D``.

Examples::

    python tools/extract_regions.py "/data/coco-raw/shard-{000000..000082}.tar" \\
        --out /data/coco --model resnet50 --grid 6 --image-size 448 --device cuda
    python tools/extract_regions.py "/data/mine/*.tar" --out /data/mine-regions \\
        --model convnext_tiny --weights convnext_tiny.safetensors --batch-size 32
    python tools/extract_regions.py shard-000000.tar --out /tmp/x --model resnet18 --pretrained none --grid 4

Then train with ``model.region_feature_dim`` = the D it prints.

Exit code 2 with one line on stderr for a user mistake (missing shard, unknown model,
unreadable weights).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vlpt.data.samples import IMAGE_EXTS, npz_bytes
from vlpt.data.shard_writer import Progress, add_member
from vlpt.errors import UserError, run_command, tool_parser

PROG = "extract_regions"
#: member prefix of each image a sample may hold: the first (``jpg``, ``regions.npz``) and a
#: second (``2.jpg``, ``2.regions.npz``: NLVR2's right image)
IMAGE_SLOTS = ("", "2.")
#: the ``json`` key with a slot's own boxes
JSON_BOXES = {"": "boxes", "2.": "boxes2"}
#: files beside the input shards copied beside the output shards (the first found)
SIDE_FILES = ("tokenizer.json", "answer_vocab.json")


class Skip(Exception):
    """A sample that is dropped; ``reason`` is its counter."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------
# the backbone
# --------------------------------------------------------------------------------------


def _load_state_dict(path: Path) -> dict:
    """A state dict from .safetensors or a torch file, without unpickling code."""
    import torch

    if not path.is_file():
        raise UserError(f"weights file '{path}' not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code: say so in one line
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise UserError(f"weights file '{path}' holds pickled Python objects besides tensors; refusing to "
                            "load it (torch.load(weights_only=True)); convert it to .safetensors if you trust it") from None
        raise UserError(f"cannot read weights '{path}': {str(e).splitlines()[0][:200]}") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise UserError(f"weights file '{path}' does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def create_backbone(name: str, pretrained: str, weights: str | None):
    """The timm model in eval mode (classifier head included)."""
    import timm

    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        from difflib import get_close_matches

        close = get_close_matches(name, timm.list_models(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown timm model '{name}'{hint}")
    if weights is not None:
        sd = _load_state_dict(Path(weights).expanduser())
        model = timm.create_model(name, pretrained=False)
        clf = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        clf_key = f"{clf}.weight" if isinstance(clf, str) else None
        has_head = clf_key in sd if clf_key else True
        if clf_key and has_head and sd[clf_key].shape[0] != model.num_classes:
            model = timm.create_model(name, pretrained=False, num_classes=int(sd[clf_key].shape[0]))
        if not has_head:
            model = timm.create_model(name, pretrained=False, num_classes=0)
        result = model.load_state_dict(sd, strict=False)
        if result.missing_keys or result.unexpected_keys:
            m, u = result.missing_keys, result.unexpected_keys
            raise UserError(f"weights '{weights}' do not fit timm model '{name}': {len(m)} missing key(s) "
                            f"{m[:3]}, {len(u)} unexpected key(s) {u[:3]}")
    elif pretrained == "hub":
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as e:
            raise UserError(f"could not load pretrained weights of '{name}' from the hub "
                            f"({type(e).__name__}; offline?): pass --weights PATH, or --pretrained none "
                            "for random weights") from None
    else:
        model = timm.create_model(name, pretrained=False)
    return model.eval()


class RegionExtractor:
    """Images (B, 3, S, S) in [0, 1] + boxes per image -> features, soft labels, conf per region."""

    def __init__(self, model, image_size: int, pool: int, device):
        import torch

        self.model = model.to(device)
        self.device = device
        self.S, self.pool = image_size, pool
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=device).view(1, 3, 1, 1)
        self.num_features = int(model.num_features)
        clf = model.get_classifier() if hasattr(model, "get_classifier") else None
        self.classifier = None if clf is None or isinstance(clf, torch.nn.Identity) else clf
        self.num_classes = int(getattr(model, "num_classes", 0) or 0) if self.classifier is not None else 0
        self.token_model = False

    def _feature_map(self, x):
        fmap = self.model.forward_features(x)
        if isinstance(fmap, (list, tuple)):
            fmap = fmap[-1]
        if fmap.dim() == 3:  # ViT-like tokens (B, prefix + g*g, C)
            self.token_model = True
            prefix = int(getattr(self.model, "num_prefix_tokens", 0))
            tokens = fmap[:, prefix:]
            g = int(round(tokens.shape[1] ** 0.5))
            if g * g != tokens.shape[1]:
                raise UserError(f"the model's {tokens.shape[1]} tokens do not form a square grid")
            return tokens.transpose(1, 2).reshape(fmap.shape[0], -1, g, g)
        if fmap.dim() == 4 and fmap.shape[1] != self.num_features and fmap.shape[-1] == self.num_features:
            fmap = fmap.permute(0, 3, 1, 2)  # NHWC (e.g. Swin) -> NCHW
        return fmap

    def _head(self, maps):
        """RoI maps (R, C, p, p) -> pre-logit features (R, D) and logits (R, classes) or None."""
        import torch

        if not self.token_model:
            try:
                pre = self.model.forward_head(maps, pre_logits=True)
                if pre.dim() == 2:
                    return pre, (self.classifier(pre) if self.classifier is not None else None)
            except Exception:
                pass
        pre = maps.mean(dim=(2, 3))
        norm = getattr(self.model, "fc_norm", None)
        if self.token_model and isinstance(norm, torch.nn.Module) and not isinstance(norm, torch.nn.Identity):
            pre = norm(pre)
        return pre, (self.classifier(pre) if self.classifier is not None else None)

    def __call__(self, images: np.ndarray, boxes: list[np.ndarray], autocast) -> list[dict]:
        import torch
        from torchvision.ops import roi_align

        with torch.inference_mode(), autocast():
            x = torch.from_numpy(images).to(self.device)
            x = (x - self.mean) / self.std
            fmap = self._feature_map(x).float()
            rois = torch.cat([
                torch.cat([torch.full((len(b), 1), float(i)), torch.from_numpy(b).float() * self.S], 1)
                for i, b in enumerate(boxes)]).to(self.device)
            maps = roi_align(fmap, rois, output_size=(self.pool, self.pool),
                             spatial_scale=fmap.shape[-1] / self.S, sampling_ratio=2, aligned=True)
            feats, logits = self._head(maps)
            feats = feats.float().cpu().numpy()
            probs = torch.softmax(logits.float(), dim=-1).cpu().numpy() if logits is not None else None
        out, start = [], 0
        for b in boxes:
            n = len(b)
            r = {"features": feats[start:start + n], "boxes": b.astype(np.float32)}
            if probs is not None:
                r["soft_labels"] = probs[start:start + n]
                r["conf"] = probs[start:start + n].max(axis=1).astype(np.float32)
            out.append(r)
            start += n
        return out


# --------------------------------------------------------------------------------------
# samples
# --------------------------------------------------------------------------------------


def grid_boxes(g: int) -> np.ndarray:
    """(g*g, 4) normalized x1, y1, x2, y2 of a g x g grid, row-major."""
    y, x = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    return np.stack([x / g, y / g, (x + 1) / g, (y + 1) / g], -1).reshape(-1, 4).astype(np.float32)


def sample_boxes(raw: dict, slot: str = "") -> np.ndarray:
    """An image's own normalized boxes: ``{slot}regions.npz`` ``boxes``, else the ``json`` list
    ``"boxes"`` (the second image's: ``"boxes2"``)."""
    boxes = None
    if slot + "regions.npz" in raw:
        try:
            with np.load(io.BytesIO(raw[slot + "regions.npz"]), allow_pickle=False) as z:
                if "boxes" in z.files:
                    boxes = z["boxes"]
        except Exception:
            raise Skip("bad_regions") from None
    if boxes is None and "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except Exception:
            raise Skip("bad_json") from None
        if isinstance(meta, dict) and JSON_BOXES[slot] in meta:
            try:
                boxes = np.asarray(meta[JSON_BOXES[slot]], dtype=np.float32)
            except (TypeError, ValueError):
                raise Skip("bad_boxes") from None
    if boxes is None:
        raise Skip("no_boxes")
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0 or not np.isfinite(boxes).all():
        raise Skip("bad_boxes")
    if boxes.min() < -0.01 or boxes.max() > 1.01:
        raise Skip("bad_boxes")  # not normalized
    boxes = boxes.clip(0.0, 1.0)
    if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
        raise Skip("bad_boxes")
    return boxes


def load_image(data: bytes, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (size, size))
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            return (np.asarray(im, dtype=np.float32) / 255.0).transpose(2, 0, 1)
    except Exception:
        raise Skip("bad_image") from None


def read_samples(url: str, counts: dict):
    """Raw samples (bytes per extension) of one shard, in order."""
    from vlpt.data.stream import read_tar_samples

    def on_error(reason, detail=""):
        counts[reason] = counts.get(reason, 0) + 1

    yield from read_tar_samples(url, on_error)


def write_sample(tar: tarfile.TarFile, raw: dict, regions: dict[str, bytes]) -> None:
    """The sample's members as they were, except the ``regions`` members (name -> npz bytes), added last."""
    key = raw["__key__"]
    for ext, value in raw.items():
        if ext.startswith("__") or ext in regions:
            continue
        if isinstance(value, str):
            value = value.encode("utf-8")
        add_member(tar, f"{key}.{ext}", value)
    for ext, data in regions.items():
        add_member(tar, f"{key}.{ext}", data)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def expand_inputs(patterns: list[str]) -> list[str]:
    """Input shards (paths, brace patterns, globs); their names must differ, since outputs keep them."""
    from vlpt.data.inspect import expand

    urls = expand(patterns)
    names = [Path(u.split("://")[-1]).name for u in urls]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UserError(f"two input shards share the name '{sorted(dup)[0]}': outputs keep the input names")
    return urls


def copy_side_files(urls: list[str], out: Path) -> None:
    """Files beside the input shards that serve the output too (the tokenizer, VQA's answers)."""
    for name in SIDE_FILES:
        side = next((Path(u).parent / name for u in urls if "://" not in u and (Path(u).parent / name).is_file()), None)
        if side is not None and not (out / name).exists():
            shutil.copyfile(side, out / name)


def process_shard(url: str, dest: Path, extractor: RegionExtractor, args, counts: dict, bar, pool, autocast) -> int:
    """Write one output shard; returns the samples written."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    written = 0
    grid = grid_boxes(args.grid) if args.grid else None
    feat_dtype = np.float16 if args.dtype == "float16" else np.float32

    def prepare(raw):
        """(raw, [(slot, image, boxes)] for each image of the sample, reason it is dropped or None)."""
        try:
            images = []
            for slot in IMAGE_SLOTS:
                img_key = next((slot + e for e in IMAGE_EXTS if slot + e in raw), None)
                if img_key is not None:
                    boxes = grid if grid is not None else sample_boxes(raw, slot)
                    images.append((slot, load_image(raw[img_key], extractor.S), boxes))
            return raw, images, None if images else "no_image"
        except Skip as s:
            return raw, [], s.reason

    def regions_npz(r: dict) -> bytes:
        arrays = {"features": r["features"].astype(feat_dtype), "boxes": r["boxes"]}
        if "soft_labels" in r and not args.no_soft_labels:
            arrays["soft_labels"] = r["soft_labels"].astype(feat_dtype)
            arrays["conf"] = r["conf"]
        return npz_bytes(arrays)

    def flush(tar, batch):
        nonlocal written
        prepared = list(pool.map(prepare, batch))
        todo = [im for _, images, reason in prepared if reason is None for im in images]
        results = iter(extractor(np.stack([t[1] for t in todo]), [t[2] for t in todo], autocast) if todo else [])
        for raw, images, reason in prepared:  # input order
            if reason == "no_image":
                counts["no_image (copied unchanged)"] = counts.get("no_image (copied unchanged)", 0) + 1
                write_sample(tar, raw, {})
                written += 1
            elif reason is not None:
                counts[reason] = counts.get(reason, 0) + 1
            else:
                write_sample(tar, raw, {f"{slot}regions.npz": regions_npz(next(results)) for slot, _, _ in images})
                written += 1
        bar.update(len(batch), ", ".join(f"{k} {v}" for k, v in counts.items()))

    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            batch: list[dict] = []
            for raw in read_samples(url, counts):
                batch.append(raw)
                if len(batch) == args.batch_size:
                    flush(tar, batch)
                    batch = []
            if batch:
                flush(tar, batch)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def run(args) -> int:
    if args.batch_size < 1 or args.pool < 1 or args.workers < 1:
        raise UserError("--batch-size, --pool and --workers must be at least 1")
    if args.grid is not None and not 1 <= args.grid <= 32:
        raise UserError(f"--grid must be in 1..32, got {args.grid}")
    urls = expand_inputs(args.shards)
    out = Path(args.out)
    for u in urls:
        if "://" not in u and Path(u).resolve().parent == out.resolve():
            raise UserError("--out must not be the input shards' folder (outputs keep the input names)")

    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"unknown --device '{args.device}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_backbone(args.model, args.pretrained, args.weights)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = args.image_size or int((cfg.get("input_size") or (3, 224, 224))[-1])
    extractor = RegionExtractor(model, size, args.pool, device)
    if args.precision == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        import contextlib

        autocast = contextlib.nullcontext

    settings = {"model": args.model, "weights": args.weights, "pretrained": args.pretrained if not args.weights else None,
                "image_size": size, "pool": args.pool, "grid": args.grid, "dtype": args.dtype,
                "soft_labels": not args.no_soft_labels and extractor.num_classes > 0}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "extract_regions.json"
    names = [Path(u.split("://")[-1]).name for u in urls]
    done = [n for n in names if (out / n).is_file()]
    if done:
        try:
            old = json.loads(info_path.read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError):
            old = None
        if old != fingerprint:
            if not args.overwrite:
                raise UserError(f"'{out}' already holds {len(done)} of these shards written with other settings "
                                "(or by something else); pass --overwrite to replace them, or choose another --out")
            for n in done:
                (out / n).unlink()
            done = []
    for stale in out.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)

    # dry-run the model once to learn D (and catch unsupported models before any shard)
    probe = extractor(np.zeros((1, 3, size, size), np.float32), [grid_boxes(1)], autocast)[0]
    feature_dim = int(probe["features"].shape[1])
    info = {"fingerprint": fingerprint, **settings, "feature_dim": feature_dim,
            "num_classes": extractor.num_classes if settings["soft_labels"] else 0}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    if done:
        print(f"{PROG}: {len(done)} of {len(urls)} shard(s) already complete in {out}; skipping them", file=sys.stderr)

    copy_side_files(urls, out)

    counts: dict[str, int] = {}
    written = 0
    bar = Progress(None, PROG, disable=args.quiet)
    try:
        with ThreadPoolExecutor(args.workers) as pool:
            for u, name in zip(urls, names):
                if name in done:
                    continue
                written += process_shard(u, out / name, extractor, args, counts, bar, pool, autocast)
    finally:
        bar.close()
    print(f"{PROG}: wrote {written} samples in {len(urls) - len(done)} shard(s) to {out}: features D = {feature_dim}"
          + (f", soft_labels over {info['num_classes']} classes" if info["num_classes"] else ", no soft_labels")
          + f" (train with model.region_feature_dim={feature_dim})", file=sys.stderr)
    if counts:
        print(f"{PROG}: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), file=sys.stderr)
    if counts.get("no_boxes"):
        print(f"{PROG}: samples without boxes were dropped; --grid G pools a regular grid instead", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("extract_regions", __doc__)
    p.add_argument("shards", nargs="+", help="input shards: paths, brace patterns or globs (quote them)")
    p.add_argument("--out", required=True, help="output folder (shards keep their names)")
    p.add_argument("--model", default="resnet50", help="any timm model name (default: resnet50)")
    p.add_argument("--pretrained", choices=("hub", "none"), default="hub",
                   help="hub: the model's pretrained weights (online); none: random weights (default: hub)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="local weights: .safetensors or a PyTorch state dict (loaded with weights_only=True)")
    p.add_argument("--grid", type=int, default=None, metavar="G", help="pool a G x G grid of boxes (default: "
                   "the sample's own boxes)")
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="images are resized to S x S (default: the model's input size)")
    p.add_argument("--pool", type=int, default=7, help="RoIAlign bins per side (default: 7)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="samples per forward pass; a sample with two images brings both (default: 16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (default: fp32)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="stored features and soft labels (default: float16)")
    p.add_argument("--no-soft-labels", action="store_true", help="store no soft_labels/conf")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images (default: 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="replace output shards written with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return run_command(PROG, run, args, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
