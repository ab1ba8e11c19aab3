"""Sweeps: expansion and naming, validation before anything runs, a local 3-variant sweep with
skip on re-run, the report table, the slurm array script, and the Table 2 sweep files."""
import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, tiny_recipe
from vlpt.cli import main
from vlpt.errors import UserError
from vlpt.sweep import direction, grid_points, load_sweep, report_table, Row, select, set_dotted


def _vlpt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlpt.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def _cli(*args):
    """``vlpt ARGS`` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def _sweep_file(tmp_path, **data) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- expansion, naming, validation ----------------------------------------------------------


def test_grid_expansion_and_naming():
    points = grid_points({"train.lr": [1e-4, 2e-4], "seed": [0, 1]})
    assert [n for n, _ in points] == ["lr=0.0001_seed=0", "lr=0.0001_seed=1", "lr=0.0002_seed=0", "lr=0.0002_seed=1"]
    assert points[1][1] == {"train.lr": 1e-4, "seed": 1}
    # clashing last parts keep the whole key; mappings are named by index
    names = [n for n, _ in grid_points({"tasks.mlm.weight": [1], "tasks.itm.weight": [2, 3]})]
    assert names == ["tasks.mlm.weight=1_tasks.itm.weight=2", "tasks.mlm.weight=1_tasks.itm.weight=3"]
    assert [n for n, _ in grid_points({"tasks": [{"a": 1}, {"b": 2}]})] == ["tasks=0", "tasks=1"]


def test_variants_cross_the_grid_and_null_removes_a_task(tmp_path):
    base = tiny_recipe(tmp_path)
    sweep = load_sweep(_sweep_file(
        tmp_path, base=base.name, output_dir=str(tmp_path / "out"), overrides={"train.steps": 5},
        variants={"both": {}, "mlm-only": {"tasks.itm": None}, "no-clip": {"train.clip": None}},
        grid={"seed": [0, 1]}))
    names = [v.name for v in sweep.variants]
    assert names == ["both_seed=0", "both_seed=1", "mlm-only_seed=0", "mlm-only_seed=1", "no-clip_seed=0", "no-clip_seed=1"]
    v = {v.name: v for v in sweep.variants}
    assert list(v["mlm-only_seed=1"].pretrain.recipe.tasks) == ["mlm"]  # null on a task entry removes it
    assert v["no-clip_seed=0"].pretrain.recipe.train.clip is None  # null on a schema key is the value null
    assert v["both_seed=1"].pretrain.recipe.seed == 1 and v["both_seed=1"].pretrain.recipe.train.steps == 5
    assert v["both_seed=0"].pretrain.recipe.output_dir == str(tmp_path / "out" / "both_seed=0")
    assert [x.name for x in select(sweep, ["mlm-only*"])] == ["mlm-only_seed=0", "mlm-only_seed=1"]
    with pytest.raises(UserError, match="no variant named 'mlm_only'"):
        select(sweep, ["mlm_only"])


def test_command_line_overrides_apply_to_every_variant(tmp_path):
    base = tiny_recipe(tmp_path)
    path = _sweep_file(tmp_path, base=base.name, output_dir=str(tmp_path / "out"), overrides={"seed": 3},
                       variants={"a": {}, "b": {"train.lr": 0.5}})
    sweep = load_sweep(path, cli_overrides=["seed=7", "train.steps=4", f"output_dir={tmp_path / 'elsewhere'}"])
    assert sweep.output_dir == tmp_path / "elsewhere"
    assert [(v.pretrain.recipe.seed, v.pretrain.recipe.train.steps) for v in sweep.variants] == [(7, 4), (7, 4)]
    assert sweep.variants[1].pretrain.recipe.train.lr == 0.5
    with pytest.raises(UserError, match="key.path=value"):
        load_sweep(path, cli_overrides=["seed"])


def test_a_mapping_merges_into_a_section_and_replaces_a_free_form_mapping():
    raw = {"tasks": {"mlm": {"weight": 1, "objectives": {"mlm": 1.0}}, "itm": {"weight": 1, "objectives": {"itm": 1.0, "wra": 0.1}}},
           "train": {"lr": 1.0, "steps": 3}}
    set_dotted(raw, "train", {"lr": 2.0})  # a recipe section: key by key
    assert raw["train"] == {"lr": 2.0, "steps": 3}
    set_dotted(raw, "tasks.itm", {"weight": 2, "objectives": {"itm": 1.0}})  # a task merges, its objectives replace
    assert raw["tasks"]["itm"] == {"weight": 2, "objectives": {"itm": 1.0}}
    set_dotted(raw, "tasks", {"itm": {"weight": 3}})  # the task list replaces
    assert raw["tasks"] == {"itm": {"weight": 3}}
    with pytest.raises(UserError, match="did you mean 'itm'"):
        set_dotted(raw, "tasks.itn", None)


def test_unknown_override_key_in_a_variant_exits_2(tmp_path):
    base = tiny_recipe(tmp_path)
    path = _sweep_file(tmp_path, base=base.name, output_dir=str(tmp_path / "out"),
                       variants={"ok": {}, "typo": {"train.lrr": 1e-4}})
    rc, _, stderr = _cli("sweep", str(path))
    assert rc == 2
    assert "variant 'typo'" in stderr and "train.lrr" in stderr and "did you mean 'train.lr'" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()  # nothing ran or was written
    bad = _sweep_file(tmp_path, base=base.name, output_dir="x", variant={})
    rc, _, stderr = _cli("sweep", str(bad))
    assert rc == 2 and "unknown sweep key 'variant' (did you mean 'variants'?)" in stderr


def test_direction_of_metrics():
    assert direction("mrfr_mse") == "min" and direction("pretrain/mlm/loss") == "min"
    assert direction("itm_acc") == "max" and direction("pretrain/retrieval_t2i_r1") == "max"
    assert direction("attr_color_acc_blind") is None


def test_report_table_bolds_the_best_finished_value():
    rows = [Row("a", "finished", 60.0, {"itm_acc": 0.9, "mrfr_mse": 0.2}),
            Row("b", "finished", 61.0, {"itm_acc": 0.8, "mrfr_mse": 0.1}),
            Row("c", "unfinished (step 2/5)", None, {})]
    table = report_table(rows, ["itm_acc", "mrfr_mse"])
    assert "| a | **0.900** | 0.200 | 0:01:00 |" in table
    assert "| b | 0.800 | **0.100** | 0:01:01 |" in table
    assert "| c (unfinished (step 2/5)) | — | — | — |" in table


# -- a real local sweep on the shapes data -------------------------------------------------


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    base = tiny_recipe(tmp, train={"steps": 2, "lr": 1e-3, "warmup": 1}, checkpoint={"every": None, "keep": 1},
                       eval={"samples": 24, "retrieval_candidates": 8, "batch_size": 32})
    path = _sweep_file(tmp, base=base.name, output_dir=str(tmp / "sweep"),
                       variants={"mlm": {"tasks.itm": None}, "itm": {"tasks.mlm": None}, "mlm-itm": {}},
                       report={"metrics": ["itm_acc", "mlm_acc"]})
    res = _vlpt("sweep", str(path))
    return tmp, path, res


def test_local_sweep_runs_every_variant(local_sweep):
    tmp, _, res = local_sweep
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp / "sweep"
    for name, tasks in (("mlm", ["mlm"]), ("itm", ["itm"]), ("mlm-itm", ["mlm", "itm"])):
        run = out / name
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        assert list(recipe["tasks"]) == tasks and recipe["output_dir"] == str(run)
        assert json.loads((run / "eval.json").read_text())["step"] == 2
        done = json.loads((run / "done.json").read_text())
        assert done["steps"] == 2 and done["wall_s"] > 0
        assert (run / "train.log").is_file()
    assert "3 of 3 variant(s) finished" in res.stderr


def test_rerun_skips_finished_variants(local_sweep):
    tmp, path, _ = local_sweep
    out = tmp / "sweep"
    before = {n: (out / n / "eval.json").stat().st_mtime_ns for n in ("mlm", "itm", "mlm-itm")}
    rc, stdout, stderr = _cli("sweep", str(path))
    assert rc == 0, stderr
    assert stderr.count("finished, skipped") == 3 and "vlpt: starting" not in stdout + stderr
    assert {n: (out / n / "eval.json").stat().st_mtime_ns for n in before} == before
    rc, stdout, _ = _cli("sweep", str(path), "--dry-run")
    assert rc == 0 and "would train 0 variant(s)" in stdout


def test_report_prints_and_writes_the_table(local_sweep):
    tmp, _, _ = local_sweep
    out = tmp / "sweep"
    rc, stdout, stderr = _cli("report", str(out))
    assert rc == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == "| variant | itm_acc | mlm_acc | wall |"  # the sweep file's report.metrics
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:5]}
    assert set(rows) == {"mlm", "itm", "mlm-itm"}
    assert rows["mlm"].split(" | ")[1] == "—"  # no ITM head: no itm_acc
    assert "**" in stdout
    assert (out / "report.md").read_text().count("| mlm-itm |") == 1
    header = (out / "report.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["variant", "status", "wall_s", "loadavg_end"] and "attr_color_acc" in header  # every metric in the CSV
    rc, stdout, _ = _cli("report", str(out), "--metrics", "mlm_acc", "attr_color_acc")
    assert rc == 0 and stdout.splitlines()[0] == "| variant | mlm_acc | attr_color_acc | wall |"
    rc, _, stderr = _cli("report", str(out), "--metrics", "itm_accc")
    assert rc == 2 and "did you mean 'itm_acc'" in stderr


def test_finetune_starts_from_each_variants_encoder(tmp_path):
    from safetensors.torch import load_file

    base = tiny_recipe(tmp_path, train={"steps": 2, "lr": 1e-3, "warmup": 1}, checkpoint={"every": None, "keep": 2},
                       eval={"samples": 24, "retrieval_candidates": 8, "batch_size": 32})
    path = _sweep_file(tmp_path, base=base.name, output_dir=str(tmp_path / "sweep"),
                       variants={"mlm": {"tasks.itm": None}},
                       finetune={"overrides": {"tasks": {"itm": {"weight": 1, "objectives": {"itm": 1.0}}}}})
    rc, _, stderr = _cli("sweep", str(path))
    assert rc == 0, stderr
    run = tmp_path / "sweep" / "mlm"
    assert list(yaml.safe_load((run / "finetune" / "recipe.yaml").read_text())["tasks"]) == ["itm"]
    assert "itm_acc" in json.loads((run / "finetune" / "eval.json").read_text())
    pre = load_file(str(run / "checkpoints" / "step-0000002" / "model.safetensors"))
    start = load_file(str(run / "finetune" / "checkpoints" / "step-0000000" / "model.safetensors"))
    encoder = [k for k in pre if k.startswith("vl.")]
    assert encoder and all(torch.equal(pre[k], start[k]) for k in encoder)  # the encoder carried over
    assert not any(k.startswith("objectives.mlm.") for k in start)  # the pretraining heads did not
    assert any(k.startswith("objectives.itm.") for k in start)  # the finetune's own, fresh
    rc, stdout, _ = _cli("report", str(tmp_path / "sweep"))
    header = stdout.splitlines()[0].split(" | ")
    assert rc == 0 and header[1] == "itm_acc"  # the finetune's metrics first, then the pretrained model's own
    assert "pretrain/mlm_acc" in header and "pretrain/itm_acc" not in header


def test_a_run_stuck_after_its_last_step_is_stopped_and_counted(tmp_path, monkeypatch):
    import vlpt.sweep as sweep

    monkeypatch.setattr(sweep, "EXIT_GRACE_S", 0.5)
    monkeypatch.setattr(sweep, "POLL_S", 0.2)
    flag = tmp_path / "eval.json"
    code = (f"import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"pathlib.Path({str(flag)!r}).write_text('{{}}'); print('finished', flush=True); time.sleep(60)")
    t0 = time.time()
    rc, until_done = sweep._run_logged([sys.executable, "-c", code], tmp_path / "log", finished=flag.is_file)
    assert rc == -9 and until_done is not None and time.time() - t0 < 30
    assert "finished" in (tmp_path / "log").read_text() and "has not exited: stopping it" in (tmp_path / "log").read_text()


# -- slurm --------------------------------------------------------------------------------


def test_slurm_dry_run_writes_a_valid_array_script(tmp_path, monkeypatch):
    sweep_file = REPO / "recipes" / "ablations" / "uniter-table2.yaml"
    # a copy whose output_dir points into tmp_path (the sweep's folder is where the script goes)
    data = yaml.safe_load(sweep_file.read_text())
    data["base"] = str(REPO / "recipes" / "uniter-base.yaml")
    data["output_dir"] = str(tmp_path / "t2")
    launch = REPO / "recipes" / "launch" / "ddp-1x8.yaml"
    assert data["slurm"]["launch_args"] == "--config_file recipes/launch/ddp-1x8.yaml" and launch.is_file()
    data["slurm"]["launch_args"] = f"--config_file {launch}"  # the script runs where the sweep was written from
    copy = tmp_path / "uniter-table2.yaml"
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.chdir(tmp_path)  # the script cd's to where the sweep was written from
    rc, stdout, stderr = _cli("sweep", str(copy), "--launcher", "slurm", "--dry-run")
    assert rc == 0, stderr
    script = tmp_path / "t2" / "sweep.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH --array=0-9\n" in text and "#SBATCH --requeue" in text and "#SBATCH --gpus-per-node=8" in text
    assert "accelerate launch" in text and "-m vlpt.cli train" in text and f"sbatch {script}" in stdout
    assert f"cd {tmp_path}" in text and f"LAUNCH_ARGS='--config_file {launch}'" in text
    variants = text.split("VARIANTS=(")[1].split(")")[0].split()
    assert len(variants) == 10 and variants[0] == "mrfr" and variants[-1] == "all-joint"
    for v in variants:  # every array task's recipes are in place
        assert (tmp_path / "t2" / v / "recipe.yaml").is_file() and (tmp_path / "t2" / v / "finetune" / "recipe.yaml").is_file()
    rc, _, _ = _cli("sweep", str(copy), "--launcher", "slurm", "--dry-run", "--only", "mlm", "mlm-itm")
    assert rc == 0 and "#SBATCH --array=0-1\n" in script.read_text()


def test_the_table2_sweep_files_expand_to_the_ten_rows():
    real = load_sweep(REPO / "recipes" / "ablations" / "uniter-table2.yaml", check_data=False)
    shapes = load_sweep(REPO / "recipes" / "ablations" / "uniter-table2-shapes.yaml", check_data=False)
    for sweep in (real, shapes):
        assert len(sweep.variants) == 10
        tasks = {v.name: v.pretrain.recipe.tasks for v in sweep.variants}
        assert list(tasks["mrfr"]) == ["mrfr"] and list(tasks["mlm-itm"]) == ["mlm", "itm"]
        assert "wra" in tasks["all-wra"]["itm"].objectives and "wra" not in tasks["mlm-itm-mrckl-mrfr"]["itm"].objectives
        joint = [t for t in tasks["all-joint"].values() if len(t.objectives) > 1]
        assert len(joint) == 1 and set(joint[0].objectives) == {"mlm", "mrfr", "mrc_kl"}
        assert all(v.finetune is not None for v in sweep.variants)
