"""Training as UNITER trains: summed and clipped accumulation, head inits, weight decay groups,
ITM negatives by picture."""
from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from vlpt.testing import TINY_MODEL, prepare_batch, tiny_model_config, tiny_pretrain_model, tiny_recipe, tiny_samples, tiny_task
from vlpt.train.optim import param_groups

from conftest import REPO


def _caption_sets(images: int, captions: int, with_meta: bool) -> list[dict]:
    """``captions`` samples per picture (COCO: 5), each picture's samples sharing its features."""
    pictures = tiny_samples(images, seed=3, regions=(2, 4), meta={} if with_meta else None)
    captions_ = tiny_samples(images * captions, seed=4)
    out = []
    for j, s in enumerate(captions_):
        pic = pictures[j % images]
        s = {**s, "features": pic["features"], "boxes": pic["boxes"], "soft_labels": pic["soft_labels"]}
        if with_meta:
            s["meta"] = {"image_id": pic["meta"]["image_id"]}
        else:
            s.pop("meta", None)
        out.append(s)
    return out


@pytest.mark.parametrize("with_meta", [True, False])
def test_itm_negatives_never_show_the_positive_picture(with_meta):
    task = tiny_task({"itm": 1.0})
    m = tiny_pretrain_model([task])
    itm = m.objectives["itm"]
    samples = _caption_sets(images=4, captions=5, with_meta=with_meta)  # 1 in 4 pool draws is the same picture
    rng = np.random.default_rng(0)
    negatives = 0
    for _ in range(20):
        for i, s in enumerate(samples):
            view = itm.prepare(dict(s), rng, samples)
            if view["itm_label"] == 0:
                negatives += 1
                assert not np.array_equal(view["features"], s["features"])  # another picture, not a copy of its own
            else:
                assert view["features"] is s["features"]
    assert 0.4 < negatives / (20 * len(samples)) < 0.6  # still p = 0.5 negatives


def test_an_accumulated_update_is_clipped_as_uniter_clips_it(tmp_path):
    """UNITER sums its micro-batches' gradients, clips the sum at 5.0 and hands it to AdamW (eps
    1e-6); vlpt averages them, so the recipe's clip and eps are UNITER's divided by the number
    of micro-batches (recipes/uniter-base.yaml): the update is UNITER's."""
    from vlpt.recipe import load_recipe
    from vlpt.train.trainer import Trainer

    n, clip, eps = 3, 0.05, 1e-6  # UNITER's accumulation steps, clip and eps (clip small: it bites)
    recipe = load_recipe(tiny_recipe(
        tmp_path, model={**TINY_MODEL, "dropout": 0.0},
        tasks={"mlm": {"weight": 1, "objectives": {"mlm": 1.0}}, "itm": {"weight": 0, "objectives": {"itm": 1.0}}},
        train={"accumulate": n, "clip": clip / n, "eps": eps / n, "lr": 1e-3, "warmup": 0, "steps": 1}))
    trainer = Trainer(recipe, resume=False)
    model, tok = trainer.model, trainer.built.tokenizer
    samples = tiny_samples(8 * n, seed=5, feature_dim=192, vocab_size=tok.vocab_size, meta={})
    batches = [prepare_batch(model, model.tasks["mlm"], samples[8 * i: 8 * i + 8], seed=i, pad_id=tok.pad_id)
               for i in range(n)]
    feed = iter(batches)

    def next_batch(name):
        b = next(feed)
        real = int(b["text_mask"].sum() + b["region_mask"].sum())
        return b, (8, real, b["text_mask"].numel() + b["region_mask"].numel())

    uniter = copy.deepcopy(model)
    trainer._next_batch = next_batch
    record = trainer.train_step(0)

    for b in batches:  # UNITER: every micro-batch's mean loss backpropagated, the gradients summed
        uniter("mlm", b)[0].backward()
    params = [p for p in uniter.parameters() if p.grad is not None]
    summed_norm = torch.nn.utils.clip_grad_norm_(params, clip)  # the sum clipped at UNITER's clip
    assert float(summed_norm) > 3 * clip  # the clip bites
    assert float(record["grad_norm"]) == pytest.approx(float(summed_norm) / n, rel=1e-5)  # vlpt's mean
    torch.optim.AdamW(param_groups(uniter, recipe.train.weight_decay), lr=1e-3, betas=tuple(recipe.train.betas),
                      eps=eps).step()
    for (name, mine), theirs in zip(model.named_parameters(), uniter.parameters()):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7), name


#: UNITER's configs: clip (grad_norm) and AdamW eps, and how many times vlpt's gradient UNITER's is:
#: it sums its micro-batches' gradients where vlpt averages them (uniter-base: 6 × 10240 tokens in
#: one pass), and its RE loss sums over the 128 expressions of a batch where vlpt's averages
UNITER_CLIP_EPS = {"uniter-base": (5.0, 1e-6, 6), "finetune/vqa": (2.0, 1e-6, 5), "finetune/ve": (2.0, 1e-6, 4),
                   "finetune/nlvr2": (2.0, 1e-6, 1), "finetune/retrieval": (2.0, 1e-6, 1),
                   "finetune/refcoco": (2.0, 1e-6, 128), "finetune/refcocog": (2.0, 1e-6, 128)}


@pytest.mark.parametrize("name", sorted(UNITER_CLIP_EPS))
def test_recipes_claiming_uniters_hyperparameters_clip_and_eps_as_it_does(name):
    """AdamW's steps depend on the gradient's scale only through eps and the clip: a recipe's clip and
    eps times the factor by which UNITER's gradient is larger must be UNITER's."""
    from vlpt.recipe import load_recipe

    train = load_recipe(REPO / "recipes" / f"{name}.yaml").train
    clip, eps, factor = UNITER_CLIP_EPS[name]
    assert train.clip * factor == pytest.approx(clip, rel=1e-6)
    assert train.eps * factor == pytest.approx(eps, rel=1e-6)


def test_mrfr_and_mrc_heads_start_as_uniters():
    tasks = [tiny_task({"mrfr": {"weight": 1.0, "tied": False}}, name="a"), tiny_task({"mrc": 1.0}, name="b"),
             tiny_task({"mrc_kl": 1.0}, name="c")]
    m = tiny_pretrain_model(tasks, tiny_model_config(hidden_size=128, heads=2, ffn_size=128))
    linears = {"mrfr.transform.0": m.objectives["mrfr"].transform[0], "mrfr.out": m.objectives["mrfr"].out}
    for name in ("mrc", "mrc_kl"):
        linears[f"{name}.transform.0"] = m.objectives[name].transform[0]
        linears[f"{name}.classifier"] = m.objectives[name].classifier
    for name, layer in linears.items():  # N(0, 0.02) weights (PyTorch's default would be U(±1/sqrt(128)), std 0.051)
        w = layer.weight.detach()
        assert abs(float(w.mean())) < 2e-3 and float(w.std()) == pytest.approx(0.02, rel=0.05), name
        assert layer.bias is None or not layer.bias.detach().any(), name


def test_weight_decay_groups_are_uniters():
    tasks = [tiny_task({"mlm": 1.0}, name="a"), tiny_task({"itm": 1.0, "wra": 0.1}, name="b"),
             tiny_task({"mrfr": 1.0}, name="c"), tiny_task({"mrc_kl": 1.0}, name="d")]
    m = tiny_pretrain_model(tasks)
    decay, no_decay = param_groups(m, 0.01)
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    # UNITER's rule is by name ('bias', 'LayerNorm.weight'): these are decayed there too
    for name in ("vl.region_embedder.feature_norm.weight", "vl.region_embedder.box_norm.weight",
                 "vl.region_embedder.mask_vector", "objectives.mrfr.transform.2.weight",
                 "objectives.mrc_kl.transform.2.weight", "vl.text_embedder.word_embeddings.weight",
                 "vl.trunk.layers.0.qkv.weight", "objectives.itm.head.weight"):
        assert name in decayed, name
    # ... and what UNITER names LayerNorm or bias is not
    for name in ("vl.text_embedder.norm.weight", "vl.region_embedder.norm.weight", "vl.trunk.layers.0.attn_norm.weight",
                 "vl.trunk.layers.1.ffn_norm.weight", "objectives.mlm.transform.2.weight", "objectives.mlm.bias",
                 "objectives.mrfr.bias", "vl.trunk.layers.0.qkv.bias"):
        assert name in exempt, name
    assert decayed | exempt == set(names.values()) and not decayed & exempt


def test_head_lr_mul_trains_the_heads_at_a_multiple_of_the_lr_throughout():
    """UNITER's VQA finetune (lr_mul 10): the answer head at 10 × the encoder's lr, warmup and decay
    alike; the same decay rule in both; with the default of 1 the optimizer keeps its two groups."""
    from vlpt.recipe import TrainConfig
    from vlpt.train.optim import build_optimizer, build_scheduler

    m = tiny_pretrain_model([tiny_task({"mlm": 1.0, "itm": 1.0})])
    assert len(build_optimizer(m, TrainConfig(lr=1e-3)).param_groups) == 2
    cfg = TrainConfig(lr=1e-3, head_lr_mul=10.0, warmup=4, steps=20)
    opt = build_optimizer(m, cfg)
    sched = build_scheduler(opt, cfg)
    names = {id(p): n for n, p in m.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in opt.param_groups]
    assert all(n.startswith("vl.") for g in groups[:2] for n in g)
    assert all(n.startswith("objectives.") for g in groups[2:] for n in g)
    assert set().union(*groups) == set(names.values())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0, 0.01, 0.0]
    for _ in range(7):
        opt.step(), sched.step()
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[2] == pytest.approx(10 * lrs[0]) and lrs[3] == pytest.approx(10 * lrs[1]) and lrs[0] > 0


def test_bench_against_uniter_names_a_missing_checkout_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--uniter", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "not a UNITER checkout" in res.stderr
    res = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--uniter" in res.stdout
