"""Shared fixtures: a one-node SLURM cluster (tests/slurm.py), started once per session where it can start."""
from __future__ import annotations

import pytest

from slurm import OneNodeSlurm


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node SLURM with accounting; skipped with the reason where it cannot start."""
    reason = OneNodeSlurm.unavailable()
    if reason:
        pytest.skip(reason)
    cluster = OneNodeSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except RuntimeError as e:
        cluster.stop()
        pytest.skip(f"the one-node SLURM did not start: {str(e).splitlines()[0]}")
    yield cluster
    cluster.stop()
