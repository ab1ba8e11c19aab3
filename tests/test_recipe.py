"""Recipes: extends, dotted overrides, and errors that exit 2 naming the key."""
import shlex
import subprocess
import sys

import pytest
import yaml

from vlpt.errors import RecipeError
from vlpt.recipe import load_recipe

from conftest import REPO, tiny_recipe


def _vlpt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlpt.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_extends_and_overrides(tmp_path):
    base = tiny_recipe(tmp_path)
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": base.name, "train": {"lr": 0.5}, "seed": 3}))
    r = load_recipe(child, ["train.steps=7", "model.hidden_size=64", "tasks.itm.weight=2", "data.train.0.weight=3"])
    assert r.train.lr == 0.5 and r.train.steps == 7 and r.train.warmup == 1  # child, override, base
    assert r.seed == 3 and r.model.hidden_size == 64 and r.model.layers == 2
    assert r.tasks["itm"].weight == 2 and r.data.train[0].weight == 3
    assert r.train.betas == [0.9, 0.98]  # default


def test_scientific_notation_string_is_a_float(tmp_path):
    r = load_recipe(tiny_recipe(tmp_path), ["train.lr=1e-4"])
    assert r.train.lr == 1e-4


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "train.lrr' (did you mean 'train.lr'"),
        ("trian.steps=1", "'trian' (did you mean 'train'"),
        ("train.steps=abc", "'train.steps' must be an integer"),
        ("mixing=summ", "'mixing' must be 'sample' or 'sum'"),
        ("train.precision=fp8", "'train.precision'"),
    ],
)
def test_bad_keys_raise_naming_the_key(tmp_path, override, expected):
    with pytest.raises(RecipeError) as e:
        load_recipe(tiny_recipe(tmp_path), [override])
    assert expected in str(e.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "did you mean 'train.lr'"),
        ("model.init_from=/nonexistent/bert", "model.init_from"),
        ("tasks.mlm.objectives.mlmm=1", "unknown objective 'mlmm' (did you mean 'mlm'"),
        ("tasks.mlm.objectives.mlm={weight: 1, probb: 0.2}", "tasks.mlm.objectives.mlm.probb"),
        ("tasks.mlm.objectives.mlm={weigth: 1}", "did you mean 'tasks.mlm.objectives.mlm.weight'"),
        (f"model.init_from={REPO / 'README.md'}", "README.md' is a file; name the folder that holds it"),
        ("data.batch_size=0", "recipe key 'data.batch_size' must be at least 1, got 0"),
        ("log.every=0", "recipe key 'log.every' must be at least 1, got 0"),
        ("train.steps=-1", "recipe key 'train.steps' must be at least 1, got -1"),
        ("data.num_workers=-1", "recipe key 'data.num_workers' must be at least 0, got -1"),
        ("model.dropout=1.5", "recipe key 'model.dropout' must be between 0 and 1, got 1.5"),
        ("model.hidden_size=31", "the hidden size must be a multiple of the number of heads"),
        ("tasks.itm.objectives.itm={weight: 1, neg_prob: 2}", "neg_prob is a probability (0 to 1), got 2"),
        ("data.train.0.shapes=null", "data.train.0"),
        ("data.train.0.shards=/nonexistent/shard-{000..003}.tar", "data.train.0"),
    ],
)
def test_cli_errors_exit_2_without_traceback(tmp_path, override, expected):
    res = _vlpt("train", str(tiny_recipe(tmp_path)), override)
    assert res.returncode == 2, res.stderr
    assert expected in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_missing_recipe_file_exits_2(tmp_path):
    res = _vlpt("train", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "nope.yaml' not found" in res.stderr and "Traceback" not in res.stderr


def test_shipped_recipes_validate():
    for name in ("quickstart.yaml",):
        r = load_recipe(REPO / "recipes" / name)
        from vlpt.tasks import resolve_tasks

        assert resolve_tasks(r)


def test_missing_shard_names_pattern(tmp_path):
    recipe = tiny_recipe(tmp_path, data={"train": [{"shards": str(tmp_path / "shard-{000..003}.tar")}]})
    res = _vlpt("train", str(recipe))
    assert res.returncode == 2 and "'data.train.0.shards'" in res.stderr and "shard-{000..003}.tar" in res.stderr


def test_a_source_of_another_kind_replaces_the_one_it_extends(tmp_path):
    from vlpt.recipe import load_raw

    parent = tmp_path / "parent.yaml"
    parent.write_text("data:\n  val: {shapes: {samples: 100, seed: 1}, weight: 2}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\ndata:\n  val: {shards: /data/val.tar}\n")
    assert load_raw(child)["data"]["val"] == {"shards": "/data/val.tar"}
    child.write_text("extends: parent.yaml\ndata:\n  val: {shapes: {seed: 2}}\n")  # same kind: merged
    assert load_raw(child)["data"]["val"] == {"shapes": {"samples": 100, "seed": 2}, "weight": 2}


def test_train_further_command_keeps_the_runs_overrides(tmp_path):
    """The line printed when a run ends continues that run: the same recipe file and overrides (a
    finetune started with model.init_from=null must not resume from the recipe's init), its folder."""
    from vlpt.train.closing import train_further_command

    path = tiny_recipe(tmp_path)
    r = load_recipe(path, ["model.init_from=null", "train.steps=5", f"output_dir={tmp_path}/my run", "train.lr=1e-4"])
    line = train_further_command(r, r.output_dir)
    assert line == (f"vlpt train {path} model.init_from=null train.lr=1e-4 'output_dir={tmp_path}/my run' "
                    "train.steps=N")
    words = shlex.split(line)
    assert words[:3] == ["vlpt", "train", str(path)]
    again = load_recipe(path, [w.replace("=N", "=9") for w in words[3:]])  # the command, as a shell would split it
    assert (again.model.init_from, again.train.lr, again.output_dir, again.train.steps) == \
        (None, 1e-4, f"{tmp_path}/my run", 9)


def test_resuming_a_run_with_another_model_is_one_line(tmp_path):
    """A run folder resumed with a recipe whose model has other weights (a task dropped, another size):
    one line naming a mismatched weight and exit 2, not torch's list of keys."""
    path = tiny_recipe(tmp_path)
    assert _vlpt("train", str(path)).returncode == 0
    for override, expected in (("tasks.itm=null", "2 the checkpoint has and this recipe's model lacks (e.g. "
                                                  "objectives.itm.head."),
                               ("model.ffn_size=96", "of other shapes (e.g. vl.trunk.layers.0.ffn_in.weight")):
        res = _vlpt("train", str(path), "train.steps=5", override)
        assert res.returncode == 2, res.stderr
        assert "holds another model than this recipe builds" in res.stderr and expected in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) <= 2, res.stderr


def test_which_changed_keys_change_a_models_weights():
    from vlpt.sweep.state import changes_weights

    assert [k for k in ("model.hidden_size", "tasks.itm", "tasks.itm.objectives", "tasks.itm.objectives.wra",
                        "model.image_backbone.name") if not changes_weights(k)] == []
    assert [k for k in ("train.lr", "tasks.itm.weight", "tasks.itm.objectives.itm.neg_prob", "model.dropout",
                        "data.batch_size") if changes_weights(k)] == []
