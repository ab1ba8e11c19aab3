"""Custom objectives as a workflow: a ``.py`` plugin named in a recipe, an installed package's
entry point, the mistakes a user can make (exit 2, one clear line) and ``vlpt new-objective``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import yaml

import vlpt.registry as registry
from vlpt.cli import main as vlpt_main

from conftest import tiny_recipe

FIVE_STEPS = dict(train={"steps": 5, "lr": 1e-3, "warmup": 1},
                  checkpoint={"every": None, "keep": 1, "at_end": False}, eval={"at_end": False})

# A plugin file: predicts the caption's length in word pieces from the pooled [CLS] state.
CAPTION_LENGTH = '''
from dataclasses import dataclass
import torch.nn.functional as F
from torch import nn
from vlpt import Objective, ObjectiveOutput, register_objective

@register_objective("caption_length")
class CaptionLength(Objective):
    needs = {"text", "image"}

    @dataclass
    class Options:
        max_len: int = 64

    def __init__(self, options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        self.head = nn.Linear(model.config.hidden_size, options.max_len)

    def prepare(self, sample, rng, pool=None):
        sample["caption_length"] = min(len(sample["input_ids"]), self.options.max_len - 1)
        return sample

    def forward(self, out, batch):
        logits = self.head(out.pooled)
        loss = F.cross_entropy(logits.float(), batch["caption_length"])
        return ObjectiveOutput(loss, {"acc": (logits.argmax(-1) == batch["caption_length"]).float().mean()})
'''

# An installed package's module: counts regions (registered through its entry point).
REGION_COUNT = '''
import torch.nn.functional as F
from torch import nn
from vlpt import Objective, ObjectiveOutput, register_objective

@register_objective("toy_region_count")
class ToyRegionCount(Objective):
    """Predict how many regions an image has."""
    def __init__(self, options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        self.head = nn.Linear(model.config.hidden_size, 8)

    def prepare(self, sample, rng, pool=None):
        sample["toy_count"] = min(len(sample["features"]), 7)
        return sample

    def forward(self, out, batch):
        return ObjectiveOutput(F.cross_entropy(self.head(out.pooled).float(), batch["toy_count"]))
'''


def install_package(site: Path, package: str, objective: str, code: str, value: str | None = None) -> None:
    """What ``pip install`` leaves for a package with an entry point: the module and a ``.dist-info``."""
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(code)
    info = site / f"{package}-0.1.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1\n")
    info.joinpath("entry_points.txt").write_text(f"[vlpt.objectives]\n{objective} = {value or package}\n")


def _env(**extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for k, v in extra.items():
        env[k] = v + (os.pathsep + env[k] if env.get(k) else "")
    return env


def _vlpt(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlpt.cli", *args], capture_output=True, text=True, timeout=300,
                          env=_env(**env))


# -- a plugin file and an entry-point package, trained together --------------------------------


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory):
    """5 updates of two tasks (mixing: sum): one objective from a plugin file outside the
    repository, one from an installed package's entry point."""
    tmp = tmp_path_factory.mktemp("plugins")
    (tmp / "my_objectives").mkdir()
    plugin = tmp / "my_objectives" / "caption_length.py"
    plugin.write_text(CAPTION_LENGTH)
    install_package(tmp / "site", "vlpt_toy_pkg", "toy_region_count", REGION_COUNT)
    recipe = tiny_recipe(tmp, plugins=["my_objectives/caption_length.py"], mixing="sum", **FIVE_STEPS)
    raw = yaml.safe_load(recipe.read_text())
    raw["tasks"] = {"length": {"weight": 1, "objectives": {"caption_length": {"weight": 1.0, "max_len": 32}}},
                    "count": {"weight": 1, "objectives": {"toy_region_count": 1.0}}}
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))  # the plugin path is relative to the recipe's folder
    res = _vlpt("train", str(recipe), PYTHONPATH=str(tmp / "site"))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return tmp, [rec for rec in lines if "loss" in rec]


def test_plugin_file_outside_the_repository_trains(plugin_run):
    _, lines = plugin_run
    assert [rec["step"] for rec in lines] == [1, 2, 3, 4, 5]
    assert all(rec["caption_length/loss"] > 0 and 0 <= rec["caption_length/acc"] <= 1 for rec in lines)


def test_entry_point_package_objective_trains_and_is_listed(plugin_run):
    tmp, lines = plugin_run
    assert all(rec["toy_region_count/loss"] > 0 for rec in lines)
    res = _vlpt("objectives", PYTHONPATH=str(tmp / "site"))
    assert res.returncode == 0, res.stderr
    listed = next(line for line in res.stdout.splitlines() if line.startswith("toy_region_count"))
    assert "package vlpt-toy-pkg" in listed
    assert "Predict how many regions" in res.stdout


# -- mistakes: exit 2 and one line that says what is wrong ------------------------------------


@pytest.fixture
def fresh_registry(monkeypatch):
    """Registry state and plugin modules restored after the test (errors are tried in-process)."""
    registry.load_entry_points()  # the built-ins are in the state that is copied
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("vlpt_plugin_", "broken_pkg", "dup_pkg")):
            del sys.modules[name]


def _dry_run(tmp_path: Path, capsys, plugins: list[str], objectives: dict) -> tuple[int, str]:
    recipe = tiny_recipe(tmp_path, plugins=plugins)
    raw = yaml.safe_load(recipe.read_text())
    raw["tasks"] = {"t": {"weight": 1, "objectives": objectives}}
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    capsys.readouterr()
    rc = vlpt_main(["train", str(recipe), "--dry-run"])
    return rc, capsys.readouterr().err


def _plugin(tmp_path: Path, name: str, code: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return str(path)


def test_plugin_taking_a_builtin_name_is_an_error(tmp_path, capsys, fresh_registry):
    code = CAPTION_LENGTH.replace('"caption_length")', '"mlm")')
    rc, err = _dry_run(tmp_path, capsys, [_plugin(tmp_path, "my_mlm.py", code)], {"mlm": 1.0})
    assert rc == 2
    assert "objective name 'mlm' is registered twice" in err and "my_mlm.py" in err and "package vlpt" in err
    assert len(err.strip().splitlines()) == 1


def test_two_plugins_with_one_name_is_an_error(tmp_path, capsys, fresh_registry):
    a = _plugin(tmp_path, "first.py", CAPTION_LENGTH)
    b = _plugin(tmp_path, "second.py", CAPTION_LENGTH.replace("class CaptionLength", "class OtherLength"))
    rc, err = _dry_run(tmp_path, capsys, [a, b], {"caption_length": 1.0})
    assert rc == 2 and "'caption_length' is registered twice" in err
    assert "first.py" in err and "second.py" in err and "OtherLength" in err


@pytest.mark.parametrize("code, says", [
    ("import not_a_module_anywhere\n", "ModuleNotFoundError"),
    ("def broken(:\n", "SyntaxError"),
    ("raise RuntimeError('plugin set-up failed')\n", "plugin set-up failed"),
])
def test_plugin_that_fails_to_import_is_an_error(tmp_path, capsys, fresh_registry, code, says):
    rc, err = _dry_run(tmp_path, capsys, [_plugin(tmp_path, "bad.py", code)], {"mlm": 1.0})
    assert rc == 2 and "plugins: '" in err and "bad.py' failed to import" in err and says in err
    assert not any(name.startswith("vlpt_plugin_") and name.endswith("bad") for name in sys.modules)


def test_missing_plugin_file_and_module_are_errors(tmp_path, capsys, fresh_registry):
    rc, err = _dry_run(tmp_path, capsys, ["nowhere/objective.py"], {"mlm": 1.0})
    assert rc == 2 and "plugins: file 'nowhere/objective.py' not found" in err
    rc, err = _dry_run(tmp_path, capsys, ["no_such_plugin_module"], {"mlm": 1.0})
    assert rc == 2 and "module 'no_such_plugin_module' not found" in err


def test_needs_an_unknown_modality_is_an_error(tmp_path, capsys, fresh_registry):
    code = CAPTION_LENGTH.replace('needs = {"text", "image"}', 'needs = {"text", "audio"}')
    rc, err = _dry_run(tmp_path, capsys, [_plugin(tmp_path, "audio.py", code)], {"caption_length": 1.0})
    assert rc == 2 and "needs unknown modalities ['audio']" in err


def _entry_points_from(monkeypatch, site: Path) -> None:
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)


def test_package_that_fails_to_import_is_an_error(tmp_path, capsys, fresh_registry, monkeypatch):
    install_package(tmp_path / "site", "broken_pkg", "broken", "import not_installed_dependency\n")
    _entry_points_from(monkeypatch, tmp_path / "site")
    rc, err = _dry_run(tmp_path, capsys, [], {"mlm": 1.0})
    assert rc == 2
    assert "'broken_pkg' from package broken-pkg" in err and "failed to import" in err and "uninstall" in err


def test_package_advertising_a_builtin_name_is_an_error(tmp_path, capsys, fresh_registry, monkeypatch):
    install_package(tmp_path / "site", "dup_pkg", "itm", REGION_COUNT.replace('"toy_region_count"', '"itm"'))
    _entry_points_from(monkeypatch, tmp_path / "site")
    rc, err = _dry_run(tmp_path, capsys, [], {"mlm": 1.0})
    assert rc == 2 and "'itm' is advertised twice" in err and "package vlpt " in err and "package dup-pkg" in err


def test_package_registering_a_builtin_name_is_an_error(tmp_path, capsys, fresh_registry, monkeypatch):
    install_package(tmp_path / "site", "dup_pkg2", "dup_thing", REGION_COUNT.replace('"toy_region_count"', '"itm"'))
    _entry_points_from(monkeypatch, tmp_path / "site")
    rc, err = _dry_run(tmp_path, capsys, [], {"mlm": 1.0})
    assert rc == 2 and "'itm' is registered twice" in err and "ToyRegionCount (package dup-pkg2" in err


def test_entry_point_that_registers_nothing_is_an_error(tmp_path, capsys, fresh_registry, monkeypatch):
    install_package(tmp_path / "site", "broken_pkg_empty", "empty", "X = 1\n")
    _entry_points_from(monkeypatch, tmp_path / "site")
    rc, err = _dry_run(tmp_path, capsys, [], {"mlm": 1.0})
    assert rc == 2 and "registers no objective named 'empty'" in err


def _caption_only_shards(folder: Path) -> Path:
    """Shards whose samples carry a caption and no image, with the shapes tokenizer beside them."""
    from vlpt.data.shapes import write_shapes

    shapes = write_shapes(folder / "shapes", 16, progress=False)
    folder.joinpath("tokenizer.json").write_bytes((folder / "shapes" / "tokenizer.json").read_bytes())
    out = folder / "captions-000000.tar"
    with tarfile.open(shapes[0]) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            if member.name.endswith(".txt"):
                dst.addfile(member, src.extractfile(member))
    return out


def test_caption_only_source_feeds_only_text_tasks(tmp_path, capsys):
    """Two sources, one caption-only: the text-only task reads both, itm only the one with images."""
    from vlpt.data.shapes import write_shapes

    captions = _caption_only_shards(tmp_path)
    images = write_shapes(tmp_path / "with-images", 40, progress=False)
    plugin = tmp_path / "text_only.py"
    plugin.write_text(textwrap.dedent("""
        from vlpt import Objective, ObjectiveOutput, register_objective
        from torch import nn

        @register_objective("text_only")
        class TextOnly(Objective):
            needs = {"text"}
            def __init__(self, options, model, tokenizer):
                super().__init__(options, model, tokenizer)
                self.head = nn.Linear(model.config.hidden_size, 1)
            def forward(self, out, batch):
                return ObjectiveOutput(self.head(out.pooled).pow(2).mean())
    """))
    recipe = tiny_recipe(tmp_path, plugins=[str(plugin)],
                         data={"train": [{"shards": str(captions)}, {"shards": str(images[0])}], "val": None},
                         tasks={"mlm": {"weight": 0, "objectives": {"mlm": 1.0}},
                                "words": {"weight": 1, "objectives": {"text_only": 1.0}},
                                "itm": {"weight": 1, "objectives": {"itm": 1.0}}},
                         **{**FIVE_STEPS, "train": {"steps": 12, "lr": 1e-3, "warmup": 1}})
    assert vlpt_main(["train", str(recipe)]) == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"words", "itm"} <= {r.get("task") for r in rows}
    # the routing itself: itm reads only the source with images, the text task both, without regions
    from vlpt.build import build_model, decode_settings, task_streams
    from vlpt.data.sources import probe_sources, resolve_sources
    from vlpt.recipe import load_recipe

    r = load_recipe(recipe)
    built = build_model(r)
    sources, _ = resolve_sources(r, progress=False)
    feeding = probe_sources(built.tasks, sources, decode_settings(r, built.model), built.tokenizer)
    tasks = [t.name for t in built.tasks]
    assert dict(zip(tasks, feeding)) == {"words": [0, 1], "itm": [1]}  # itm: only the source with images
    streams = task_streams(built, sources, feeding=feeding)
    assert [len(streams[t].sources) for t in ("words", "itm")] == [2, 1]
    batch = next(iter(streams["words"]))
    assert "input_ids" in batch and "features" not in batch


def test_data_that_cannot_meet_needs_stops_before_training(tmp_path, capsys):
    shards = _caption_only_shards(tmp_path)
    recipe = tiny_recipe(tmp_path, data={"train": [{"shards": str(shards)}], "val": None}, **FIVE_STEPS)
    capsys.readouterr()
    rc = vlpt_main(["train", str(recipe)])
    err = capsys.readouterr().err
    assert rc == 2 and "need image+text" in err and "carry only text" in err and "tasks.mlm" in err


# -- vlpt new-objective ------------------------------------------------------------------------


def test_new_objective_writes_a_plugin_whose_own_test_trains(tmp_path, capsys):
    folder = tmp_path / "mine"
    assert vlpt_main(["new-objective", "region_count", "--dir", str(folder)]) == 0
    plugin, test = folder / "region_count.py", folder / "test_region_count.py"
    assert plugin.is_file() and test.is_file() and "test_region_count.py" in capsys.readouterr().out
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                         cwd=folder, capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "2 passed" in res.stdout


@pytest.mark.parametrize("name, says", [
    ("Region-Count", "lowercase Python identifier"),
    ("class", "not a keyword"),
    ("2count", "lowercase Python identifier"),
    ("test_thing", "pytest would collect"),
    ("json", "standard module"),
    ("mlm", "already registered"),
])
def test_new_objective_refuses_bad_names(tmp_path, capsys, name, says):
    assert vlpt_main(["new-objective", name, "--dir", str(tmp_path)]) == 2
    assert says in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_new_objective_keeps_existing_files_unless_forced(tmp_path, capsys):
    (tmp_path / "counting.py").write_text("# mine\n")
    assert vlpt_main(["new-objective", "counting", "--dir", str(tmp_path)]) == 2
    assert "already exists; use --force" in capsys.readouterr().err
    assert (tmp_path / "counting.py").read_text() == "# mine\n" and not (tmp_path / "test_counting.py").exists()
    assert vlpt_main(["new-objective", "counting", "--dir", str(tmp_path), "--force"]) == 0
    assert '@register_objective("counting")' in (tmp_path / "counting.py").read_text()
    assert "class Counting(Objective)" in (tmp_path / "counting.py").read_text()


def test_objectives_lists_a_recipes_plugins(tmp_path, capsys, fresh_registry):
    plugin = tmp_path / "caption_length.py"
    plugin.write_text(CAPTION_LENGTH.replace('"caption_length")', '"caption_length_listed")'))
    recipe = tiny_recipe(tmp_path, plugins=[str(plugin)])
    assert vlpt_main(["objectives", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "caption_length_listed" in out and "caption_length.py" in out
    assert "itm" in out and "draws from a pool" in out and "mrc_kl" in out and "reads soft_labels" in out


# Two plugins that share a value within a task: one leaves scores in `out.shared`, one reads them.
SHARED_PAIR = '''
from dataclasses import dataclass
import torch
from vlpt import Objective, ObjectiveOutput, register_objective

@register_objective("scorer")
class Scorer(Objective):
    needs = {"text", "image"}
    provides = ("pair_scores",)

    def forward(self, out, batch):
        out.shared["pair_scores"] = out.pooled.sum(-1)
        return ObjectiveOutput(out.pooled.sum() * 0)

@register_objective("reader")
class Reader(Objective):
    needs = {"text", "image"}
    uses = ("pair_scores",)

    def forward(self, out, batch):
        return ObjectiveOutput(out.shared["pair_scores"].pow(2).mean())
'''


def test_a_plugin_reading_a_shared_value_no_earlier_objective_provides_fails_at_validation(tmp_path, capsys,
                                                                                            fresh_registry):
    plugin = _plugin(tmp_path, "shared_pair.py", SHARED_PAIR)
    rc, err = _dry_run(tmp_path, capsys, [plugin], {"reader": 1.0, "scorer": 1.0})  # the provider comes after
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "tasks.t.objectives.reader" in err and "'pair_scores'" in err and "put scorer before reader" in err
    rc, err = _dry_run(tmp_path, capsys, [plugin], {"reader": 1.0})  # no provider in the task: name the one there is
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "scorer does: put scorer before reader" in err, err
    rc, err = _dry_run(tmp_path, capsys, [plugin], {"scorer": 1.0, "reader": 1.0})
    assert rc == 0, err
