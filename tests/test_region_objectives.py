"""Masked region modeling, WRA wiring and the recipe checks of issue-3 objectives; the values and
directions of the WRA, MRC and MRC-kl losses on hand-made batches."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlpt import registered_objectives
from vlpt.data.masking import mask_sample_regions
from vlpt.model import VLModel
from vlpt.recipe import ModelConfig

from conftest import tiny_recipe


def test_mrm_masking_zeroes_features_keeps_boxes_and_targets():
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(3000):
        k = int(rng.integers(1, 40))
        feats = rng.normal(size=(k, 8)).astype(np.float32) + 5.0
        boxes = rng.random((k, 4)).astype(np.float32)
        s = mask_sample_regions({"features": feats, "boxes": boxes}, rng, 0.15)
        sel = s["region_masked"]
        assert sel.any(), "at least one region is masked"
        assert (s["features"][sel] == 0).all() and (s["features"][~sel] == feats[~sel]).all()
        assert (s["region_targets"] == feats).all() and s["boxes"] is boxes
        rates.append(sel.mean() if k >= 20 else np.nan)
    assert abs(np.nanmean(rates) - 0.15) < 0.01


def test_joint_masking_keeps_one_region_mask():
    rng = np.random.default_rng(1)
    s = mask_sample_regions({"features": np.ones((10, 4), np.float32), "boxes": np.zeros((10, 4))}, rng, 0.5)
    again = mask_sample_regions(s, rng, 0.5)
    assert again["region_masked"] is s["region_masked"]  # a second region objective reuses the mask


def test_mrfr_output_weight_is_tied_to_region_projection():
    cls = registered_objectives()["mrfr"]
    vl = VLModel(ModelConfig(hidden_size=16, layers=1, heads=2, ffn_size=32, vocab_size=20, region_feature_dim=6))
    tied = cls(cls.Options(), vl, None)
    untied = cls(cls.Options(tied=False), vl, None)
    assert not any(p is vl.region_embedder.feature_proj.weight for p in tied.parameters())  # shared, not owned
    h = torch.randn(5, 16)
    before = tied.predict(h, vl).detach().clone()
    with torch.no_grad():
        vl.region_embedder.feature_proj.weight.mul_(2.0)
    assert not torch.allclose(tied.predict(h, vl), before)  # prediction moves with W_f
    tied.predict(h, vl).sum().backward()
    assert vl.region_embedder.feature_proj.weight.grad is not None
    assert untied.out is not None and untied.out.weight.shape == (6, 16)


def _vlpt(*args):
    return subprocess.run([sys.executable, "-m", "vlpt.cli", *args], capture_output=True, text=True, timeout=300)


def test_wra_without_itm_is_a_recipe_error(tmp_path):
    res = _vlpt("train", str(tiny_recipe(tmp_path)), "tasks.mlm.objectives.wra=0.1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "wra uses 'itm_label', which no objective before it in task 'mlm' provides" in res.stderr


def test_mrc_on_data_without_soft_labels_fails_before_training(tmp_path):
    import io

    import webdataset as wds

    shards = tmp_path / "nosoft-000000.tar"
    with wds.TarWriter(str(shards)) as w:
        for i in range(20):
            buf = io.BytesIO()
            np.savez(buf, features=np.zeros((3, 192), np.float32), boxes=np.zeros((3, 4), np.float32))
            w.write({"__key__": f"s{i}", "txt": "a large red circle", "regions.npz": buf.getvalue()})
    from vlpt.data.shapes import train_tokenizer

    train_tokenizer(["a large red circle"]).save(str(tmp_path / "tokenizer.json"))
    recipe = tiny_recipe(tmp_path, data={"train": [{"shards": str(shards)}], "val": None},
                         tasks={"mrc": {"weight": 1, "objectives": {"mrc": {"weight": 1, "num_classes": 33}}}})
    res = _vlpt("train", str(recipe), f"model.tokenizer={tmp_path / 'tokenizer.json'}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "need image+text and 'soft_labels' (read by mrc)" in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_quickstart_uniter_recipes_validate():
    from vlpt.recipe import load_recipe
    from vlpt.tasks import resolve_tasks
    from conftest import REPO

    r = load_recipe(REPO / "recipes" / "quickstart-uniter.yaml")
    assert {t.name for t in resolve_tasks(r)} == {"itm", "mlm", "mrfr", "mrc_kl"}
    j = resolve_tasks(load_recipe(REPO / "recipes" / "quickstart-uniter-joint.yaml"))
    assert {t.name for t in j} == {"itm", "joint"}
    assert [o.name for o in j[1].objectives] == ["mlm", "mrfr", "mrc_kl"]


# -- values and directions of the region losses ------------------------------------------------
def _objective(name, **options):
    from vlpt import get_objective
    from vlpt.testing import TinyTokenizer, tiny_model_config

    cls = get_objective(name)
    return cls(cls.Options(**options), VLModel(tiny_model_config()), TinyTokenizer())


def _padded_masks(text_lens, region_lens):
    T, K = max(text_lens), max(region_lens)
    text_mask = torch.arange(T)[None] < torch.tensor(text_lens)[:, None]  # (B, T)
    region_mask = torch.arange(K)[None] < torch.tensor(region_lens)[:, None]  # (B, K)
    return text_mask, region_mask


def _exact_ot_distances(hidden, text_mask, region_mask):
    """Exact OT distance of every pair (POT's network simplex), cost 1 - cos, uniform marginals."""
    import ot

    T = text_mask.shape[1]
    out = []
    for b in range(hidden.shape[0]):
        x = hidden[b, :T][text_mask[b]].detach().double().numpy()  # (n, H)
        y = hidden[b, T:][region_mask[b]].detach().double().numpy()  # (m, H)
        x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
        cost = 1 - x @ y.T  # (n, m)
        out.append(ot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), cost))
    return np.array(out)


def test_wra_loss_is_matched_minus_mismatched_ot_distance_and_a_step_lowers_the_matched():
    from vlpt import EncoderOutput

    torch.manual_seed(0)
    wra = _objective("wra")
    text_mask, region_mask = _padded_masks([7, 5, 6, 4], [5, 3, 4, 5])
    T = text_mask.shape[1]
    label = torch.tensor([1, 1, 0, 1])
    batch = {"text_mask": text_mask, "region_mask": region_mask, "itm_label": label}
    hidden = torch.randn(4, T + region_mask.shape[1], 16, requires_grad=True)  # (B, T + K, H)
    out = EncoderOutput(hidden=hidden, pooled=hidden[:, 0], text_len=T, model=None, shared={"itm_label": label})
    res = wra(out, batch)  # the labels as itm, before wra in the task, leaves them
    d = _exact_ot_distances(hidden, text_mask, region_mask)
    pos = label.numpy() == 1
    assert float(res.loss.detach()) == pytest.approx((d[pos].sum() - d[~pos].sum()) / 4, abs=1e-3)
    assert float(res.metrics["pos_distance"]) == pytest.approx(d[pos].mean(), abs=1e-3)

    res.loss.backward()
    with torch.no_grad():
        stepped = hidden - 2.0 * hidden.grad
    after = _exact_ot_distances(stepped, text_mask, region_mask)
    assert (after[pos] < d[pos] - 1e-3).all(), (d, after)  # matched pairs pulled together
    assert (after[~pos] > d[~pos] + 1e-3).all(), (d, after)  # mismatched pairs pushed apart


def _region_logits_case(num_classes=6):
    """Masked-region heads replaced by an identity: the region states are the class logits."""
    torch.manual_seed(1)
    masked = torch.tensor([[True, False, True], [False, True, False]])  # (B, K)
    logits = torch.randn(2, 3, num_classes) * 2  # (B, K, C)
    text = torch.zeros(2, 4, num_classes)  # (B, T, C)
    out_hidden = torch.cat([text, logits], dim=1)
    return masked, logits, out_hidden


def test_mrc_target_is_the_detector_argmax_excluding_background():
    from vlpt import EncoderOutput

    C = 6
    mrc = _objective("mrc", num_classes=C)
    mrc.transform, mrc.classifier = nn.Identity(), nn.Identity()
    masked, logits, hidden = _region_logits_case(C)
    soft = torch.full((2, 3, C), 0.02)
    best = torch.tensor([[3, 1, 5], [2, 4, 1]])  # the best object class of every region
    soft.scatter_(2, best[..., None], 0.3)
    soft[..., 0] = 0.6  # background is the detector's top class everywhere: never the target
    out = EncoderOutput(hidden=hidden, pooled=hidden[:, 0], text_len=4, model=None)
    res = mrc(out, {"region_masked": masked, "soft_labels": soft})
    expected = F.cross_entropy(logits[masked], best[masked])
    assert torch.allclose(res.loss, expected, atol=1e-6), (res.loss, expected)
    # a head that puts its top logit on the best object class is right on every masked region
    sure = torch.cat([hidden[:, :4], F.one_hot(best, C).float() * 10], dim=1)
    res = mrc(EncoderOutput(hidden=sure, pooled=sure[:, 0], text_len=4, model=None),
              {"region_masked": masked, "soft_labels": soft})
    assert float(res.metrics["acc"]) == 1.0 and float(res.loss) < 1e-3


@pytest.mark.parametrize("reduction", ["elements", "regions"])
def test_mrc_kl_is_kl_of_detector_to_model_by_hand(reduction):
    from vlpt import EncoderOutput

    C = 6
    kl_obj = _objective("mrc_kl", num_classes=C, reduction=reduction)
    kl_obj.transform, kl_obj.classifier = nn.Identity(), nn.Identity()
    masked, logits, hidden = _region_logits_case(C)
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(C), size=(2, 3))  # (B, K, C) the detector's distribution
    soft = torch.tensor(p * 3.0, dtype=torch.float32)  # unnormalized: the objective normalizes it
    res = kl_obj(EncoderOutput(hidden=hidden, pooled=hidden[:, 0], text_len=4, model=None),
                 {"region_masked": masked, "soft_labels": soft})
    q = torch.softmax(logits.double(), -1).numpy()[masked.numpy()]  # (n, C) the model's
    target = p[masked.numpy()]  # (n, C)
    per_element = target * (np.log(target) - np.log(q))  # KL(detector ‖ model), term by term
    expected = per_element.mean() if reduction == "elements" else per_element.sum(-1).mean()
    assert float(res.loss) == pytest.approx(expected, rel=1e-5)


def _parameter_count(hidden, layers, ffn, vocab, positions, feature_dim):
    """vlpt's model size by formula: BERT's embeddings, layers and pooler plus UNITER's region
    embedder (W_f, W_b on 7 box features, three LayerNorms, the mask vector). Returns (all, words)."""
    H = hidden
    layer = (H * 3 * H + 3 * H) + (H * H + H) + 2 * H + (H * ffn + ffn) + (ffn * H + H) + 2 * H
    text = vocab * H + positions * H + 2 * H + 2 * H
    region = (feature_dim * H + H) + 2 * H + (7 * H + H) + 2 * H + 2 * H + feature_dim
    return layers * layer + text + region + (H * H + H), vocab * H


@pytest.mark.parametrize("name, sizes", [("uniter-base", (12, 768, 12, 3072)),
                                         ("uniter-large", (24, 1024, 16, 4096))])
def test_uniter_recipes_dry_run_with_uniter_sizes(name, sizes, capsys):
    import vlpt.build  # noqa: F401  (imported here: module-level tensors must not land on "meta")
    from conftest import REPO
    from vlpt.cli import main
    from vlpt.recipe import load_recipe

    registered_objectives()  # likewise every objective module
    path = REPO / "recipes" / f"{name}.yaml"
    with torch.device("meta"):  # the model is built and counted without allocating or initializing 1.3 GB
        assert main(["train", str(path), "--dry-run"]) == 0  # what `vlpt train RECIPE --dry-run` runs
    printed = capsys.readouterr().out
    assert f"recipe {path}: valid" in printed
    m = load_recipe(path).model
    assert (m.layers, m.hidden_size, m.heads, m.ffn_size) == sizes  # layers, hidden, heads, FFN
    # BERT-base-cased's vocabulary and positions, BUTD's 2048-d region features
    assert (m.vocab_size, m.max_positions, m.region_feature_dim) == (28996, 512, 2048)
    total, words = _parameter_count(m.hidden_size, m.layers, m.ffn_size, 28996, 512, 2048)
    expected = f"model: {total / 1e6:.2f}M parameters, {(total - words) / 1e6:.2f}M excluding word embeddings"
    assert expected in printed
