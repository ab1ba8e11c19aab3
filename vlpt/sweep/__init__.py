"""Ablation sweeps: many recipe variants, one command, one comparison table.

``vlpt sweep SWEEP.yaml`` expands a sweep file into variants (:mod:`~vlpt.sweep.spec`), each a
pretraining run and, optionally, a common finetune and downstream tasks started from it
(:mod:`~vlpt.sweep.stages`), validates every stage's recipe before anything runs, and trains them
here (:mod:`~vlpt.sweep.local`) or as a SLURM job array (:mod:`~vlpt.sweep.slurm`, from the
project's one SLURM script, ``train.sbatch`` beside this file). ``vlpt report SWEEP_DIR``
compares them (:mod:`~vlpt.sweep.report`). The user manual is ``docs/sweeps.md``.
"""
from .command import sweep_main
from .report import report_main
from .spec import SlurmConfig, Stage, Sweep, Variant, grid_points, load_sweep, select

__all__ = ["SlurmConfig", "Stage", "Sweep", "Variant", "grid_points", "load_sweep", "report_main", "select",
           "sweep_main"]
