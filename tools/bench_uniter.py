"""vlpt's training step beside UNITER's own code: same weights, same batches (``bench.py --uniter``).

UNITER's model code is imported from a local checkout of ChenRocks/UNITER given at run time
(nothing of it is part of vlpt). Its ``model/`` imports apex's ``FusedLayerNorm``; a stand-in
module whose ``FusedLayerNorm`` is ``torch.nn.LayerNorm`` (the same math) is put in
``sys.modules`` first, so no apex is needed. Its OT ``trace`` selects diagonals with a uint8
mask, which today's ``masked_select`` refuses; it is replaced by the same sum of diagonals.

For each task (MLM, ITM, ITM+WRA, MRFR), batches are built once by vlpt's own pipeline
(``vlpt.testing.prepare_batch``: the task's ``prepare`` hooks, then the collator training uses),
then rewritten into the inputs UNITER's collate functions make (``position_ids``,
``attn_masks`` and ``gather_index`` of its packed text-then-regions rows, ``txt_labels`` with -1,
``img_masks`` / ``img_mask_tgt`` / ``feat_targets``, ``targets`` and ``ot_inputs``). vlpt's weights
are copied into ``UniterForPretraining`` (fused QKV split into query / key / value, the mask
vector into row 1 of ``mask_embedding``; the MLM decoder and the MRFR output layer are tied in
both). First, with dropout off, both compute the loss and gradients of every task on one batch:
they must agree (losses within 1e-5, each parameter's gradient within 1e-3 relative). Then full
training steps (forward, backward, clip at 5.0, optimizer step, zero_grad) are timed, vlpt and
UNITER alternating step by step in one process so that other processes' load hits both alike.
UNITER's loss per task is what its ``pretrain.py`` backpropagates (the mean of the per-element
losses its model returns; ITM + 0.1 × its OT loss for ITM+WRA); its optimizer is its own
``optim.misc.build_optimizer`` (its AdamW, its no-decay names), or with ``--uniter-optimizer
torch`` PyTorch's AdamW on the same groups. vlpt's step is the trainer's: the fused AdamW taking
the clip factor and the non-finite skip on the device (``vlpt.train.optim.clipped_step``).
"""
from __future__ import annotations

import copy
import importlib
import importlib.machinery
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from vlpt.errors import UserError

#: the side-by-side's tasks: name -> vlpt objectives (UNITER's ITM+WRA: its itm_ot_lambda = 0.1)
TASKS = {"mlm": {"mlm": 1.0}, "itm": {"itm": 1.0}, "itm+wra": {"itm": 1.0, "wra": 0.1}, "mrfr": {"mrfr": 1.0}}
LOSS_TOL = 1e-5
GRAD_RTOL = 1e-3


def load_uniter(folder: str) -> SimpleNamespace:
    """UNITER's ``model.pretrain``, ``model.model`` and ``optim.misc`` from a checkout."""
    root = Path(folder).expanduser()
    if not (root / "model" / "pretrain.py").is_file() or not (root / "optim" / "misc.py").is_file():
        raise UserError(f"--uniter '{folder}' is not a UNITER checkout (no model/pretrain.py, optim/misc.py)")

    class FusedLayerNorm(nn.LayerNorm):
        """apex's FusedLayerNorm, the same math: torch's LayerNorm."""

    apex, norm, fused = (types.ModuleType(n) for n in ("apex", "apex.normalization",
                                                        "apex.normalization.fused_layer_norm"))
    fused.FusedLayerNorm = FusedLayerNorm
    apex.normalization, norm.fused_layer_norm = norm, fused
    sys.modules.update({m.__name__: m for m in (apex, norm, fused)})
    for package in ("model", "optim"):  # UNITER's packages, found in the checkout (nothing else is looked up there)
        module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(package, None, is_package=True))
        module.__path__ = [str(root / package)]
        sys.modules[package] = module
    try:
        found = SimpleNamespace(pretrain=importlib.import_module("model.pretrain"),
                                model=importlib.import_module("model.model"),
                                misc=importlib.import_module("optim.misc"), norm=FusedLayerNorm)
        ot = importlib.import_module("model.ot")
    except ImportError as e:
        raise UserError(f"--uniter '{folder}': importing UNITER's model failed ({e})") from None
    ot.trace = lambda x: torch.diagonal(x, dim1=1, dim2=2).sum(-1)  # (B, n, n) -> (B,)
    return found


# --------------------------------------------------------------------------------------
# weights: vlpt -> UNITER
# --------------------------------------------------------------------------------------


def weight_map(layers: int) -> dict[str, str]:
    """UNITER parameter name -> vlpt's, for every one-to-one tensor (QKV and the mask vector aside)."""
    out = {
        "uniter.embeddings.word_embeddings.weight": "vl.text_embedder.word_embeddings.weight",
        "uniter.embeddings.position_embeddings.weight": "vl.text_embedder.position_embeddings.weight",
        "uniter.embeddings.token_type_embeddings.weight": "vl.text_embedder.token_type_embeddings.weight",
        "uniter.pooler.dense.weight": "vl.pooler.dense.weight",
        "uniter.pooler.dense.bias": "vl.pooler.dense.bias",
        "cls.predictions.bias": "objectives.mlm.bias",
        "feat_regress.bias": "objectives.mrfr.bias",
    }
    modules = {"uniter.embeddings.LayerNorm": "vl.text_embedder.norm",
               "uniter.img_embeddings.img_linear": "vl.region_embedder.feature_proj",
               "uniter.img_embeddings.img_layer_norm": "vl.region_embedder.feature_norm",
               "uniter.img_embeddings.pos_linear": "vl.region_embedder.box_proj",
               "uniter.img_embeddings.pos_layer_norm": "vl.region_embedder.box_norm",
               "uniter.img_embeddings.LayerNorm": "vl.region_embedder.norm",
               "cls.predictions.transform.dense": "objectives.mlm.transform.0",
               "cls.predictions.transform.LayerNorm": "objectives.mlm.transform.2",
               "feat_regress.net.0": "objectives.mrfr.transform.0",
               "feat_regress.net.2": "objectives.mrfr.transform.2",
               "itm_output": "objectives.itm.head"}
    for i in range(layers):
        u, v = f"uniter.encoder.layer.{i}.", f"vl.trunk.layers.{i}."
        modules.update({u + "attention.output.dense": v + "attn_out", u + "attention.output.LayerNorm": v + "attn_norm",
                        u + "intermediate.dense": v + "ffn_in", u + "output.dense": v + "ffn_out",
                        u + "output.LayerNorm": v + "ffn_norm"})
    for u, v in modules.items():
        out[u + ".weight"], out[u + ".bias"] = v + ".weight", v + ".bias"
    return out


def copy_weights(vlpt_model: nn.Module, uniter: nn.Module, layers: int) -> None:
    """vlpt's weights into UNITER's model (tied tensors follow their embedding / projection)."""
    ours = dict(vlpt_model.named_parameters())
    theirs = dict(uniter.named_parameters())
    with torch.no_grad():
        for u, v in weight_map(layers).items():
            theirs[u].copy_(ours[v])
        for i in range(layers):
            weights = ours[f"vl.trunk.layers.{i}.qkv.weight"].chunk(3)  # query, key, value rows
            biases = ours[f"vl.trunk.layers.{i}.qkv.bias"].chunk(3)
            for name, w, b in zip(("query", "key", "value"), weights, biases):
                theirs[f"uniter.encoder.layer.{i}.attention.self.{name}.weight"].copy_(w)
                theirs[f"uniter.encoder.layer.{i}.attention.self.{name}.bias"].copy_(b)
        mask = theirs["uniter.img_embeddings.mask_embedding.weight"]
        mask[0].zero_()
        mask[1].copy_(ours["vl.region_embedder.mask_vector"])


def uniter_grads(uniter: nn.Module, layers: int) -> dict[str, torch.Tensor]:
    """UNITER's gradients under vlpt's names (QKV concatenated, the mask vector from row 1)."""
    g = {n: p.grad for n, p in uniter.named_parameters() if p.grad is not None}
    out = {v: g[u] for u, v in weight_map(layers).items() if u in g}
    for i in range(layers):
        parts = [g.get(f"uniter.encoder.layer.{i}.attention.self.{n}.{t}") for t in ("weight", "bias")
                 for n in ("query", "key", "value")]
        if all(p is not None for p in parts):
            out[f"vl.trunk.layers.{i}.qkv.weight"] = torch.cat(parts[:3])
            out[f"vl.trunk.layers.{i}.qkv.bias"] = torch.cat(parts[3:])
    if "uniter.img_embeddings.mask_embedding.weight" in g:
        out["vl.region_embedder.mask_vector"] = g["uniter.img_embeddings.mask_embedding.weight"][1]
    return out


# --------------------------------------------------------------------------------------
# batches: vlpt's pipeline, then UNITER's input format
# --------------------------------------------------------------------------------------


def uniter_batch(b: dict, task: str) -> dict:
    """A vlpt batch as UNITER's collate functions lay it out: each row text then regions, padded
    at the end (``gather_index`` picks them from the padded text and region blocks)."""
    from vlpt.data.masking import IGNORE
    from vlpt.model.embeddings import box_features

    ids, text_mask, region_mask = b["input_ids"], b["text_mask"], b["region_mask"]
    B, T = ids.shape
    tl, nb = text_mask.sum(1).tolist(), region_mask.sum(1).tolist()
    L = max(t + k for t, k in zip(tl, nb))
    attn = torch.zeros(B, L, dtype=torch.long)
    gather = torch.arange(L).repeat(B, 1)
    for i, (t, k) in enumerate(zip(tl, nb)):
        attn[i, : t + k] = 1
        gather[i, t: t + k] = torch.arange(T, T + k)
    out = {"input_ids": ids, "position_ids": torch.arange(T)[None], "img_feat": b["features"],
           "img_pos_feat": box_features(b["boxes"]), "attn_masks": attn, "gather_index": gather}
    if task == "mlm":
        out["txt_labels"] = b["mlm_labels"].masked_fill(b["mlm_labels"] == IGNORE, -1)
    if task == "mrfr":
        masked = b["region_masked"]
        tgt = torch.zeros(B, L, dtype=torch.bool)
        for i, (t, k) in enumerate(zip(tl, nb)):
            tgt[i, t: t + k] = masked[i, :k]
        out.update(img_masks=masked, img_mask_tgt=tgt, feat_targets=b["region_targets"][masked])
    if task.startswith("itm"):
        out["targets"] = b["itm_label"]
    if task == "itm+wra":
        scatter = torch.arange(L).repeat(B, 1)  # text stays, regions move to T.. (the padded text block's end)
        for i, t in enumerate(tl):
            scatter[i, t:] = torch.arange(T, T + L - t)
        out["ot_inputs"] = {"ot_scatter": scatter, "scatter_max": int(scatter.max()),
                            "txt_pad": ~text_mask, "img_pad": ~region_mask}
    return out


def uniter_loss(model: nn.Module, batch: dict, task: str) -> torch.Tensor:
    """The loss UNITER's pretrain.py backpropagates for one batch of ``task``."""
    if not task.startswith("itm"):
        return model(batch, task, compute_loss=True).mean()
    itm, ot = model(batch, "itm", compute_loss=True)
    loss = itm.mean()
    if ot is not None:
        pos, neg = ot
        loss = loss + 0.1 * (pos.sum() - neg.sum()) / (pos.size(0) + neg.size(0))
    return loss


def make_samples(n: int, vocab: int, text_len: tuple[int, int], regions: tuple[int, int], dim: int,
                 seed: int) -> list[dict]:
    """Clean samples: [CLS] random word pieces [SEP], random regions and boxes, one picture each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t, k = int(rng.integers(text_len[0], text_len[1] + 1)), int(rng.integers(regions[0], regions[1] + 1))
        xy = rng.uniform(0.0, 0.7, size=(k, 2))
        out.append({"key": f"s{i}", "input_ids": np.array([2, *rng.integers(5, vocab, max(t - 2, 1)), 3]),
                    "features": rng.standard_normal((k, dim)).astype(np.float32),
                    "boxes": np.concatenate([xy, xy + rng.uniform(0.1, 0.3, size=(k, 2))], 1).astype(np.float32),
                    "meta": {"image_id": i}})
    return out


# --------------------------------------------------------------------------------------
# the side-by-side
# --------------------------------------------------------------------------------------


def build_pair(args, U):
    """vlpt's PretrainModel (all four tasks) and UNITER's UniterForPretraining with its weights."""
    from vlpt.testing import tiny_model_config, tiny_pretrain_model, tiny_task

    tok = SimpleNamespace(pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4, vocab_size=args.vocab_size,
                          special_ids=frozenset(range(5)))
    tasks = [tiny_task(objs, name=name) for name, objs in TASKS.items()]
    cfg = tiny_model_config(hidden_size=args.hidden, layers=args.layers, heads=args.heads, ffn_size=4 * args.hidden,
                            max_positions=max(64, args.text_len[1]), vocab_size=args.vocab_size,
                            region_feature_dim=args.feature_dim, dropout=0.1)
    ours = tiny_pretrain_model(tasks, cfg, tok, seed=args.seed)
    ucfg = U.model.UniterConfig(args.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                                hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                max_position_embeddings=cfg.max_positions, type_vocab_size=2)
    theirs = U.pretrain.UniterForPretraining(ucfg, args.feature_dim, 1601)
    copy_weights(ours, theirs, args.layers)
    return ours, theirs, tasks


def compare(ours, theirs, tasks, batches, layers: int) -> dict[str, dict]:
    """Loss and gradients of both on each task's first batch, dropout off."""
    ours.eval(), theirs.eval()
    found = {}
    for task in tasks:
        b, ub = batches[task.name][0]
        ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
        mine = ours(task.name, b)[0]
        mine.backward()
        other = uniter_loss(theirs, ub, task.name)
        other.backward()
        g_ours = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
        g_theirs = uniter_grads(theirs, layers)
        missing = sorted(set(g_ours) - set(g_theirs))
        rel = {n: float((g_ours[n] - g_theirs[n]).norm() / g_theirs[n].norm().clamp_min(1e-30))
               for n in g_ours if n in g_theirs}
        worst = max(rel, key=rel.get)
        found[task.name] = {"loss_vlpt": float(mine.detach()), "loss_uniter": float(other.detach()),
                            "loss_diff": abs(float((mine - other).detach())),
                            "grad_rel_max": rel[worst], "grad_rel_worst": worst, "grads_compared": len(rel),
                            "grads_unmatched": missing}
    ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
    return found


def uniter_optimizer(theirs, U, args, train):
    if args.uniter_optimizer == "uniter":
        opts = SimpleNamespace(optim="adamw", learning_rate=train.lr, betas=tuple(train.betas),
                               weight_decay=train.weight_decay)
        import warnings

        warnings.filterwarnings("ignore", message="This overload of add")  # its AdamW's old torch calls
        return U.misc.build_optimizer(theirs, opts)
    adam = U.misc.build_optimizer(theirs, SimpleNamespace(optim="adam", learning_rate=train.lr,
                                                          betas=tuple(train.betas), weight_decay=train.weight_decay))
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in adam.param_groups]  # its names
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=train.eps)


def _vlpt_step(model, train):
    """The trainer's step on a prepared batch: the real-token count read on the CPU, the fused
    AdamW taking the clip and the non-finite skip (vlpt.train.optim.clipped_step)."""
    from vlpt.model.packing import real_count_known
    from vlpt.train.optim import build_optimizer, clipped_step

    opt, params = build_optimizer(model, train), list(model.parameters())

    def step(name, b):
        real = int(b["text_mask"].sum() + b["region_mask"].sum())  # batch_stats, on the CPU
        with real_count_known(b, real):
            loss = model(name, b)[0]
        loss.backward()
        clipped_step(opt, params, train.clip)
        opt.zero_grad(set_to_none=True)
    return step


def _uniter_step(model, U, args, train):
    """UNITER's pretrain.py step: loss, backward, clip_grad_norm_ at grad_norm, step, zero_grad."""
    opt, params = uniter_optimizer(model, U, args, train), list(model.parameters())

    def step(name, ub):
        uniter_loss(model, ub, name).backward()
        torch.nn.utils.clip_grad_norm_(params, train.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_steps(runners: dict, tasks, batches, args) -> dict[str, dict]:
    """Median wall and CPU milliseconds per step of each runner (name -> (step, which batch: 0 vlpt's,
    1 UNITER's)), the runners taking turns step by step, each first in turn."""
    names = list(runners)
    wall = {t.name: {n: [] for n in names} for t in tasks}
    cpu = {t.name: {n: [] for n in names} for t in tasks}
    for i in range(args.warmup + args.steps):
        for task in tasks:
            pair = batches[task.name][i % len(batches[task.name])]
            shift = i % len(names)
            for who in names[shift:] + names[:shift]:
                step, side = runners[who]
                t0, c0 = time.perf_counter(), time.process_time()
                step(task.name, pair[side])
                if i >= args.warmup:
                    wall[task.name][who].append(time.perf_counter() - t0)
                    cpu[task.name][who].append(time.process_time() - c0)
    med = lambda d: {t: {n: 1e3 * statistics.median(v) for n, v in r.items()} for t, r in d.items()}  # noqa: E731
    return {"wall": med(wall), "cpu": med(cpu)}


def run(args) -> int:
    from vlpt.testing import prepare_batch

    torch.set_num_threads(args.threads)
    U = load_uniter(args.uniter)
    ours, theirs, tasks = build_pair(args, U)
    samples = make_samples(args.batch_size * args.distinct, args.vocab_size, args.text_len, args.regions,
                           args.feature_dim, args.seed)
    batches = {}
    for task in tasks:
        chunks = [samples[j: j + args.batch_size] for j in range(0, len(samples), args.batch_size)]
        made = [prepare_batch(ours, task, chunk, seed=args.seed + j) for j, chunk in enumerate(chunks)]
        batches[task.name] = [(b, uniter_batch(b, task.name)) for b in made]
    checks = compare(ours, theirs, tasks, batches, args.layers)
    ok = all(c["loss_diff"] <= LOSS_TOL and c["grad_rel_max"] <= GRAD_RTOL and not c["grads_unmatched"]
             for c in checks.values())
    from vlpt.recipe import TrainConfig

    train = TrainConfig(lr=5e-5, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.01, clip=5.0)  # UNITER's pretraining
    ours.train(), theirs.train()
    runners = {"vlpt": (_vlpt_step(ours, train), 0), "UNITER": (_uniter_step(theirs, U, args, train), 1)}
    if args.compile:  # the same weights again, with train.compile's trunk
        compiled = copy.deepcopy(ours)
        compiled.vl.trunk.compile_layers()
        runners["vlpt compiled"] = (_vlpt_step(compiled, train), 0)
    timed = time_steps(runners, tasks, batches, args)
    ms = timed["wall"]
    print(f"vlpt vs UNITER ({args.uniter}): torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; "
          f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab_size}, batch "
          f"{args.batch_size}, text {args.text_len[0]}-{args.text_len[1]} tokens, {args.regions[0]}-{args.regions[1]} "
          f"regions of {args.feature_dim}-d; UNITER's optimizer: {args.uniter_optimizer}")
    print(f"same weights, same batches, dropout off: losses within {LOSS_TOL:g}, gradients within {GRAD_RTOL:g} "
          f"relative: {'yes' if ok else 'NO'}")
    extra = "  compiled ms  speed-up" if args.compile else ""
    print(f"{'task':<8}  {'loss diff':>9}  {'max grad rel':>12}  {'vlpt ms':>8}  {'UNITER ms':>9}  {'speed-up':>8}  "
          f"{'(CPU time)':>10}{extra}")
    for name, c in checks.items():
        v, u = ms[name]["vlpt"], ms[name]["UNITER"]
        cpu = timed["cpu"][name]["UNITER"] / timed["cpu"][name]["vlpt"]
        line = (f"{name:<8}  {c['loss_diff']:>9.1e}  {c['grad_rel_max']:>12.1e}  {v:>8.1f}  {u:>9.1f}  {u / v:>7.2f}x  "
                f"{cpu:>9.2f}x")
        if args.compile:
            k = ms[name]["vlpt compiled"]
            line += f"  {k:>11.1f}  {u / k:>7.2f}x"
        print(line)
    print(f"(medians of {args.steps} timed steps per task after {args.warmup} warm-up, taking turns; a step: forward, "
          f"backward, clip at 5.0, AdamW, zero_grad; speed-up = UNITER's time / vlpt's, wall clock, and in CPU time)")
    if args.json:
        import json

        print(json.dumps({"checks": checks, "ms_per_step": ms, "cpu_ms_per_step": timed["cpu"], "ok": ok,
                          "threads": torch.get_num_threads(), "uniter_optimizer": args.uniter_optimizer}))
    return 0 if ok else 1


if __name__ == "__main__":  # a library module: the side-by-side runs through bench.py
    print("bench_uniter.py is the library behind the UNITER side-by-side; run it as\n"
          "  python tools/bench.py --uniter PATH/TO/UNITER   (see python tools/bench.py --help)", file=sys.stderr)
    sys.exit(2)
