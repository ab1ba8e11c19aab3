"""itc (contrastive, gathered across ranks), itm's hard negatives, rtd (ELECTRA), and the
VisualBERT / Unicoder-VL recipes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from vlpt import registered_objectives
from vlpt.cli import main as vlpt_main
from vlpt.testing import prepare_batch, tiny_pretrain_model, tiny_samples, tiny_task

from conftest import REPO, tiny_recipe

itc_module = sys.modules[registered_objectives()["itc"].__module__]
itm_module = sys.modules[registered_objectives()["itm"].__module__]


def _samples(n=12, seed=0):
    return tiny_samples(n, seed, text_len=(4, 9), soft_label_classes=None)


def _model(objectives: dict[str, dict]):
    """A tiny PretrainModel with one task holding ``objectives`` (name -> options), in order."""
    task = tiny_task(objectives)
    return tiny_pretrain_model([task]), task


def _batch(model, task, samples, seed=0):
    return prepare_batch(model, task, samples, seed)


def _unit_pairs(n=8, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


# -- itc ---------------------------------------------------------------------------------------


def test_itc_loss_is_symmetric_infonce():
    text, image = _unit_pairs()
    loss, similarity, acc = itc_module.contrastive_loss(text, image, torch.tensor(1 / 0.07))
    logits = text @ image.t() / 0.07
    target = torch.arange(8)
    ref = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    assert torch.allclose(loss, ref, atol=1e-6) and torch.allclose(similarity, text @ image.t())
    assert 0 <= float(acc) <= 1


def test_itc_gathered_loss_equals_single_process_loss_for_world_size_1(tmp_path):
    """The padded, differentiable all_gather path on a one-rank group gives the local loss and gradients."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        results = []
        for gather in (lambda x: (x, 0), itc_module.all_gather_rows):
            text, image = (t.clone().requires_grad_() for t in _unit_pairs())
            loss, _, _ = itc_module.contrastive_loss(text, image, torch.tensor(10.0), gather=gather)
            loss.backward()
            results.append((loss.detach(), text.grad, image.grad))
        (l0, t0, i0), (l1, t1, i1) = results
        assert torch.allclose(l0, l1) and torch.allclose(t0, t1) and torch.allclose(i0, i1)
        assert itc_module.gather_with_grad(torch.ones(3, 2))[1] == 0  # one rank: no gather at all
    finally:
        dist.destroy_process_group()


TWO_RANKS = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp, torch.nn.functional as F
    from vlpt_objectives.itc import contrastive_loss

    def run(rank, out):
        dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=2)
        g = torch.Generator().manual_seed(0)
        text = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
        image = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
        for sizes in ((4, 4), (3, 5)):  # equal batches, then token-budget-like unequal ones
            start = sum(sizes[:rank])
            t = text[start:start + sizes[rank]].clone().requires_grad_()
            v = image[start:start + sizes[rank]].clone().requires_grad_()
            loss, _, _ = contrastive_loss(t, v, torch.tensor(10.0))
            loss.backward()
            torch.save({"loss": loss.detach(), "text": t.grad, "image": v.grad}, f"{out}/{sizes[0]}-rank{rank}.pt")
        dist.barrier()
        os._exit(0)  # gloo's teardown at interpreter exit sometimes aborts ("terminate called ..."): skip it

    if __name__ == "__main__":
        mp.spawn(run, args=(sys.argv[1],), nprocs=2)
''')


def test_itc_two_ranks_match_one_process_on_the_whole_batch(tmp_path):
    """Each rank holds part of the batch; negatives come from both. The ranks' losses
    average (weighted by batch size) to the whole-batch loss, and with equal parts the
    gradient DDP applies (the ranks' mean) is the whole-batch gradient."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    text, image = (t.clone().requires_grad_() for t in _unit_pairs())
    loss, _, _ = itc_module.contrastive_loss(text, image, torch.tensor(10.0))
    loss.backward()
    for sizes in ((4, 4), (3, 5)):
        ranks = [torch.load(tmp_path / f"{sizes[0]}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert torch.allclose(sum(r["loss"] * s / 8 for r, s in zip(ranks, sizes)), loss.detach(), atol=1e-6)
    # equal parts: every rank's rows get gradient from both ranks' losses (all_gather's backward sums
    # them); DDP's mean over ranks is then exactly the whole-batch gradient
    ranks = [torch.load(tmp_path / f"4-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.allclose(torch.cat([r["text"] for r in ranks]) / 2, text.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["image"] for r in ranks]) / 2, image.grad, atol=1e-6)


def test_itc_temperature_is_learnable_and_clamped():
    model, task = _model({"itc": {"embed_dim": 8}})
    itc = model.objectives["itc"]
    assert abs(itc.temperature - 0.07) < 1e-6 and itc.logit_scale.requires_grad
    batch = _batch(model, task, _samples())
    loss, metrics = model("t", batch)
    loss.backward()
    assert itc.logit_scale.grad is not None and itc.logit_scale.grad != 0
    assert abs(float(metrics["itc/temperature"]) - 0.07) < 1e-6
    for outside, bound in ((0.001, 0.01), (2.0, 0.5)):  # below min_temperature, above max_temperature
        with torch.no_grad():
            itc.logit_scale.fill_(float(np.log(1 / outside)))
        _, metrics = model("t", batch)
        assert abs(float(metrics["itc/temperature"]) - bound) < 1e-6 and abs(itc.temperature - bound) < 1e-6
    frozen, _ = _model({"itc": {"learn_temperature": False}})
    assert not frozen.objectives["itc"].logit_scale.requires_grad


def test_itc_learns_to_pair_a_fixed_batch():
    model, task = _model({"itc": {"embed_dim": 16}})
    batch = _batch(model, task, _samples())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, accs = [], []
    for _ in range(25):
        loss, metrics = model("t", batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        accs.append(float(metrics["itc/acc"]))
    assert losses[-1] < 0.5 * losses[0] and accs[-1] > accs[0]


def _task_problem(tmp_path, objectives: dict) -> str:
    """The recipe error for one task holding ``objectives`` (checked before training), or ''."""
    from conftest import tiny_recipe
    from vlpt.errors import RecipeError
    from vlpt.recipe import load_recipe
    from vlpt.tasks import resolve_tasks

    recipe = load_recipe(tiny_recipe(tmp_path, tasks={"mlm": {"weight": 0}, "itm": {"weight": 0},
                                                      "t": {"weight": 1, "objectives": objectives}}))
    try:
        resolve_tasks(recipe)
    except RecipeError as e:
        return str(e)
    return ""


def test_itc_beside_random_itm_negatives_is_a_recipe_error(tmp_path):
    err = _task_problem(tmp_path, {"itm": 1.0, "itc": 1.0})  # itm's random negatives would swap images
    assert err.startswith("recipe key 'tasks.t.objectives.itc'") and "itc needs matched image-text pairs" in err
    assert _task_problem(tmp_path, {"itc": 1.0, "itm": {"negatives": "hard"}}) == ""


def test_itc_image_pass_sees_no_words_and_text_pass_no_regions():
    model, task = _model({"itc": {}})
    batch = _batch(model, task, _samples())
    itc = model.objectives["itc"]
    text, image = itc.embed(model.vl, batch)
    changed = dict(batch, features=torch.randn_like(batch["features"]))
    text2, image2 = itc.embed(model.vl, changed)
    assert torch.allclose(text, text2) and not torch.allclose(image, image2)
    changed = dict(batch, input_ids=torch.where(batch["text_mask"], 7, 0))
    text3, image3 = itc.embed(model.vl, changed)
    assert not torch.allclose(text, text3) and torch.allclose(image, image3)


# -- itm: hard negatives ------------------------------------------------------------------------


def test_hard_negatives_never_pick_the_positive():
    g = torch.Generator().manual_seed(0)
    for B in (2, 3, 8, 32):
        for scale in (1.0, 100.0):
            sim = torch.randn(B, B, generator=g) * scale
            sim.diagonal().add_(50.0)  # the positive far ahead: its softmax weight is ~1
            for _ in range(20):
                img, txt = itm_module.hard_negatives(sim, g)
                assert (img != torch.arange(B)).all() and (txt != torch.arange(B)).all()
                assert img.min() >= 0 and img.max() < B and txt.min() >= 0 and txt.max() < B


def test_hard_negatives_prefer_the_most_similar():
    sim = torch.zeros(4, 4)
    sim[0, 2] = 10.0  # caption 0 looks like image 2
    sim[3, 1] = 10.0  # image 1 looks like caption 3
    g = torch.Generator().manual_seed(0)
    draws = [itm_module.hard_negatives(sim, g) for _ in range(200)]
    assert np.mean([int(img[0]) == 2 for img, _ in draws]) > 0.95
    assert np.mean([int(txt[1]) == 3 for _, txt in draws]) > 0.95


def test_itm_hard_trains_beside_itc_on_3b_pairs():
    model, task = _model({"itc": {}, "itm": {"negatives": "hard"}})
    batch = _batch(model, task, _samples())
    assert (batch["itm_label"] == 1).all()  # hard mode keeps every pair matched in prepare
    calls = []
    model.vl.register_forward_hook(lambda m, args, out: calls.append(out.hidden.shape[0]))
    loss, metrics = model("t", batch)
    assert torch.isfinite(loss) and 0 <= float(metrics["itm/acc"]) <= 1
    assert calls == [12, 12, 12, 24]  # joint pass, itc's text and image passes, itm's 2B negatives
    loss.backward()
    assert all(p.grad is not None for p in model.objectives["itm"].parameters())


def test_itm_hard_without_itc_before_it_is_a_recipe_error(tmp_path):
    for objectives in ({"itm": {"negatives": "hard"}}, {"itm": {"negatives": "hard"}, "itc": 1.0}):
        err = _task_problem(tmp_path, objectives)
        assert err.startswith("recipe key 'tasks.t.objectives.itm'") and "put itc before itm" in err


def test_default_itm_is_unchanged():
    """Random negatives by default: the same draws as before hard negatives existed, same loss."""
    itm_cls = registered_objectives()["itm"]
    assert itm_cls.Options().negatives == "random" and itm_cls.Options().neg_prob == 0.5
    model, task = _model({"itm": {}})
    samples = _samples(16)
    rng, ref_rng = np.random.default_rng(3), np.random.default_rng(3)
    itm = model.objectives["itm"]
    for s in samples:
        view = itm.prepare(dict(s), rng, samples)
        label, image_of = 1, s["key"]  # the pre-existing algorithm, step by step
        if ref_rng.random() < 0.5:
            for _ in range(8):
                other = samples[ref_rng.integers(len(samples))]
                if other["key"] != s["key"]:
                    label, image_of = 0, other["key"]
                    break
        assert view["itm_label"] == label
        expected = next(o for o in samples if o["key"] == image_of)["features"]
        assert view["features"] is expected
    batch = _batch(model, task, samples)
    loss, _ = model("t", batch)
    ref = F.cross_entropy(itm.head(model.vl(batch).pooled).float(), batch["itm_label"])
    assert torch.allclose(loss, ref)


# -- rtd --------------------------------------------------------------------------------------


def test_rtd_generator_is_small_and_shares_the_word_embeddings():
    model, _ = _model({"rtd": {}})
    rtd = model.objectives["rtd"]
    assert rtd.gen_in.out_features == 16  # one head of the trunk's head size (32 / 2) at generator_size 1/4
    assert not any(p is model.vl.word_embeddings.weight for p in rtd.parameters())  # shared, not owned
    big, _ = _model({"rtd": {"generator_size": 1.0, "generator_layers": 1}})
    assert big.objectives["rtd"].gen_in.out_features == 32 and len(big.objectives["rtd"].generator.layers) == 1


def test_rtd_labels_replaced_tokens_and_learns_a_fixed_batch():
    model, task = _model({"rtd": {}})
    batch = _batch(model, task, _samples())
    selected = batch["rtd_labels"] != -100
    assert selected.any(dim=1).all() and not (selected & ~batch["text_mask"]).any()
    r = model.objectives["rtd"].detect(model.vl, batch)
    assert r["replaced"].shape == r["disc_logits"].shape == (int(batch["text_mask"].sum()),)
    assert int(r["replaced"].sum()) <= int(selected.sum())  # only selected positions can be replaced
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    history = []
    for _ in range(30):
        loss, metrics = model("t", batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v) for k, v in metrics.items()})
    assert {"rtd/loss", "rtd/gen_loss", "rtd/disc_loss", "rtd/gen_acc", "rtd/disc_acc", "rtd/replaced"} <= set(history[0])
    first, last = history[:5], history[-5:]
    for key in ("rtd/gen_loss", "rtd/loss"):
        assert np.mean([h[key] for h in last]) < 0.7 * np.mean([h[key] for h in first]), key


# -- end to end -----------------------------------------------------------------------------------


def test_itc_itm_hard_and_rtd_train_end_to_end(tmp_path):
    recipe = tiny_recipe(tmp_path, mixing="sum", train={"steps": 5, "lr": 1e-3, "warmup": 1},
                         checkpoint={"every": None, "keep": 1, "at_end": False})
    raw = yaml.safe_load(recipe.read_text())
    raw["tasks"] = {"contrast": {"weight": 1, "objectives": {"itc": {"weight": 1.0, "embed_dim": 16},
                                                             "itm": {"weight": 1.0, "negatives": "hard"}}},
                    "rtd": {"weight": 1, "objectives": {"rtd": 1.0}}}
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    res = subprocess.run([sys.executable, "-m", "vlpt.cli", "train", str(recipe)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in lines if "loss" in rec]
    assert [rec["step"] for rec in steps] == [1, 2, 3, 4, 5]
    for rec in steps:
        for key in ("itc/loss", "itc/acc", "itc/temperature", "itm/loss", "itm/acc",
                    "rtd/loss", "rtd/gen_loss", "rtd/disc_loss", "rtd/disc_acc", "rtd/replaced"):
            assert np.isfinite(rec[key]), key
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    for key in ("itc_t2i_r1", "itc_t2i_r5", "itc_i2t_r1", "itc_i2t_r10", "rtd_disc_acc", "rtd_gen_acc", "itm_acc"):
        assert 0.0 <= ev[key] <= 1.0, key


@pytest.mark.parametrize("name", ["visualbert", "unicoder-vl"])
def test_system_recipes_pass_a_dry_run(name, capsys):
    assert vlpt_main(["train", str(REPO / "recipes" / f"{name}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "mlm×1.0" in out and "itm×1.0" in out
    if name == "unicoder-vl":
        assert "mrc×1.0" in out


@pytest.mark.parametrize("module", [itm_module, itc_module])
def test_retrieval_recall_breaks_ties_at_random(module):
    assert module.recall_at(np.zeros((20, 20)), 1) == pytest.approx(0.05)  # all tied: chance, not 1 or 0
    assert module.recall_at(np.zeros((20, 20)), 10) == pytest.approx(0.5)
    s = np.eye(4) + np.array([[0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # row 0: one better
    assert module.recall_at(s, 1) == pytest.approx(0.75) and module.recall_at(s, 2) == 1.0
    s = np.array([[1.0, 1.0], [0.0, 1.0]])  # row 0 tied with one other: top-1 half the time
    assert module.recall_at(s, 1) == pytest.approx(0.75)
