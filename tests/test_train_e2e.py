"""End to end on the CPU: a 3-step run writes every file; eval, export and resume work."""
import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import tiny_recipe


def _vlpt(*args):
    return subprocess.run([sys.executable, "-m", "vlpt.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    recipe = tiny_recipe(tmp)
    res = _vlpt("train", str(recipe))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "run", recipe, res


def test_three_steps_write_every_file(run):
    out, _, res = run
    assert (out / "recipe.yaml").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [rec for rec in lines if "loss" in rec]
    assert [rec["step"] for rec in train_lines] == [1, 2, 3]
    for rec in train_lines:
        assert {"step", "task", "loss", "lr", "samples_per_s", "time"} <= set(rec)
        assert rec["task"] in ("mlm", "itm") and rec["loss"] > 0
        assert f"{rec['task']}/loss" in rec
    ev = json.loads((out / "eval.json").read_text())
    for key in ("mlm_acc", "attr_color_acc", "attr_shape_acc", "attr_color_acc_blind", "attr_shape_acc_blind",
                "itm_acc", "retrieval_t2i_r1", "retrieval_t2i_r5", "retrieval_t2i_r10", "retrieval_i2t_r1"):
        assert 0.0 <= ev[key] <= 1.0, key
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-0000002", "step-0000003"]
    weights = load_file(str(out / "checkpoints" / "step-0000003" / "model.safetensors"))
    assert any(k.startswith("vl.trunk.") for k in weights) and any(k.startswith("objectives.itm.") for k in weights)
    assert "vlpt eval" in res.stderr and str(out) in res.stderr  # tells where outputs went and how to go on


def test_eval_command_rewrites_eval_json(run):
    out, _, _ = run
    (out / "eval.json").unlink()
    res = _vlpt("eval", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((out / "eval.json").read_text())["step"] == 3


def test_export_loads_in_transformers(run, tmp_path):
    out, _, _ = run
    res = _vlpt("export", str(out), str(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr[-2000:]
    bert = transformers.BertModel.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = tok("a large red circle left of a small blue square", return_tensors="pt")
    assert tok.unk_token_id not in enc["input_ids"][0].tolist()
    from vlpt.evaluate_run import load_run

    _, _, built = load_run(out)
    vl = built.model.vl.eval()
    with torch.no_grad():
        ref = bert(**enc).last_hidden_state
        ours = vl({"input_ids": enc["input_ids"], "text_mask": enc["attention_mask"].bool()}).hidden
    assert torch.allclose(ours, ref, atol=1e-5)


def test_resume_continues_from_latest_checkpoint(run):
    out, recipe, _ = run
    res = _vlpt("train", str(recipe), "train.steps=5")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from" in res.stderr and "step-0000003" in res.stderr
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps[-2:] == [4, 5]


def test_no_resume_refuses_to_overwrite(run):
    _, recipe, _ = run
    res = _vlpt("train", str(recipe), "--no-resume")
    assert res.returncode == 2 and "--force" in res.stderr


def test_timm_backbone_turns_raw_images_into_grid_regions(tmp_path):
    recipe = tiny_recipe(tmp_path, model={"image_backbone": {"name": "resnet18", "image_size": 64, "frozen": True}},
                         train={"steps": 2, "lr": 1e-3, "warmup": 1}, checkpoint={"every": None, "keep": 1})
    res = _vlpt("train", str(recipe))
    assert res.returncode == 0, res.stderr[-3000:]
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert 0.0 <= ev["itm_acc"] <= 1.0
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000002" / "model.safetensors"))
    # resnet18's 512 channels feed the region embedder; a 64-px image gives a 2×2 grid of regions
    assert weights["vl.region_embedder.feature_proj.weight"].shape[1] == 512
    from vlpt.model import grid_boxes

    assert torch.allclose(grid_boxes(2, 2)[3], torch.tensor([0.5, 0.5, 1.0, 1.0]))


def test_trackers_unknown_is_a_recipe_mistake_and_tensorboard_logs(tmp_path):
    recipe = tiny_recipe(tmp_path, log={"every": 1, "progress": False, "trackers": ["tensorbored"]})
    res = _vlpt("train", str(recipe))
    assert res.returncode == 2 and "unknown tracker 'tensorbored'" in res.stderr and "Traceback" not in res.stderr
    pytest.importorskip("torch.utils.tensorboard")  # the optional extra: pip install -e ".[tensorboard]"
    recipe = tiny_recipe(tmp_path, log={"every": 1, "progress": False, "trackers": ["tensorboard"]},
                         checkpoint={"every": None, "at_end": False}, eval={"at_end": False})
    res = _vlpt("train", str(recipe))
    assert res.returncode == 0, res.stderr[-3000:]
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events, sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "loss" in acc.Tags()["scalars"] and len(acc.Scalars("loss")) == 3
