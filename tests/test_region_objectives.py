"""Masked region modeling, WRA wiring and the recipe checks of issue-3 objectives."""
import subprocess
import sys

import numpy as np
import pytest
import torch

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
    assert res.returncode == 2 and "'wra' needs ['itm']" in res.stderr and "Traceback" not in res.stderr


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
    assert "objective 'mrc' needs 'soft_labels'" in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_quickstart_uniter_recipes_validate():
    from vlpt.recipe import load_recipe, resolve_tasks
    from conftest import REPO

    r = load_recipe(REPO / "recipes" / "quickstart-uniter.yaml")
    assert {t.name for t in resolve_tasks(r)} == {"itm", "mlm", "mrfr", "mrc_kl"}
    j = resolve_tasks(load_recipe(REPO / "recipes" / "quickstart-uniter-joint.yaml"))
    assert {t.name for t in j} == {"itm", "joint"}
    assert [o.name for o in j[1].objectives] == ["mlm", "mrfr", "mrc_kl"]
