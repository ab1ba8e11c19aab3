"""Shared fixtures: offline, a private cache, small generated data, a tiny recipe."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Generated data goes to a temporary cache, never the user's."""
    cache = tmp_path_factory.mktemp("vlpt-cache")
    old = os.environ.get("VLPT_CACHE")
    os.environ["VLPT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("VLPT_CACHE", None)
    else:
        os.environ["VLPT_CACHE"] = old


TINY_MODEL = {"hidden_size": 32, "layers": 2, "heads": 2, "ffn_size": 64, "max_positions": 64, "region_feature_dim": 192}


def tiny_recipe(tmp_path: Path, **sections) -> Path:
    """Write a small, fast recipe on generated shapes data; ``sections`` override top-level keys."""
    recipe = {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "model": dict(TINY_MODEL),
        "data": {
            "train": [{"shapes": {"samples": 200, "seed": 0}}],
            "val": {"shapes": {"samples": 60, "seed": 1}},
            "batch_size": 8,
            "num_workers": 0,
            "shuffle_buffer": 16,
        },
        "tasks": {"mlm": {"weight": 1, "objectives": {"mlm": 1.0}}, "itm": {"weight": 1, "objectives": {"itm": 1.0}}},
        "mixing": "sample",
        "train": {"steps": 3, "lr": 1e-3, "warmup": 1},
        "eval": {"samples": 40, "retrieval_candidates": 20, "batch_size": 32},
        "log": {"every": 1, "progress": False},
        "checkpoint": {"every": 2, "keep": 2},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(recipe.get(k), dict):
            recipe[k] = {**recipe[k], **v}
        else:
            recipe[k] = v
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
