"""Training-step throughput of vlpt against Hugging Face VisualBERT, same sizes, same batches.

What is measured
----------------
Full training steps with the data pipeline taken out: forward, backward,
gradient-norm clipping (the recipe's ``train.clip``, as ``vlpt train`` does),
AdamW step and ``zero_grad``, on batches built once before timing. Both models
are in train mode with the same dropout, start from the same seed and use the
same AdamW (vlpt's parameter groups: no weight decay on biases and LayerNorm
weights; the recipe's lr, betas, eps, weight decay; constant lr).

* **vlpt**: the recipe's trunk sizes (hidden, layers, heads, ffn, dropout,
  region feature dim D) with ``--vocab-size`` (default: the recipe's
  ``model.vocab_size``, else its tokenizer's), and ONE task holding the ``mlm``
  and ``itm`` objectives on the same forward pass (loss = MLM + ITM; an
  objective's options are taken from the recipe when it lists it).
* **VisualBERT**: ``transformers.VisualBertForPreTraining`` at identical sizes
  (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
  vocab_size, max_position_embeddings, visual_embedding_dim = D, hidden and
  attention dropout), fed the same batches: the text as input_ids /
  attention_mask / token_type_ids 0, the regions as visual_embeds (B, K, D) /
  visual_attention_mask / visual_token_type_ids 1, ``labels`` (B, T + K) with
  -100 on unmasked text and on every region position, and
  ``sentence_image_labels`` from the ITM labels (flipped: VisualBERT's 0 means
  "matched", vlpt's 1 does). Its loss is likewise MLM + ITM.

Batches: ``--batch-size`` samples each; for recipes whose first train source
is the built-in shapes data, samples are generated in memory with the shapes
generator (real captions of 6-17 tokens, 1-3 regions of D = 192, nothing
written to the cache); otherwise captions are random word pieces of
``--text-len`` tokens with ``--regions`` random regions. The MLM objective's
own masking picks 15% of the word pieces (80/10/10) and about half of each
batch's captions get another sample's image (ITM label 0). A few distinct
batches are cycled through the steps. The two models alternate step by step,
so background load hits both alike. Throughput = samples (or real, non-pad
text tokens + regions) per step over the median step time, which other
processes' bursts on a shared machine barely move (``--json`` adds the
figures over the total time, and the mean, min and max step times); the tool
notes how much CPU time other processes took during the timed steps.

Why vlpt is expected to be faster
---------------------------------
* vlpt's MLM head (transform + tied decoder over the vocabulary) runs only on
  the ~15% masked text positions; VisualBERT's pretraining head predicts the
  full vocabulary at every position, text and regions alike (B x (T + K) x V
  logits), then ignores all but the masked ones in the loss. With BERT's
  30522-word vocabulary and a small trunk this head dominates VisualBERT's step.
* vlpt's trunk uses one fused QKV projection and
  ``F.scaled_dot_product_attention``; VisualBERT's layers use three
  projections and eager matmul / softmax / dropout attention. This is a small
  effect on CPU: in train mode with attention dropout, PyTorch's CPU SDPA
  takes its math path (bmm + softmax, like eager); its fused kernels serve
  GPUs and dropout-free runs. With a tiny vocabulary (the shapes tokenizer's
  26 words, the default without ``--vocab-size``) the two steps cost about
  the same: the difference is the MLM head.
Parameter counts differ slightly (VisualBERT has visual position / type
embeddings, vlpt a box projection and extra LayerNorms in its region embedder).

    python tools/bench.py recipes/quickstart.yaml --vocab-size 30522
    python tools/bench.py recipes/quickstart.yaml --batch-size 32 --steps 10 --warmup 2 --json

Against UNITER's own code
-------------------------
``--uniter DIR`` (a local checkout of ChenRocks/UNITER; no recipe) compares vlpt's training step
with UNITER's on its MLM, ITM, ITM+WRA and MRFR tasks instead: the same weights copied into both,
the same batches (vlpt's pipeline, rewritten into UNITER's inputs), losses and gradients checked
first, then steps timed alternately (see ``tools/bench_uniter.py``). Sizes: ``--hidden``,
``--layers``, ``--heads``, ``--vocab-size``, ``--batch-size``, ``--text-len``, ``--regions``,
``--feature-dim`` (defaults: 256, 4, 4, 30522, 32, 24, 36, 2048). Exit code 1 when the two
disagree.

    mkdir -p /tmp/uniter && git --git-dir=UNITER/.git archive HEAD | tar -x -C /tmp/uniter
    python tools/bench.py --uniter /tmp/uniter --threads 2

Exit code 2 with one line on stderr for a user mistake (missing recipe, bad option).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vlpt.errors import RecipeError, UserError, run_command, tool_parser  # noqa: E402

TASK = "mlmitm"
#: distinct pre-built batches cycled through the warm-up and timed steps
DISTINCT_BATCHES = 8


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_usage() -> tuple[float, float, float] | None:
    """(wall s, CPU s busy on the whole machine, CPU s of this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF)
    except (OSError, ValueError, ImportError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user
    return time.perf_counter(), busy, ru.ru_utime + ru.ru_stime


def _other_cpu_share(start, end) -> float | None:
    """Share of the machine's CPU time that other processes used between two :func:`_cpu_usage` readings."""
    if start is None or end is None:
        return None
    wall = end[0] - start[0]
    cpus = os.cpu_count() or 1
    other = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, min(1.0, other / (wall * cpus))) if wall > 0 else None


def _range(s: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in s.split("-")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] < 1 or parts[0] > parts[1]:
        raise argparse.ArgumentTypeError(f"must look like 10-20 (min-max, min >= 1), got {s!r}")
    return parts[0], parts[1]


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def _non_negative(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {s!r}")
    return v


# --------------------------------------------------------------------------------------
# set-up: recipe, tokenizer, data
# --------------------------------------------------------------------------------------


def _bench_tasks(recipe) -> dict:
    """One task ``mlmitm`` with the recipe's mlm / itm options (if it lists them), both at weight 1."""
    from vlpt.recipe import TaskConfig

    found: dict = {}
    for task in recipe.tasks.values():
        for name, value in task.objectives.items():
            if name in ("mlm", "itm") and name not in found:
                found[name] = value
    objectives = {}
    for name in ("mlm", "itm"):
        value = found.get(name, 1.0)
        if isinstance(value, dict):
            value = {**value, "weight": 1.0}
        else:
            value = 1.0
        objectives[name] = value
    return {TASK: TaskConfig(weight=1.0, objectives=objectives)}


def _uses_shapes(recipe) -> bool:
    """The first train source is the built-in shapes data, with its own tokenizer."""
    m, train = recipe.model, recipe.data.train
    return bool(train) and train[0].shapes is not None and not m.tokenizer and not m.init_from


def _tokenizer(recipe, vocab_size: int | None):
    """(tokenizer, description): the shapes grammar's, the recipe's, or a synthetic one."""
    from vlpt.data.tokenizer import TextTokenizer

    if _uses_shapes(recipe):
        from vlpt.data.shapes import train_tokenizer

        # the same vocabulary the shapes data's tokenizer.json has, built without generating the data
        return TextTokenizer(train_tokenizer(()), "shapes grammar"), "shapes grammar"
    try:
        from vlpt.data.sources import default_tokenizer_path

        path = default_tokenizer_path(recipe)
        return TextTokenizer.from_path(path), str(path)
    except (UserError, IndexError, TypeError):  # no tokenizer file, no train source, a source without shards
        if vocab_size is None:
            raise UserError("the recipe's tokenizer is not available and model.vocab_size is not set: "
                            "pass --vocab-size") from None
        if vocab_size < 6:
            raise UserError(f"--vocab-size must be at least 6 (5 special tokens + 1 word), got {vocab_size}")
        tok = SimpleNamespace(pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4, vocab_size=vocab_size)
        tok.special_ids = frozenset(range(5))
        return tok, "synthetic ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4)"


def _model_config(recipe, vocab_size: int | None, tokenizer):
    """The recipe's sizes (vlpt's own resolution), with ``--vocab-size`` in place of the recipe's."""
    from vlpt.build import model_config

    if recipe.model.image_backbone is not None:
        raise UserError("recipes with model.image_backbone are not supported: "
                        "VisualBERT takes region features")
    mcfg = model_config(recipe, tokenizer.vocab_size)  # init_from's sizes; no weights loaded
    if vocab_size is not None:  # the flag wins, over init_from's vocabulary too
        if vocab_size < tokenizer.vocab_size:
            raise UserError(f"--vocab-size {vocab_size} is smaller than the tokenizer's vocabulary "
                            f"({tokenizer.vocab_size})")
        mcfg.vocab_size = vocab_size
    return mcfg


def _clean_samples(recipe, tokenizer, mcfg, n: int, seed: int, text_len, regions) -> tuple[list[dict], str]:
    """``n`` clean samples (input_ids with [CLS]/[SEP], features, boxes) and a description."""
    D = mcfg.region_feature_dim
    rng = np.random.default_rng(seed)
    if _uses_shapes(recipe):
        from vlpt.data.samples import BadSample, DecodeSettings, decode_sample
        from vlpt.data.shapes import FEATURE_DIM, make_sample

        shp = recipe.data.train[0].shapes
        max_len = min(recipe.data.max_text_len, mcfg.max_positions)
        settings = DecodeSettings(feature_dim=None, max_text_len=max_len, max_regions=recipe.data.max_regions)
        out: list[dict] = []
        for i in range(20 * n):
            if len(out) == n:
                break
            raw = make_sample(np.random.default_rng([shp.seed, seed, i]), shp.image_size)
            raw["txt"] = raw["txt"].encode("utf-8")
            try:
                s = decode_sample(raw, tokenizer, settings)
            except BadSample:  # a caption longer than the model takes: dropped, as training does
                continue
            if D != FEATURE_DIM:  # a recipe with another D: keep captions and boxes, random features
                s["features"] = rng.standard_normal((len(s["boxes"]), D)).astype(np.float32)
            out.append({"input_ids": s["input_ids"], "features": s["features"], "boxes": s["boxes"]})
        if len(out) < n:
            raise UserError(f"shapes captions do not fit {max_len} positions (model.max_positions / "
                            "data.max_text_len too small)")
        return out, "shapes samples generated in memory (nothing written to the cache)"
    lo, hi = text_len
    hi = min(hi, mcfg.max_positions)
    specials = np.array(sorted(tokenizer.special_ids))
    out = []
    for _ in range(n):
        L = int(rng.integers(lo, hi + 1))
        words = rng.integers(0, tokenizer.vocab_size - len(specials), size=max(L - 2, 1))
        for s in specials:  # skip the special ids
            words = words + (words >= s)
        ids = np.concatenate([[tokenizer.cls_id], words, [tokenizer.sep_id]]).astype(np.int64)
        K = int(rng.integers(regions[0], regions[1] + 1))
        xy = rng.uniform(0.0, 0.7, size=(K, 2))
        wh = rng.uniform(0.1, 0.3, size=(K, 2))
        out.append({
            "input_ids": ids,
            "features": rng.standard_normal((K, D)).astype(np.float32),
            "boxes": np.concatenate([xy, xy + wh], axis=1).astype(np.float32),
        })
    return out, f"synthetic: random word pieces, {lo}-{hi} tokens, {regions[0]}-{regions[1]} random regions"


def _build_batches(samples: list[dict], batch_size: int, model, tokenizer, seed: int) -> list[dict]:
    """Collated vlpt batches, as a training stream makes them (vlpt.testing.prepare_batch): the task's
    own MLM masking and ITM negatives (p = 0.5, drawn from the batch's samples)."""
    from vlpt.testing import prepare_batch

    task = model.tasks[TASK]
    keyed = [{**s, "key": f"s{i}"} for i, s in enumerate(samples)]
    return [prepare_batch(model, task, keyed[j: j + batch_size], seed=seed + 1 + j, pad_id=tokenizer.pad_id)
            for j in range(0, len(keyed), batch_size)]


def _visualbert_batch(b: dict) -> dict:
    from vlpt.data.masking import IGNORE

    B, K = b["region_mask"].shape
    return {
        "input_ids": b["input_ids"],
        "attention_mask": b["text_mask"].long(),
        "token_type_ids": torch.zeros_like(b["input_ids"]),
        "visual_embeds": b["features"],
        "visual_attention_mask": b["region_mask"].long(),
        "visual_token_type_ids": torch.ones(B, K, dtype=torch.long),
        "labels": torch.cat([b["mlm_labels"], torch.full((B, K), IGNORE, dtype=torch.long)], dim=1),
        "sentence_image_labels": 1 - b["itm_label"],  # VisualBERT: 0 = matched
    }


# --------------------------------------------------------------------------------------
# models and steps
# --------------------------------------------------------------------------------------


def _visualbert(mcfg, pad_id: int):
    from transformers import VisualBertConfig, VisualBertForPreTraining

    cfg = VisualBertConfig(
        vocab_size=mcfg.vocab_size,
        hidden_size=mcfg.hidden_size,
        num_hidden_layers=mcfg.layers,
        num_attention_heads=mcfg.heads,
        intermediate_size=mcfg.ffn_size,
        hidden_act="gelu",
        hidden_dropout_prob=mcfg.dropout,
        attention_probs_dropout_prob=mcfg.dropout,
        max_position_embeddings=mcfg.max_positions,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        visual_embedding_dim=mcfg.region_feature_dim,
        pad_token_id=pad_id,
    )
    return VisualBertForPreTraining(cfg)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights count once


class _Runner:
    def __init__(self, name, model, optimizer, loss_fn, batches, clip, autocast):
        self.name, self.model, self.optimizer, self.loss_fn = name, model, optimizer, loss_fn
        self.batches, self.clip, self.autocast = batches, clip, autocast
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.times: list[float] = []
        self.losses: list[float] = []
        self.samples = self.tokens = 0

    def step(self, i: int, timed: bool) -> None:
        batch = self.batches[i % len(self.batches)]
        t0 = time.perf_counter()
        with self.autocast():
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        dt = time.perf_counter() - t0
        self.losses.append(value)
        if timed:
            self.times.append(dt)
            self.samples += batch["_samples"]
            self.tokens += batch["_tokens"]

    def figures(self) -> dict:
        n, total = len(self.times), sum(self.times)
        median = statistics.median(self.times)
        return {  # per-step averages over the median step time (robust to other processes' bursts)
            "samples_per_s": self.samples / n / median,
            "tokens_per_s": self.tokens / n / median,
            "ms_per_step": 1e3 * median,
            "samples_per_s_total_time": self.samples / total,
            "tokens_per_s_total_time": self.tokens / total,
            "ms_per_step_mean": 1e3 * total / n,
            "ms_per_step_min": 1e3 * min(self.times),
            "ms_per_step_max": 1e3 * max(self.times),
            "parameters": _n_params(self.model),
            "loss_first": self.losses[0],
            "loss_last": self.losses[-1],
        }


def _vlpt_loss(model, batch):
    return model(TASK, batch)[0]


def _visualbert_loss(model, batch):
    return model(**{k: v for k, v in batch.items() if not k.startswith("_")}, return_dict=True).loss


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def run(args) -> int:
    from vlpt.recipe import load_recipe
    from vlpt.tasks import resolve_tasks
    from vlpt.model import VLModel
    from vlpt.tasks import PretrainModel
    from vlpt.train.optim import build_optimizer

    if not Path(args.recipe).is_file():
        raise RecipeError(f"recipe file '{args.recipe}' not found")
    recipe = load_recipe(args.recipe, args.overrides)
    recipe.tasks = _bench_tasks(recipe)
    tasks = resolve_tasks(recipe)
    torch.set_num_threads(args.threads)
    seed = recipe.seed if args.seed is None else args.seed

    tokenizer, tok_desc = _tokenizer(recipe, args.vocab_size or recipe.model.vocab_size)
    mcfg = _model_config(recipe, args.vocab_size, tokenizer)

    torch.manual_seed(seed)
    vlpt_model = PretrainModel(VLModel(mcfg), tasks, tokenizer)
    torch.manual_seed(seed)
    hf_model = _visualbert(mcfg, tokenizer.pad_id)
    vlpt_model.train()
    hf_model.train()

    n_batches = min(DISTINCT_BATCHES, args.warmup + args.steps)
    samples, data_desc = _clean_samples(recipe, tokenizer, mcfg, n_batches * args.batch_size, seed,
                                        args.text_len, args.regions)
    batches = _build_batches(samples, args.batch_size, vlpt_model, tokenizer, seed)
    hf_batches = []
    for b in batches:
        b["_samples"] = int(b["input_ids"].shape[0])
        b["_tokens"] = int(b["text_mask"].sum()) + int(b["region_mask"].sum())
        hb = _visualbert_batch(b)
        hb["_samples"], hb["_tokens"] = b["_samples"], b["_tokens"]
        hf_batches.append(hb)

    if args.precision == "bf16":
        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        import contextlib

        autocast = contextlib.nullcontext
    clip = recipe.train.clip
    runners = [
        _Runner("vlpt", vlpt_model, build_optimizer(vlpt_model, recipe.train), _vlpt_loss, batches,
                clip, autocast),
        _Runner("VisualBERT", hf_model, build_optimizer(hf_model, recipe.train), _visualbert_loss, hf_batches,
                clip, autocast),
    ]
    for i in range(args.warmup + args.steps):
        timed = i >= args.warmup
        if i == args.warmup:
            usage_start = _cpu_usage()
        order = runners if i % 2 == 0 else runners[::-1]  # alternate who goes first
        for r in order:
            r.step(i, timed)
    other_share = _other_cpu_share(usage_start, _cpu_usage())

    v, h = (r.figures() for r in runners)
    ratio = {k: v[k] / h[k] for k in ("samples_per_s", "tokens_per_s", "ms_per_step", "parameters")}
    text_lens = torch.cat([b["text_mask"].sum(1) for b in batches]).float()
    regions = torch.cat([b["region_mask"].sum(1) for b in batches]).float()
    masked = sum(int((b["mlm_labels"] != -100).sum()) for b in batches)
    text_tokens = sum(int(b["text_mask"].sum()) for b in batches)
    padded_T = [int(b["input_ids"].shape[1]) for b in batches]

    import transformers

    print(f"tools/bench.py {args.recipe}: torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"precision {args.precision}, {platform.processor() or platform.machine()}")
    print(f"sizes (both): hidden {mcfg.hidden_size}, layers {mcfg.layers}, heads {mcfg.heads}, "
          f"ffn {mcfg.ffn_size}, region dim {mcfg.region_feature_dim}, vocab {mcfg.vocab_size}, "
          f"max positions {mcfg.max_positions}, dropout {mcfg.dropout}")
    print(f"data: {data_desc}; tokenizer: {tok_desc}")
    print(f"batches: {args.batch_size} samples, text {int(text_lens.min())}-{int(text_lens.max())} tokens "
          f"(mean {float(text_lens.mean()):.1f}, padded to {min(padded_T)}-{max(padded_T)}), "
          f"regions {int(regions.min())}-{int(regions.max())} (mean {float(regions.mean()):.2f}), "
          f"{100 * masked / text_tokens:.1f}% of text tokens MLM-labelled, about half ITM negatives; "
          f"{len(batches)} distinct batches cycled")
    t = recipe.train
    print(f"steps: {args.steps} timed after {args.warmup} warm-up, models alternating; AdamW lr {t.lr:g} "
          f"betas {tuple(t.betas)} eps {t.eps:g} weight decay {t.weight_decay:g}; clip {clip}")
    print("figures: per step, over the median step time (mean and min/max step times in --json)")
    if other_share is not None and other_share > 0.05:
        print(f"note: other processes used {100 * other_share:.0f}% of the machine's CPU time during the "
              "timed steps; an oversubscribed multi-threaded step can be many times slower, so the absolute "
              "figures are noisy (the models alternate step by step, so the ratio is less affected)")
    print()
    def row(label, key, fmt):
        return (label, format(v[key], fmt), format(h[key], fmt), f"{ratio[key]:.2f}x")

    rows = [
        row("samples/s", "samples_per_s", ".1f"),
        row("tokens/s (real)", "tokens_per_s", ".0f"),
        row("ms/step (median)", "ms_per_step", ".1f"),
        row("parameters", "parameters", ","),
        ("loss first -> last", f"{v['loss_first']:.2f} -> {v['loss_last']:.2f}",
         f"{h['loss_first']:.2f} -> {h['loss_last']:.2f}", ""),
    ]
    head = ("", "vlpt", "VisualBERT", "vlpt/VisualBERT")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    print(f"{head[0]:<{w[0]}}  {head[1]:>{w[1]}}  {head[2]:>{w[2]}}  {head[3]:>{w[3]}}")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}")
    if args.json:
        print(json.dumps({
            "recipe": args.recipe, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "precision": args.precision, "batch_size": args.batch_size,
            "steps": args.steps, "warmup": args.warmup, "vocab_size": mcfg.vocab_size,
            "hidden_size": mcfg.hidden_size, "layers": mcfg.layers, "heads": mcfg.heads,
            "ffn_size": mcfg.ffn_size,
            "region_feature_dim": mcfg.region_feature_dim, "other_processes_cpu_share": other_share,
            "vlpt": v, "visualbert": h, "ratio": ratio,
        }))
    return 0


#: defaults that differ between the two comparisons: VisualBERT (a recipe's sizes), UNITER (--uniter)
MODE_DEFAULTS = {"visualbert": {"batch_size": 64, "text_len": (10, 20), "regions": (1, 3)},
                 "uniter": {"batch_size": 32, "text_len": (24, 24), "regions": (36, 36), "vocab_size": 30522,
                            "seed": 0}}


def main(argv=None) -> int:
    ap = tool_parser("bench", __doc__)
    ap.add_argument("recipe", nargs="?", help="recipe YAML (model sizes, optimizer settings, data); not with --uniter")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. model.layers=6")
    ap.add_argument("--vocab-size", type=_positive, default=None,
                    help="vocabulary of both models (default: model.vocab_size, else the tokenizer's); "
                         "30522 is BERT's")
    ap.add_argument("--batch-size", type=_positive, default=None, help="samples per batch (default: 64; --uniter: 32)")
    ap.add_argument("--steps", type=_positive, default=20, help="timed steps per model (default: 20)")
    ap.add_argument("--warmup", type=_non_negative, default=3,
                    help="untimed steps per model first (default: 3)")
    ap.add_argument("--threads", type=_positive, default=_cores(),
                    help="torch threads (default: the cores available)")
    ap.add_argument("--precision", choices=("no", "bf16"), default="no",
                    help="'bf16': CPU autocast to bfloat16 for both (default: no)")
    ap.add_argument("--text-len", type=_range, default=None, metavar="MIN-MAX",
                    help="caption tokens incl. [CLS]/[SEP] for non-shapes recipes (default: 10-20; --uniter: 24)")
    ap.add_argument("--regions", type=_range, default=None, metavar="MIN-MAX",
                    help="regions per sample for non-shapes recipes (default: 1-3; --uniter: 36)")
    u = ap.add_argument_group("against UNITER's code (--uniter; no recipe)")
    u.add_argument("--uniter", metavar="DIR", default=None,
                   help="compare with UNITER's code in this checkout instead of VisualBERT")
    u.add_argument("--uniter-optimizer", choices=("uniter", "torch"), default="uniter",
                   help="UNITER's own AdamW (default) or PyTorch's AdamW on its parameter groups")
    for flag, default, what in (("--hidden", 256, "hidden size"), ("--layers", 4, "layers"),
                                ("--heads", 4, "attention heads"), ("--feature-dim", 2048, "region feature size"),
                                ("--distinct", 4, "distinct batches per task")):
        u.add_argument(flag, type=_positive, default=default, help=f"{what} (default: {default})")
    u.add_argument("--compile", action="store_true",
                   help="also time vlpt with train.compile (torch.compile of the trunk's layers)")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed for weights and data (default: the recipe's)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line with the figures")
    args = ap.parse_intermixed_args(argv)  # overrides may come after the options
    mode = "uniter" if args.uniter else "visualbert"
    for key, value in MODE_DEFAULTS[mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.uniter and (args.recipe or args.overrides):
        ap.error("--uniter takes no recipe (its sizes come from --hidden, --layers, ...)")
    if not args.uniter and not args.recipe:
        ap.error("the following arguments are required: recipe")
    if args.uniter and args.hidden % args.heads:
        ap.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if args.uniter:
        import bench_uniter  # beside this file

        return run_command("bench", bench_uniter.run, args)
    return run_command("bench", run, args)


if __name__ == "__main__":
    raise SystemExit(main())
