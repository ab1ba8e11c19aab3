"""`vlpt plot`, the accelerate launch configs and the SLURM script for a single run (fast, offline)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from vlpt.cli import main

REPO = Path(__file__).resolve().parents[1]
LAUNCH = sorted((REPO / "recipes" / "launch").glob("*.yaml"))
SBATCH = REPO / "vlpt" / "sweep" / "train.sbatch"  # the project's one SLURM script (a sweep fills it in)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(run: Path, steps: int = 40, resume_at: int | None = 20) -> Path:
    """A metrics.jsonl as the trainer writes it: sampled tasks, eval lines every 10 steps, a
    truncated last line, and (with ``resume_at``) a first attempt that logged up to step 30 (with
    loss 9.0 past ``resume_at``) before the run was resumed from the checkpoint at ``resume_at``."""
    run.mkdir(parents=True, exist_ok=True)

    def line(step: int, loss_offset: float = 0.0) -> list[str]:
        task = "mlm" if step % 3 else "itm"
        loss = 3.0 / step + (0.7 if task == "itm" else 0.0) + loss_offset
        rec = {"step": step, "task": task, "loss": loss, "lr": 1e-4 * min(1.0, step / 10), "samples_per_s": 200.0 + step,
               f"{task}/loss": loss, f"{task}/acc": 1 - 1 / (step + 1), f"loss/{task}": loss, "grad_norm": 2.0,
               "samples": 64, "tokens": 900, "padded_tokens": 1000, "flops": 1e10, "tokens_per_s": 3000.0,
               "time": 1.0e9 + step, "mfu": 0.4, "padding": 0.1, "data/skipped/empty_caption": 1}
        out = [json.dumps(rec)]
        if step % 10 == 0:
            out.append(json.dumps({"step": step, "time": 1.0e9 + step, "eval/mlm_acc": step / 50 - (0.5 if loss_offset else 0),
                                   "eval/itm_acc": 0.5 + step / 100, "eval/attr_color_acc_blind": 0.1}))
        return out

    lines = []
    if resume_at:
        for step in range(1, 31):
            lines += line(step, 0.0 if step <= resume_at else 9.0 - 3.0 / step)
    for step in range(resume_at + 1 if resume_at else 1, steps + 1):
        lines += line(step)
    path = run / "metrics.jsonl"
    path.write_text("\n".join(lines) + '\n{"step": 41, "task": "ml')  # killed mid-write
    return path


# -- vlpt plot -----------------------------------------------------------------------------

def test_collect_replaces_points_after_a_resume(tmp_path):
    from vlpt.plot import collect, read_metrics, task_losses

    records, bad = read_metrics(write_metrics(tmp_path / "run"))
    assert bad == 1
    series = collect(records)
    steps, values = series["loss/mlm"]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert steps[-1] == 40 and max(values) < 9.0  # the resumed run's lines replaced the first attempt's from step 21 on
    assert set(task_losses(records, series)) == {"mlm", "itm"}
    assert series["eval/mlm_acc"][0] == [10.0, 20.0, 30.0, 40.0]
    assert series["eval/mlm_acc"][1][2] == pytest.approx(30 / 50)  # the resumed run's evaluation at step 30, not the first's
    assert len(series["lr"][0]) == 40
    assert "task" not in series and "samples" not in series  # strings and bookkeeping are not curves


def test_task_losses_fall_back_to_the_task_field():
    from vlpt.plot import collect, task_losses

    records = [{"step": s, "task": t, "loss": 1.0 / s} for s, t in [(1, "a"), (2, "b"), (3, "a")]]
    losses = task_losses(records, collect(records))
    assert losses == {"a": ([1.0, 3.0], [1.0, 1 / 3]), "b": ([2.0], [0.5])}


def test_ema_is_unbiased_and_follows_a_constant():
    from vlpt.plot import ema

    assert ema([2.0, 2.0, 2.0], span=5) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([0.0, 10.0], span=1) == [0.0, 10.0]


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    write_metrics(run)
    assert main(["plot", str(run)]) == 0
    png = run / "metrics.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert str(png) in capsys.readouterr().out
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
        assert im.size[0] > 800 and im.size[1] > 600

    out = tmp_path / "elsewhere" / "curves.png"  # --out, and a metrics.jsonl path instead of the folder
    assert main(["plot", str(run / "metrics.jsonl"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_single_eval_and_no_eval(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": s, "task": "mlm", "loss": 1.0 / s, "lr": 1e-4, "samples_per_s": 10.0, "loss/mlm": 1.0 / s} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert main(["plot", str(run), "--out", str(tmp_path / "a.png")]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "time": 0.0, "eval/mlm_acc": 0.5, "eval/itm_acc": 0.7}) + "\n")
    assert main(["plot", str(run), "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("content", [None, "", "\n\n", "not json\n"])
def test_plot_without_metrics_is_a_user_error(tmp_path, capsys, content):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and str(run) in err and "Traceback" not in err


def test_plot_without_matplotlib_exits_2(tmp_path, capsys):
    write_metrics(tmp_path / "run")
    # None in sys.modules makes `import matplotlib` (and its submodules) raise ImportError
    blocked = {name: None for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends",
                                        "matplotlib.backends.backend_agg")}
    with mock.patch.dict(sys.modules, blocked):
        assert main(["plot", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "vlpt plot needs matplotlib: pip install 'vlpt[plot]'" in err
    assert not (tmp_path / "run" / "metrics.png").exists()


def test_plot_without_matplotlib_exits_2_from_the_command_line(tmp_path):
    """The installed `vlpt` entry point, with a matplotlib that fails to import."""
    broken = tmp_path / "broken" / "matplotlib"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('matplotlib is not installed here')\n")
    write_metrics(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "broken"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "vlpt.cli", "plot", str(tmp_path / "run")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == "vlpt: error: vlpt plot needs matplotlib: pip install 'vlpt[plot]'"


# -- accelerate launch configs ----------------------------------------------------------------

def test_launch_configs_exist():
    assert {p.name for p in LAUNCH} >= {"ddp-1x8.yaml", "ddp-4x8.yaml", "fsdp-1x8.yaml", "deepspeed-zero2-1x8.yaml"}


@pytest.mark.parametrize("path", LAUNCH, ids=lambda p: p.name)
def test_launch_config_loads(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(path))  # raises on unknown keys
    assert isinstance(cfg, ClusterConfig)
    assert cfg.mixed_precision == "bf16"
    assert cfg.num_processes == 8 * cfg.num_machines
    expected = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}
    assert cfg.distributed_type == expected[path.name.split("-")[0]]


def launch_env(path: Path, *extra: str):
    """What `accelerate launch --config_file PATH ... -m vlpt.cli train r.yaml` would hand its
    processes: accelerate's own argument handling, up to the point where it would start them."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), *extra, "-m", "vlpt.cli", "train", "r.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_multi_node_config_takes_rank_and_address_from_the_command_line():
    args, env = launch_env(REPO / "recipes/launch/ddp-4x8.yaml", "--machine_rank", "3", "--main_process_ip", "node-a")
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("4", "8", 3)
    endpoint = getattr(args, "rdzv_endpoint", None) or f"{args.master_addr}:{args.master_port}"
    assert endpoint == "node-a:29500"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_fsdp_config_wraps_trunk_layers_as_fsdp2_units():
    import accelerate.utils.dataclasses as acc_dataclasses
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    from vlpt.model import trunk

    _, env = launch_env(REPO / "recipes/launch/fsdp-1x8.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for name in env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(","):
        assert isinstance(getattr(trunk, name, None), type), f"{name} is not a class in vlpt.model.trunk"
    # The plugin the training processes build from that environment: FSDP2 (fully_shard), each
    # TrunkLayer a unit, parameters kept gathered from forward to backward (SHARD_GRAD_OP's behaviour).
    # the GPU it would run on: accelerate < 1.16 asks is_cuda_available, later releases
    # get_torch_accelerator_backend (its (device type, module) or (None, None))
    if hasattr(acc_dataclasses, "get_torch_accelerator_backend"):
        on_gpu = mock.patch.object(acc_dataclasses, "get_torch_accelerator_backend", lambda *a, **k: ("cuda", torch.cuda))
    else:
        on_gpu = mock.patch.object(acc_dataclasses, "is_cuda_available", lambda: True)
    with mock.patch.dict(os.environ, env), on_gpu, mock.patch.object(torch.cuda, "current_device", lambda: 0):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert plugin.transformer_cls_names_to_wrap == ["TrunkLayer"]


def test_deepspeed_config_is_zero2_bf16():
    from accelerate.utils import DeepSpeedPlugin

    _, env = launch_env(REPO / "recipes/launch/deepspeed-zero2-1x8.yaml")
    with mock.patch.dict(os.environ, env):
        ds = DeepSpeedPlugin().deepspeed_config
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_accumulation_steps"] == 1
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # on several nodes (vlpt/sweep/train.sbatch): one torchrun per node, no pdsh/ssh hostfile
    args, _ = launch_env(REPO / "recipes/launch/deepspeed-zero2-1x8.yaml", "--num_machines", "2", "--num_processes", "16",
                         "--machine_rank", "1", "--main_process_ip", "node-a")
    assert args.deepspeed_multinode_launcher == "standard"
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)


# -- the SLURM script ---------------------------------------------------------------------------

def test_sbatch_script_parses_and_is_installed():
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True).returncode == 0
    text = SBATCH.read_text()
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "#SBATCH --ntasks-per-node=1"):
        assert directive in text
    assert "recipes/launch/ddp-4x8.yaml" in text and (REPO / "recipes/launch/ddp-4x8.yaml").is_file()
    from importlib import resources

    assert resources.files("vlpt.sweep").joinpath("train.sbatch").read_text() == text  # what `vlpt sweep` fills in
    assert not (REPO / "tools" / "slurm").exists()  # the only SLURM script


STUBS = {
    # two nodes; `requeue` is recorded
    "scontrol": 'if [ "$1 $2" = "show hostnames" ]; then printf "gpu-a\\ngpu-b\\n"; else echo "scontrol $*" >> "$STUB_LOG"; fi\n',
    # signal every task that srun started, as SLURM signals a job's steps
    "scancel": 'echo "scancel $*" >> "$STUB_LOG"; for p in $(cat "$STUB_DIR/pids"); do kill -TERM "$p" 2>/dev/null; done\n',
    # skip srun's options, run the command once per node with its SLURM_NODEID
    "srun": 'while [ "${1#-}" != "$1" ]; do shift; done\n'
            'for n in 0 1; do SLURM_NODEID=$n "$@" & echo $! >> "$STUB_DIR/pids"; done\nwait\n',
    # a launcher that records its arguments and trains until it gets SIGTERM; with STUB_DONE, node 0
    # marks the run done as the trainer does (done.json beside the recipe, its last argument)
    "accelerate": 'echo "node $SLURM_NODEID: $*" >> "$STUB_LOG"\n'
                  'trap \'echo "node $SLURM_NODEID: checkpoint and exit" >> "$STUB_LOG"; kill $sp; exit 0\' TERM\n'
                  'if [ -n "$STUB_TRAIN_S" ]; then sleep "$STUB_TRAIN_S" & sp=$!; wait $sp; fi\n'
                  'if [ -n "${STUB_DONE:-}" ] && [ "$SLURM_NODEID" = 0 ]; then\n'
                  '  for last; do :; done; echo \'{"step": 999999}\' > "$(dirname "$last")/done.json"\nfi\n',
}


def run_sbatch(tmp_path: Path, train_s: str, stop_after_start: bool, script: Path = SBATCH,
               args: tuple = ("recipes/uniter-base.yaml", "train.steps=10"), env: dict | None = None):
    """Run ``script`` as SLURM would on two nodes, with stand-ins for srun, scontrol, scancel and
    accelerate: (exit status, output, what the stand-ins recorded)."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    (tmp_path / "pids").touch()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log),
           "STUB_DIR": str(tmp_path), "STUB_TRAIN_S": train_s, "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4", **(env or {})}
    proc = subprocess.Popen(["bash", str(script), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if stop_after_start:
        deadline = time.time() + 20
        while log.read_text().count("launch") < 2 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 delivers
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out, log.read_text()


def test_sbatch_starts_one_launcher_per_node(tmp_path):
    rc, out, log = run_sbatch(tmp_path, train_s="", stop_after_start=False)
    assert rc == 0, out
    for node in (0, 1):
        assert (f"node {node}: launch --config_file recipes/launch/ddp-4x8.yaml --num_machines 2 --num_processes 8 "
                f"--machine_rank {node} --main_process_ip gpu-a --main_process_port 29500 "
                f"-m vlpt.cli train recipes/uniter-base.yaml train.steps=10") in log
    assert "requeue" not in log and "--multi_gpu" not in log  # the config file says how to distribute


def test_sbatch_without_a_config_file_asks_for_ddp(tmp_path):
    rc, out, log = run_sbatch(tmp_path, train_s="", stop_after_start=False,
                              env={"LAUNCH_CONFIG": "", "LAUNCH_ARGS": "--mixed_precision bf16"})
    assert rc == 0, out
    assert ("node 1: launch --num_machines 2 --num_processes 8 --machine_rank 1 --main_process_ip gpu-a "
            "--main_process_port 29500 --mixed_precision bf16 --multi_gpu -m vlpt.cli train") in log


def test_sbatch_without_a_recipe_prints_its_usage(tmp_path):
    rc, out, log = run_sbatch(tmp_path, train_s="", stop_after_start=False, args=())
    assert rc == 2 and "usage: sbatch vlpt/sweep/train.sbatch RECIPE" in out and "launch" not in log


def test_sbatch_checkpoints_and_requeues_on_the_time_limit_signal(tmp_path):
    rc, out, log = run_sbatch(tmp_path, train_s="25", stop_after_start=True)
    assert rc == 0, out
    assert "scancel --signal=TERM 77" in log
    assert log.count("checkpoint and exit") == 2
    assert "scontrol requeue 77" in log
    assert "requeueing job 77" in out
