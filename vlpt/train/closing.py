"""What a finished run prints: where its outputs are, its figures, and the commands that go on
from it, each one that works when copied into a shell (the run's own overrides kept, paths quoted)."""
from __future__ import annotations

import json
import shlex
import sys

from ..recipe import Recipe
from ..run_dir import RunDir


def say_done(recipe: Recipe, run: RunDir, result: dict[str, float] | None) -> None:
    out = run.path
    ckpt = run.latest_checkpoint()
    files = [p.name for p in (run.recipe, run.metrics, run.eval, run.done) if p.exists()]
    files += [f"{ckpt.relative_to(out)}/"] if ckpt else []
    print(f"vlpt: done. outputs in {out}/ ({', '.join(files)})", file=sys.stderr)
    if result:
        shown = {k: round(v, 3) for k, v in result.items() if k != "step"}
        print("vlpt: eval " + json.dumps(shown), file=sys.stderr)
    if recipe.data.val is not None:
        print(f"vlpt: evaluate again: vlpt eval {shlex.quote(str(out))}", file=sys.stderr)
    print(f"vlpt: train further:  {train_further_command(recipe, out)} (resumes from the latest checkpoint)",
          file=sys.stderr)


def train_further_command(recipe: Recipe, out) -> str:
    """The ``vlpt train`` line that continues a run: its recipe file and the overrides it was started
    with (the same model, data and init), its folder, and ``train.steps=N``."""
    kept = [o for o in recipe.overrides if o.split("=", 1)[0].strip() not in ("output_dir", "train.steps")]
    words = [recipe.source or "RECIPE", *kept, f"output_dir={out}", "train.steps=N"]
    return "vlpt train " + " ".join(shlex.quote(w) if w != "train.steps=N" else w for w in words)
