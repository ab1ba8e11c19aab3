"""The ``vlpt`` command line.

A user mistake (:class:`~vlpt.errors.UserError`) prints one line and exits 2,
without a traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError, run_command


def _train(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        return _dry_run(recipe)
    from .train.trainer import train

    train(recipe, resume=not args.no_resume, force=args.force)
    return 0


def _dry_run(recipe) -> int:
    """Validate the recipe and build the model without touching data."""
    from .build import model_config, validate
    from .data.sources import default_tokenizer_path
    from .data.tokenizer import TextTokenizer
    from .model import VLModel

    tasks = validate(recipe, data=False)  # a dry run needs no data
    if recipe.model.init_from and not Path(recipe.model.init_from).expanduser().exists():
        print(f"vlpt: note: model.init_from '{recipe.model.init_from}' does not exist yet; counting with the "
              "recipe's own sizes")
        recipe.model.init_from = None
    try:
        vocab = TextTokenizer.from_path(default_tokenizer_path(recipe)).vocab_size
    except UserError:
        vocab = None
    mcfg = model_config(recipe, vocab)
    if mcfg.vocab_size is None:
        mcfg.vocab_size = 30522
        print("vlpt: note: tokenizer not available yet; counting with BERT's vocabulary (30522)")
    vl = VLModel(mcfg)
    print(f"recipe {recipe.source}: valid")
    print("tasks: " + ", ".join(f"{t.name} (weight {t.weight}: " + ", ".join(f"{o.name}×{o.weight}" for o in t.objectives) + ")" for t in tasks))
    print(f"model: {vl.num_parameters() / 1e6:.2f}M parameters, {vl.num_parameters(exclude_embeddings=True) / 1e6:.2f}M excluding word embeddings")
    return 0


def _eval(args) -> int:
    from .evaluate_run import evaluate_run

    evaluate_run(args.run, args.checkpoint, args.overrides)
    return 0


def _export(args) -> int:
    from .errors import UserError
    from .evaluate_run import export_run

    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise UserError(f"'{args.out_dir}' is a file; name a folder to export into")
    export_run(args.run, args.out_dir)
    return 0


def _data_shapes(args) -> int:
    from .data.shapes import check_write_arguments, write_shapes
    from .errors import UserError, output_folder

    try:
        check_write_arguments(args.samples, args.shard_size, args.image_size,
                              names=("--samples", "--shard-size", "--image-size"))
    except ValueError as e:
        raise UserError(str(e)) from None
    out = output_folder(args.out, create=False)
    try:
        paths = write_shapes(args.out, args.samples, seed=args.seed, shard_size=args.shard_size,
                             image_size=args.image_size)
    except FileExistsError:
        raise UserError(f"--out '{out}' holds other files than a shapes data set; choose another folder") from None
    print(f"wrote {args.samples} samples in {len(paths)} shard(s) and tokenizer.json to {args.out}")
    return 0


def _objectives(args) -> int:
    import dataclasses

    from .recipe import load_recipe
    from .registry import load_plugin, objective_source, registered_objectives

    if args.recipe:  # also the recipe's plugins
        recipe = load_recipe(args.recipe)
        for spec in recipe.plugins:
            load_plugin(spec, Path(recipe.source).parent if recipe.source else None)
    objs = registered_objectives()
    width = max(map(len, objs), default=4) + 2
    for name, cls in objs.items():
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        extra = "".join(f", {label} {'+'.join(v) if not isinstance(v, bool) else ''}".rstrip()
                        for label, v in (("requires", cls.requires), ("reads", cls.sample_fields),
                                         ("provides", cls.provides), ("uses", cls.uses),
                                         ("draws from a pool", cls.wants_pool)) if v)
        print(f"{name:{width}s}needs {'+'.join(sorted(cls.needs))}{extra}; from {objective_source(name)}")
        if doc:
            print(f"{'':{width}s}{doc[0]}")
        for f in dataclasses.fields(cls.Options):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
            kind = getattr(f.type, "__name__", f.type)
            print(f"{'':{width}s}  {f.name}: {kind} = {default!r}")
    return 0


def _delegate(module: str, func: str):
    """A command implemented in its own module, imported only when it runs."""
    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), func)(args) or 0
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlpt", description="Single-stream vision-language pretraining with pluggable objectives.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a recipe", description="Train from a YAML recipe; key.path=value overrides any recipe key.")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="e.g. train.steps=20 output_dir=/tmp/run")
    t.add_argument("--dry-run", action="store_true", help="validate the recipe, print the model size, touch no data")
    t.add_argument("--no-resume", action="store_true", help="do not resume from checkpoints in output_dir")
    t.add_argument("--force", action="store_true", help="with --no-resume: clear output_dir's checkpoints and logs first")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a run (writes eval.json)")
    e.add_argument("run", help="a run folder (output_dir)")
    e.add_argument("overrides", nargs="*", help="e.g. eval.samples=500")
    e.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    e.set_defaults(func=_eval)

    x = sub.add_parser("export", help="export the trunk as a Hugging Face BERT checkpoint")
    x.add_argument("run", help="a run folder or a checkpoint folder")
    x.add_argument("out_dir")
    x.set_defaults(func=_export)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("shapes", help="generate the synthetic shapes data set as webdataset shards")
    s.add_argument("--out", required=True)
    s.add_argument("--samples", type=int, default=20000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=2000)
    s.add_argument("--image-size", type=int, default=64)
    s.set_defaults(func=_data_shapes)
    i = dsub.add_parser("inspect", help="count samples, histogram caption lengths and regions, list fields and bad samples",
                        description="Read webdataset shards and summarise them: sample count, caption-length and "
                                    "regions-per-image histograms, fields present, bad samples by reason.")
    i.add_argument("shards", nargs="+", help="shard paths, brace patterns or globs")
    i.add_argument("--limit", type=int, default=None, help="read at most this many samples")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--tokenizer", default=None, help="tokenizer.json or BERT folder for caption lengths "
                                                     "(default: tokenizer.json beside the first shard, else words)")
    i.add_argument("--max-text-len", type=int, default=60, help="data.max_text_len: longer captions count as caption_too_long")
    i.add_argument("--feature-dim", type=int, default=None, help="model.region_feature_dim: other sizes count as bad_regions")
    i.set_defaults(func=_delegate("vlpt.data.inspect", "main"))

    k = dsub.add_parser("tokenizer", help="learn a WordPiece tokenizer.json from the captions of any shards",
                        description="Train a BERT-style WordPiece vocabulary on the txt members of shards "
                                    "(paths, brace patterns, globs or folders) and write tokenizer.json.")
    k.add_argument("shards", nargs="+", help="shard paths, brace patterns, globs or folders")
    k.add_argument("--out", required=True, help="the tokenizer.json to write")
    k.add_argument("--vocab-size", type=int, default=8000, help="word pieces including the specials (default: 8000)")
    k.add_argument("--limit", type=int, default=None, help="read at most this many captions")
    k.add_argument("--cased", action="store_true", help="keep case (default: lowercase, as bert-base-uncased)")
    k.add_argument("--quiet", action="store_true", help="no progress bar")
    k.set_defaults(func=_delegate("vlpt.data.vocab", "main"))

    o = sub.add_parser("objectives", help="list registered objectives and their options")
    o.add_argument("recipe", nargs="?", help="also list the objectives of this recipe's plugins")
    o.set_defaults(func=_objectives)

    n = sub.add_parser("new-objective", help="write a working objective plugin and its test, ready to edit")
    n.add_argument("name", help="the objective's name (a Python identifier)")
    n.add_argument("--dir", default=".", help="folder to write NAME.py and test_NAME.py into (default: .)")
    n.add_argument("--force", action="store_true", help="overwrite existing files")
    n.set_defaults(func=_delegate("vlpt.scaffold", "main"))

    w = sub.add_parser("sweep", help="run a grid or list of recipe variants (ablations)",
                       description="Run a sweep file's variants; key.path=value overrides apply to every variant.")
    w.add_argument("sweep", help="a sweep YAML file")
    w.add_argument("overrides", nargs="*", help="e.g. train.steps=20 output_dir=sweeps/other (before --only)")
    w.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: run the variants in turn here; slurm: write an sbatch array script")
    w.add_argument("--dry-run", action="store_true", help="list the variants (and write the script for slurm); run nothing")
    w.add_argument("--only", nargs="*", default=None, help="run only these variants")
    w.set_defaults(func=_delegate("vlpt.sweep.command", "sweep_main"))

    r = sub.add_parser("report", help="compare the variants of a sweep: markdown table, CSV, PNG")
    r.add_argument("sweep_dir", help="the sweep's output folder")
    r.add_argument("--metrics", nargs="*", default=None, help="columns to show (default: the sweep file's report.metrics, else every "
                   "eval.json metric; with downstream tasks, their listed metrics and meta_sum first)")
    r.set_defaults(func=_delegate("vlpt.sweep.report", "report_main"))

    pl = sub.add_parser("plot", help="draw loss per task and eval metrics over steps to a PNG (needs matplotlib)")
    pl.add_argument("run", help="a run folder (output_dir)")
    pl.add_argument("--out", default=None, help="PNG path (default: RUN/metrics.png)")
    pl.set_defaults(func=_delegate("vlpt.plot", "main"))
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    # overrides may come before or after flags: `vlpt train r.yaml --force a.b=1 c=2`
    args, extra = parser.parse_known_args(argv)
    if extra:
        bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return run_command("vlpt", args.func, args)
    except BrokenPipeError:  # e.g. `vlpt objectives | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
