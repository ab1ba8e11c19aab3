"""The local launcher: every stage of every variant in turn, here, one ``vlpt train`` process each.

A stage's output goes to the console and is appended to its ``train.log``. A stage counts as
done when its ``done.json`` says it reached ``train.steps`` (the trainer writes it), whatever the
exit code; a failed variant does not stop the others. Ctrl-C or SIGTERM stops the current run,
which checkpoints at the next step: the next ``vlpt sweep`` resumes it.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from .spec import Stage, Sweep, Variant
from .state import stage_state, variant_state, write_recipe

STOP_GRACE_S = 60  # how long a stopped run may take to write its checkpoint before it is killed


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train_command(stage: Stage) -> list[str]:
    return [sys.executable, "-m", "vlpt.cli", "train", str(stage.recipe_path)]


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM (vlpt checkpoints at the next step boundary and exits) and up to ``grace`` seconds to
    exit, then SIGKILL to its whole process group (data-loader workers too)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_logged(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd`` in its own process group, its output to the console and appended to ``log_path``;
    its exit code."""
    with open(log_path, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            _stop(proc, grace=STOP_GRACE_S)
            raise
        finally:
            reader.join(timeout=10)
    return rc


def run_stage(stage: Stage, cmd: list[str] | None = None) -> bool:
    """Train one stage to its end here (``vlpt train`` resumes it from its checkpoints); True when
    its ``done.json`` says it reached ``train.steps``."""
    rc = run_logged(cmd or train_command(stage), stage.run.train_log)
    if not stage.finished():
        why = f"failed (exit {rc})" if rc != 0 else f"exited without reaching step {stage.recipe.train.steps}"
        print(f"vlpt sweep: {stage.run_dir}: training {why}; see {stage.run.train_log}", file=sys.stderr)
        return False
    if rc != 0:
        print(f"vlpt sweep: note: {stage.run_dir} exited with code {rc} after it was marked done; "
              "its results are complete", file=sys.stderr)
    return True


def run_variant(v: Variant, head: str) -> bool:
    """The variant's unfinished stages in order; False at the first that fails."""
    for stage in v.stages:
        if stage.finished():
            continue
        if not write_recipe(stage):
            print(f"{head}: {stage.label} FAILED (cannot resume)", file=sys.stderr)
            return False
        print(f"{head}: {stage.label} ({stage_state(stage)}) -> {stage.run_dir}", file=sys.stderr)
        t0 = time.time()
        ok = run_stage(stage)
        print(f"{head}: {stage.label} {'done' if ok else 'FAILED'} in {hms(time.time() - t0)}", file=sys.stderr)
        if not ok:
            return False
    return True


def run_local(sweep: Sweep, variants: list[Variant]) -> int:
    failed = []
    t_sweep = time.time()
    for i, v in enumerate(variants):
        head = f"vlpt sweep: [{i + 1}/{len(variants)}] {v.name}"
        if variant_state(v) == "finished":
            for stage in v.stages:
                write_recipe(stage)  # only a note when the recipe changed since: a finished run is kept
            print(f"{head}: finished, skipped", file=sys.stderr)
        elif not run_variant(v, head):
            failed.append(v.name)
    print(f"vlpt sweep: {len(variants) - len(failed)} of {len(variants)} variant(s) finished "
          f"({hms(time.time() - t_sweep)} this time); compare them: vlpt report {shlex.quote(str(sweep.output_dir))}",
          file=sys.stderr)
    if failed:
        print(f"vlpt sweep: failed: {', '.join(failed)} (run the sweep again to retry; finished ones are skipped)",
              file=sys.stderr)
        return 1
    return 0
