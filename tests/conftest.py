"""Shared fixtures: offline, a private cache, small generated data, a tiny recipe."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

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


from vlpt.testing import TINY_MODEL, tiny_recipe  # noqa: E402,F401  (the kit's, shared by every test)
