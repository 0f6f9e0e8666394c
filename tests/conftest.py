"""Shared test setup: an isolated feature/text cache for the whole session."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _xmodal_cache(tmp_path_factory):
    if "XMODAL_TEST_CACHE" in os.environ:  # reuse a cache between local runs
        os.environ["XMODAL_CACHE"] = os.environ["XMODAL_TEST_CACHE"]
    else:
        os.environ["XMODAL_CACHE"] = str(tmp_path_factory.mktemp("xmodal_cache"))
    yield
