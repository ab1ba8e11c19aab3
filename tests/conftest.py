"""Shared fixtures: offline, a private cache, small generated data, a tiny recipe."""
from __future__ import annotations

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def torchrun(nproc: int, *args: str) -> list[str]:
    """A torchrun command for ``nproc`` ranks on this machine, ``args`` after it. ``--standalone``:
    torchrun picks a free port itself. (Ports made from the test process's pid overlapped between
    tests and between two test runs at once, and a job started on a port another job holds stops
    with EADDRINUSE.)"""
    return [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), *args]


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
