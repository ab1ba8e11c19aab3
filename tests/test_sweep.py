"""Sweeps: expansion and naming in the recipe's one override language, validation before anything
runs, a local 2-variant sweep with two downstream tasks (skipped on a re-run, compared with a
Meta-Sum), a finetune started from a variant's encoder, the report from run folders alone, the
SLURM array script (and its per-stage done check), and the Table 2 sweep files."""
import contextlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from conftest import REPO, tiny_recipe
from test_plot_launch import PNG_SIGNATURE, run_sbatch
from vlpt.cli import main
from vlpt.errors import UserError
from vlpt.recipe import load_recipe, to_dict
from vlpt.run_dir import RunDir
from vlpt.sweep.local import run_stage
from vlpt.sweep.report import Row, direction, report_table
from vlpt.sweep.slurm import template_text
from vlpt.sweep.spec import grid_points, load_sweep, select


def _vlpt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlpt.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def _cli(*args):
    """``vlpt ARGS`` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def _sweep_file(tmp_path, name="sweep.yaml", **data) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _fast_recipe(tmp_path) -> Path:
    return tiny_recipe(tmp_path, train={"steps": 2, "lr": 1e-3, "warmup": 1}, checkpoint={"every": None, "keep": 1},
                       eval={"samples": 24, "retrieval_candidates": 8, "batch_size": 32})


MLM_TASKS = {"mlm": {"weight": 1, "objectives": {"mlm": 1.0}}}
ITM_TASKS = {"itm": {"weight": 1, "objectives": {"itm": 1.0}}}

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
    rc, stdout, stderr = _cli("sweep", str(path), "train.steps=4", "--dry-run", "seed=7")  # the command line too
    assert rc == 0, stderr
    assert "a  not started" in stdout and "4 steps" in stdout and "nothing written" in stdout


def test_a_mapping_merges_into_a_section_and_replaces_a_free_form_mapping(tmp_path):
    base = tiny_recipe(tmp_path, train={"steps": 3, "lr": 1.0}, tasks={**MLM_TASKS, "itm": {
        "weight": 1, "objectives": {"itm": 1.0, "wra": 0.1}}})
    sweep = load_sweep(_sweep_file(tmp_path, base=base.name, output_dir=str(tmp_path / "out"), variants={
        "section": {"train": {"lr": 2.0}},  # a recipe section: key by key
        "task": {"tasks.itm": {"weight": 2, "objectives": {"itm": 1.0}}},  # a task merges, its objectives replace
        "list": {"tasks": {"itm": {"weight": 3, "objectives": {"itm": 1.0}}}}}))  # the task list replaces
    r = {v.name: v.pretrain.recipe for v in sweep.variants}
    assert (r["section"].train.lr, r["section"].train.steps) == (2.0, 3)
    assert r["task"].tasks["itm"].weight == 2 and r["task"].tasks["itm"].objectives == {"itm": 1.0}
    assert list(r["list"].tasks) == ["itm"] and r["list"].tasks["itm"].weight == 3
    typo = _sweep_file(tmp_path, "typo.yaml", base=base.name, output_dir="x", variants={"t": {"tasks.itn": None}})
    with pytest.raises(UserError, match="variant 't'.*did you mean 'itm'"):
        load_sweep(typo)


def test_a_variant_resolves_exactly_as_vlpt_train_does(tmp_path):
    base = REPO / "recipes" / "quickstart-uniter.yaml"
    sweep = load_sweep(_sweep_file(tmp_path, base=str(base), output_dir="sweeps/x",
                                   variants={"no-wra": {"tasks.itm.objectives.wra": None}}), check_data=False)
    swept = to_dict(sweep.variants[0].pretrain.recipe)
    trained = to_dict(load_recipe(base, ["tasks.itm.objectives.wra=null", "output_dir=sweeps/x/no-wra"]))
    assert swept == trained
    assert "wra" not in swept["tasks"]["itm"]["objectives"] and "wra" in to_dict(load_recipe(base))["tasks"]["itm"]["objectives"]


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
    for downstream, message in (({"vqa": {"recipe": base.name}}, "'downstream.vqa.metrics' must be a non-empty list"),
                                ({"vqa": {"metrics": ["a"], "carry": "heads"}}, "'downstream.vqa.carry' must be"),
                                ({"pretrain": {"metrics": ["a"]}}, "is not 'pretrain'"),
                                ({"vqa": {"metrics": ["a"], "overrides": {"train.stepz": 3}}}, "did you mean 'train.steps'")):
        bad = _sweep_file(tmp_path, base=base.name, output_dir="x", variants={"a": {}}, downstream=downstream)
        rc, _, stderr = _cli("sweep", str(bad))
        assert rc == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr


# -- the report, from run folders ------------------------------------------------------------


def test_direction_of_metrics():
    assert direction("mrfr_mse") == "min" and direction("pretrain/mlm/loss") == "min"
    assert direction("itm_acc") == "max" and direction("pretrain/retrieval_t2i_r1") == "max"
    assert direction("attr_color_acc_blind") is None
    assert direction("meta_sum") == "max" and direction("vqa/vqa_acc") == "max"


def test_report_table_bolds_the_best_finished_value():
    rows = [Row("a", "finished", 60.0, {"itm_acc": 0.9, "mrfr_mse": 0.2, "meta_sum": 399.97}),
            Row("b", "finished", 61.0, {"itm_acc": 0.8, "mrfr_mse": 0.1, "meta_sum": 344.66}),
            Row("c", "partial (step 2 of 5)", None, {})]
    table = report_table(rows, ["itm_acc", "mrfr_mse", "meta_sum"])
    assert "| a | **0.900** | 0.200 | **399.97** | 0:01:00 |" in table
    assert "| b | 0.800 | **0.100** | 344.66 | 0:01:01 |" in table
    assert "| c (partial (step 2 of 5)) | — | — | — | — |" in table


def _fake_run(path: Path, steps: int, done: int | None, metrics: dict | None = None, wall: float = 10.0) -> None:
    """A run folder as the trainer leaves it: its recipe, and once finished its eval.json and done.json."""
    run = RunDir(path)
    path.mkdir(parents=True, exist_ok=True)
    run.recipe.write_text(yaml.safe_dump({"train": {"steps": steps}}))
    if done is not None:
        run.write_eval({"step": done, **(metrics or {})})
        run.mark_done(done, wall_s=wall)


def test_report_of_finetune_and_downstream_stages_and_meta_sum(tmp_path):
    """Plain columns from the finetune, <task>/<metric> from each downstream task, pretrain/... from the
    pretraining, meta_sum only where every downstream task finished (and has its listed metrics)."""
    out = tmp_path / "sweep"
    manifest = {"variants": ["a", "b", "c", "d"], "finetune": True,
                "downstream": {"vqa": ["vqa_acc"], "ret": ["t2i_r1", "i2t_r1"]}}
    out.mkdir()
    (out / "sweep.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    for name, vqa in (("a", 0.5), ("b", 0.6), ("c", 0.7), ("d", None)):
        _fake_run(out / name, 5, 5, {"mlm_acc": 0.3})
        _fake_run(out / name / "finetune", 3, 3, {"itm_acc": 0.8})
        _fake_run(out / name / "downstream" / "vqa", 4, 4, {"vqa_acc": vqa} if vqa is not None else {"vqa_acc_x": 1})
        ret = out / name / "downstream" / "ret"
        if name == "c":  # stopped at step 2 of 4, with a checkpoint
            _fake_run(ret, 4, None)
            RunDir(ret).checkpoint(2).mkdir(parents=True)
        else:
            _fake_run(ret, 4, 4, {"t2i_r1": 0.2, "i2t_r1": 0.1, "t2i_r5": 0.9})
    rc, stdout, stderr = _cli("report", str(out))
    assert rc == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == ("| variant | vqa/vqa_acc | ret/t2i_r1 | ret/i2t_r1 | meta_sum | itm_acc | pretrain/mlm_acc "
                        "| wall |")  # ret/t2i_r5 is not listed: only in the CSV
    rows = [line.split(" | ") for line in lines[2:6]]
    assert rows[0][0] == "| a" and rows[0][4] == "80.00"  # 100 × (vqa_acc + t2i_r1 + i2t_r1)
    assert rows[1][0] == "| b" and rows[1][4] == "**90.00**" and rows[1][-1] == "0:00:40 |"  # four stages' wall times
    assert rows[2][0] == "| c (pretrained; downstream/ret partial (step 2 of 4))" and rows[2][4] == "—"
    assert rows[3][4] == "—" and "d: downstream task 'vqa' has no metric 'vqa_acc'" in stderr
    header = (out / "report.csv").read_text().splitlines()[0].split(",")
    assert {"ret/t2i_r5", "meta_sum", "pretrain/mlm_acc", "itm_acc"} <= set(header)


def test_report_without_matplotlib_writes_no_png(tmp_path):
    out = tmp_path / "sweep"
    for name, acc in (("a", 0.5), ("b", 0.7)):
        _fake_run(out / name, 2, 2, {"itm_acc": acc, "mrfr_mse": acc})
    blocked = {name: None for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends",
                                        "matplotlib.backends.backend_agg")}
    with mock.patch.dict(sys.modules, blocked):
        rc, stdout, stderr = _cli("report", str(out))
    assert rc == 0 and "| b | **0.700** | 0.700 |" in stdout and not (out / "report.png").exists()
    assert "wrote report.md, report.csv in" in stderr


# -- a real local sweep: two variants, each pretrained, then finetuned on two downstream tasks --


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    base = _fast_recipe(tmp)
    path = _sweep_file(tmp, base=base.name, output_dir=str(tmp / "sweep"),
                       variants={"mlm": {"tasks.itm": None}, "mlm-itm": {}},
                       downstream={"cap": {"overrides": {"tasks": MLM_TASKS}, "metrics": ["mlm_acc"]},
                                   "match": {"overrides": {"tasks": ITM_TASKS}, "metrics": ["itm_acc"], "carry": "all"}})
    res = _vlpt("sweep", str(path))
    return tmp, path, res


def test_local_sweep_runs_every_stage_of_every_variant(local_sweep):
    tmp, _, res = local_sweep
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp / "sweep"
    for name, tasks in (("mlm", ["mlm"]), ("mlm-itm", ["mlm", "itm"])):
        run = out / name
        pre = yaml.safe_load((run / "recipe.yaml").read_text())
        assert list(pre["tasks"]) == tasks and pre["output_dir"] == str(run)
        for stage, stage_tasks, heads in ((".", tasks, False), ("downstream/cap", ["mlm"], False),
                                          ("downstream/match", ["itm"], True)):
            d = run / stage
            recipe = yaml.safe_load((d / "recipe.yaml").read_text())
            assert list(recipe["tasks"]) == stage_tasks and recipe["seed"] == pre["seed"]
            if stage != ".":  # started from the variant's run, with its model section
                assert recipe["model"] == {**pre["model"], "init_from": str(run), "init_heads": heads}
                assert "model.init_from: loaded the encoder" in (d / "train.log").read_text()
            assert json.loads((d / "eval.json").read_text())["step"] == 2
            done = json.loads((d / "done.json").read_text())  # the trainer's completion marker
            assert done["step"] == 2 and done["wall_s"] > 0
    assert "2 of 2 variant(s) finished" in res.stderr


def test_downstream_tasks_start_from_the_variants_weights(local_sweep):
    """The encoder always comes from the variant; the heads only with carry: all, where names and
    shapes match (the mlm variant has no ITM head to give)."""
    from safetensors.torch import load_file

    from vlpt.build import build_model

    tmp, _, _ = local_sweep
    for name in ("mlm", "mlm-itm"):
        run = tmp / "sweep" / name
        pre = load_file(str(RunDir(run).latest_checkpoint() / "model.safetensors"))
        for task in ("cap", "match"):
            recipe = load_recipe(run / "downstream" / task / "recipe.yaml")
            torch.manual_seed(recipe.seed)  # as the trainer seeds before it builds the model
            fresh = build_model(recipe, load_init=False).model.state_dict()
            torch.manual_seed(recipe.seed)
            model = build_model(recipe).model.state_dict()
            encoder = [k for k in pre if k.startswith("vl.")]
            assert encoder and all(torch.equal(pre[k], model[k]) for k in encoder)
            heads = [k for k in model if k.startswith("objectives.")]
            expected = pre if task == "match" and name == "mlm-itm" else fresh
            assert heads and all(torch.equal(model[k], expected[k]) for k in heads), (name, task)
            shared = [k for k in heads if k in pre]  # where pretrained and fresh heads can be told apart
            assert not shared or any(not torch.equal(pre[k], fresh[k]) for k in shared)


def test_rerun_skips_finished_variants(local_sweep):
    tmp, path, _ = local_sweep
    out = tmp / "sweep"
    files = [out / n / s / "eval.json" for n in ("mlm", "mlm-itm") for s in (".", "downstream/cap", "downstream/match")]
    before = [f.stat().st_mtime_ns for f in files]
    rc, stdout, stderr = _cli("sweep", str(path))
    assert rc == 0, stderr
    assert stderr.count("finished, skipped") == 2 and "vlpt: starting" not in stdout + stderr
    assert [f.stat().st_mtime_ns for f in files] == before
    recipes = {p: p.read_text() for p in out.glob("*/recipe.yaml")}
    rc, _, stderr = _cli("sweep", str(path), "train.lr=0.123")  # changed since: skipped, with a note, untouched
    assert rc == 0 and stderr.count("finished, skipped") == 2, stderr
    assert stderr.count("(changed: train.lr); it is finished: delete the folder to run it again") == 2, stderr
    assert {p: p.read_text() for p in out.glob("*/recipe.yaml")} == recipes and len(recipes) == 2
    rc, stdout, _ = _cli("sweep", str(path), "--dry-run")
    assert rc == 0 and "would train 0 variant(s)" in stdout and "+ downstream/cap + downstream/match" in stdout


def test_report_shows_the_downstream_metrics_and_meta_sum(local_sweep):
    tmp, _, _ = local_sweep
    out = tmp / "sweep"
    rc, stdout, stderr = _cli("report", str(out))
    assert rc == 0, stderr
    lines = stdout.splitlines()
    head = lines[0].split(" | ")
    assert head[:4] == ["| variant", "cap/mlm_acc", "match/itm_acc", "meta_sum"] and "pretrain/mlm_acc" in head
    rows = {line.split(" | ")[0][2:]: dict(zip(head, line.split(" | "))) for line in lines[2:4]}
    assert set(rows) == {"mlm", "mlm-itm"}
    for name, row in rows.items():
        cap = json.loads((out / name / "downstream" / "cap" / "eval.json").read_text())["mlm_acc"]
        match = json.loads((out / name / "downstream" / "match" / "eval.json").read_text())["itm_acc"]
        assert row["meta_sum"].strip("*") == f"{100 * (cap + match):.2f}"
    assert rows["mlm"]["pretrain/itm_acc"] == "—"  # no ITM head in that pretraining: no itm_acc
    assert "**" in stdout and "meta_sum: 100 × the sum of cap/mlm_acc, match/itm_acc" in stdout
    assert (out / "report.md").read_text().count("| mlm-itm |") == 1
    header = (out / "report.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["variant", "status", "wall_s", "loadavg_end"]
    assert {"cap/attr_color_acc", "match/retrieval_t2i_r1", "pretrain/attr_color_acc"} <= set(header)  # every metric
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "report.png").read_bytes()[:8] == PNG_SIGNATURE
    rc, stdout, _ = _cli("report", str(out), "--metrics", "meta_sum", "pretrain/attr_color_acc")
    assert rc == 0 and stdout.splitlines()[0] == "| variant | meta_sum | pretrain/attr_color_acc | wall |"
    rc, _, stderr = _cli("report", str(out), "--metrics", "meta_summ")
    assert rc == 2 and "did you mean 'meta_sum'" in stderr


def test_finetune_starts_from_the_variants_encoder(local_sweep, tmp_path):
    """A sweep whose pretraining is already done (a copy of a finished variant) trains only its
    finetune, from the variant's encoder with fresh heads, and reports it in the plain columns."""
    from safetensors.torch import load_file

    tmp, _, _ = local_sweep
    base = tmp / "recipe.yaml"
    shutil.copytree(tmp / "sweep" / "mlm", tmp_path / "sweep" / "mlm", ignore=shutil.ignore_patterns("downstream"))
    path = _sweep_file(tmp_path, base=str(base), output_dir=str(tmp_path / "sweep"), variants={"mlm": {"tasks.itm": None}},
                       finetune={"overrides": {"tasks": ITM_TASKS}})
    rc, _, stderr = _cli("sweep", str(path))
    assert rc == 0, stderr
    assert "mlm: finetune (not started)" in stderr and "mlm: pretrain" not in stderr  # finished: skipped
    run = tmp_path / "sweep" / "mlm"
    recipe = yaml.safe_load((run / "finetune" / "recipe.yaml").read_text())
    assert list(recipe["tasks"]) == ["itm"] and recipe["model"]["init_from"] == str(run)
    assert not recipe["model"]["init_heads"]  # carry: encoder
    assert "itm_acc" in json.loads((run / "finetune" / "eval.json").read_text())
    assert "model.init_from: loaded the encoder" in (run / "finetune" / "train.log").read_text()
    final = load_file(str(RunDir(run / "finetune").latest_checkpoint() / "model.safetensors"))
    assert not any(k.startswith("objectives.mlm.") for k in final)  # the pretraining heads did not come along
    assert any(k.startswith("objectives.itm.") for k in final)  # the finetune's own
    rc, stdout, _ = _cli("report", str(tmp_path / "sweep"))
    header = stdout.splitlines()[0].split(" | ")
    assert rc == 0 and header[1] == "itm_acc"  # the finetune's metrics first, then the pretrained model's own
    assert "pretrain/mlm_acc" in header and "pretrain/itm_acc" not in header


# -- the local launcher's verdict: done.json alone ---------------------------------------------


def _stage_at(tmp_path, steps=3):
    sweep = load_sweep(_sweep_file(tmp_path, base=tiny_recipe(tmp_path).name, output_dir=str(tmp_path / "out"),
                                   overrides={"train.steps": steps}, variants={"v": {}}))
    stage = sweep.variants[0].pretrain
    stage.run_dir.mkdir(parents=True)
    return stage


def test_a_run_marked_done_counts_whatever_its_exit_code(tmp_path, capsys):
    stage = _stage_at(tmp_path)
    write_done = f"import pathlib, sys; pathlib.Path({str(stage.run.done)!r}).write_text('{{\"step\": 3}}'); sys.exit(3)"
    assert run_stage(stage, [sys.executable, "-c", write_done])
    assert "exited with code 3 after it was marked done" in capsys.readouterr().err
    assert "$ " in stage.run.train_log.read_text()  # the command, logged


def test_a_run_that_exits_without_its_marker_failed(tmp_path, capsys):
    stage = _stage_at(tmp_path)
    stage.run.done.write_text(json.dumps({"step": 2}))  # an earlier, shorter run's marker does not count
    assert not run_stage(stage, [sys.executable, "-c", "print('trained a bit')"])
    assert "exited without reaching step 3" in capsys.readouterr().err
    assert "trained a bit" in stage.run.train_log.read_text()


# -- slurm --------------------------------------------------------------------------------


def _table2_copy(tmp_path) -> Path:
    """recipes/ablations/uniter-table2.yaml with its output in tmp_path, its recipe paths absolute and
    the VQA finetune shortened by a stage override."""
    data = yaml.safe_load((REPO / "recipes" / "ablations" / "uniter-table2.yaml").read_text())
    data["base"] = str(REPO / "recipes" / "uniter-base.yaml")
    data["output_dir"] = str(tmp_path / "t2")
    launch = REPO / "recipes" / "launch" / "ddp-1x8.yaml"
    assert data["slurm"]["launch_args"] == "--config_file recipes/launch/ddp-1x8.yaml" and launch.is_file()
    data["slurm"]["launch_args"] = f"--config_file {launch}"  # the script runs where the sweep was written from
    for task in data["downstream"].values():
        task["recipe"] = str((REPO / "recipes" / "ablations" / task["recipe"]).resolve())
    data["downstream"]["vqa"]["overrides"] = {"train.steps": 500}
    return _sweep_file(tmp_path, "uniter-table2.yaml", **data)


def test_slurm_dry_run_writes_a_valid_array_script_with_every_stage(tmp_path, monkeypatch):
    copy = _table2_copy(tmp_path)
    monkeypatch.chdir(tmp_path)  # the script cd's to where the sweep was written from
    rc, stdout, stderr = _cli("sweep", str(copy), "--launcher", "slurm", "--dry-run")
    assert rc == 0, stderr
    script = tmp_path / "t2" / "sweep.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH --array=0-9\n" in text and "#SBATCH --requeue" in text and "#SBATCH --gpus-per-node=8" in text
    assert "#SBATCH --signal=B:USR1@300\n" in text and "#SBATCH --nodes=4" not in text  # the sweep's header only
    assert "accelerate launch" in text and "-m vlpt.cli train" in text and f"sbatch {script}" in stdout
    assert f"cd {tmp_path}" in text and "LAUNCH_ARGS='--config_file " in text and "export HF_HUB_OFFLINE=1" in text
    assert "STAGES=(. downstream/vqa downstream/retrieval downstream/nlvr2 downstream/refcoco)\n" in text
    variants = text.split("VARIANTS=(")[1].split(")")[0].split()
    assert len(variants) == 10 and variants[0] == "mrfr" and variants[-1] == "all-joint"
    for v in variants:  # every array task's recipes are in place, the later stages starting from the variant
        run = tmp_path / "t2" / v
        assert (run / "recipe.yaml").is_file()
        for stage, steps, task in (("downstream/vqa", 500, "vqa"), ("downstream/retrieval", 5000, "itr"),
                                   ("downstream/nlvr2", 8000, "nlvr2"), ("downstream/refcoco", 10000, "refexp")):
            recipe = yaml.safe_load((run / stage / "recipe.yaml").read_text())
            assert recipe["model"]["init_from"] == str(tmp_path / "t2" / v) and recipe["train"]["steps"] == steps
            assert list(recipe["tasks"]) == [task] and recipe["output_dir"] == str(run / stage)
    manifest = yaml.safe_load((tmp_path / "t2" / "sweep.yaml").read_text())
    assert manifest["downstream"] == {"vqa": ["vqa_acc"], "retrieval": ["itr_t2i_r1", "itr_i2t_r1"],
                                      "nlvr2": ["nlvr2_acc"], "refcoco": ["refexp_iou50"]}  # UNITER's Meta-Sum
    assert manifest["finetune"] is False
    rc, _, _ = _cli("sweep", str(copy), "--launcher", "slurm", "--dry-run", "--only", "mlm", "mlm-itm")
    assert rc == 0 and "#SBATCH --array=0-1\n" in script.read_text()


def test_slurm_array_task_trains_its_variants_stages_in_order(tmp_path, monkeypatch):
    """Array task 1 trains variant 1's stages: its finished pretraining skipped (done.json), then
    each downstream task, one launcher per node."""
    base = tiny_recipe(tmp_path)
    path = _sweep_file(tmp_path, base=base.name, output_dir=str(tmp_path / "sw"), variants={"a": {}, "b": {}},
                       downstream={"cap": {"metrics": ["mlm_acc"]}, "match": {"metrics": ["itm_acc"]}},
                       slurm={"gpus_per_node": 1})
    monkeypatch.chdir(tmp_path)
    rc, _, stderr = _cli("sweep", str(path), "--launcher", "slurm")
    assert rc == 0, stderr
    RunDir(tmp_path / "sw" / "b").mark_done(3)  # b's pretraining is finished (tiny_recipe: 3 steps)
    script = tmp_path / "sw" / "sweep.sbatch"
    (tmp_path / "stubs").mkdir()
    rc, out, log = run_sbatch(tmp_path / "stubs", "", False, script=script, args=(),
                              env={"SLURM_ARRAY_TASK_ID": "1", "STUB_DONE": "1"})
    assert rc == 0, out
    assert "b: pretrain finished, skipped" in out and "b finished" in out
    trained = re.findall(r"node 0: launch .* -m vlpt\.cli train (\S+)", log)
    assert trained == [str(tmp_path / "sw" / "b" / s / "recipe.yaml") for s in ("downstream/cap", "downstream/match")]
    assert ("node 1: launch --num_machines 2 --num_processes 2 --machine_rank 1 --main_process_ip gpu-a "
            "--main_process_port 20077 --multi_gpu -m vlpt.cli train") in log  # no config file: DDP over 2 processes
    (tmp_path / "again").mkdir()
    rc, out, _ = run_sbatch(tmp_path / "again", "", False, script=script, args=(), env={"SLURM_ARRAY_TASK_ID": "1"})
    assert rc == 0 and out.count("finished, skipped") == 3  # a requeued task after the end trains nothing


def test_the_scripts_stage_check_agrees_with_run_dir(tmp_path):
    function = re.search(r"^stage_finished\(\) \{\n.*?^\}\n", template_text(), re.M | re.S).group(0)
    cases = [(5, {"step": 5}), (5, {"step": 7}), (5, {"step": 4}), (5, None), (5, {"steps": 5}),
             (10, {"steps": 5}), (5, {"wall_s": 3}), (5, '{"host": "a", "step": 6}'), (5, "{not json")]
    for i, (steps, done) in enumerate(cases):
        run = RunDir(tmp_path / str(i))
        run.path.mkdir()
        run.recipe.write_text(yaml.safe_dump(to_dict(load_recipe(tiny_recipe(tmp_path), [f"train.steps={steps}"])),
                                             sort_keys=False))
        if isinstance(done, str):  # written by hand
            run.done.write_text(done)
        elif done is not None:
            run.mark_done(**done) if "step" in done else run.done.write_text(json.dumps(done, indent=2))
        check = subprocess.run(["bash", "-c", f"{function}\nstage_finished {run.path}"])
        assert (check.returncode == 0) == run.finished(steps), (steps, done)


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
        for v in sweep.variants:
            later = [s for s in v.stages if s.label != "pretrain"]
            assert later and all(s.recipe.model.init_from == str(v.run_dir) for s in later)
    labels = [s.label for s in shapes.variants[0].stages]
    assert labels[0] == "pretrain" and sorted(labels[1:]) == [
        "downstream/nlvr2", "downstream/refexp", "downstream/retrieval", "downstream/vqa"]
    labels = [s.label for s in real.variants[0].stages]  # UNITER's Meta-Sum tasks
    assert labels == ["pretrain", "downstream/vqa", "downstream/retrieval", "downstream/nlvr2", "downstream/refcoco"]
