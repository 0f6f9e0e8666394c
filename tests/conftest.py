"""Shared test setup: an isolated feature/text cache for the whole session."""
from __future__ import annotations

import os

import pytest

# One intra-op thread: the suite's models are tiny, and OpenMP threads spin-waiting on a
# busy 2-core machine make small ops 50x slower. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def _xmodal_cache(tmp_path_factory):
    if "XMODAL_TEST_CACHE" in os.environ:  # reuse a cache between local runs
        os.environ["XMODAL_CACHE"] = os.environ["XMODAL_TEST_CACHE"]
    else:
        os.environ["XMODAL_CACHE"] = str(tmp_path_factory.mktemp("xmodal_cache"))
    yield
