"""Shared fixtures: one local Spark session with Delta for the whole run, and the paths of
the real data samples in ../shared/fixtures (a missing folder fails loudly, never skips)."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def spark():
    from cvr_spark.config import SparkConfig
    from cvr_spark.spark import get_spark

    session = get_spark(SparkConfig(master="local[2]", shuffle_partitions=4, driver_memory="1g"))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    if not SHARED_FIXTURES.is_dir():
        pytest.fail(f"real data samples not found at {SHARED_FIXTURES}: clone the project beside ../shared")
    return SHARED_FIXTURES
