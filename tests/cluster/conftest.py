"""A real Slurm cluster for the Slurm tests: slurmctld plus two slurmd daemons (nodes n1, n2).

Tests that take the session-scoped ``slurm_cluster`` fixture are marked ``slurm`` (deselect them
with ``pytest -m "not slurm"``). The fixture installs Slurm from apt when it is missing and we are
root (``cluster/testing/install_slurm.sh``; CI runs ``make test`` as root on a fresh Debian), and
skips with the script's one-line reason otherwise. While it is up, ``os.environ["SLURM_CONF"]``
points at its slurm.conf, so code under test can call sbatch/scontrol/sinfo directly; subprocesses
started with an explicit ``env=`` should use ``slurm_cluster.env()``.
"""

from __future__ import annotations

import os

import pytest

from pali3_train.cluster.testing.local_cluster import LocalSlurmCluster, install_slurm


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A started LocalSlurmCluster: ``.env()``, ``.workdir``, ``.conf``, ``.partition == "debug"``,
    ``.nodes == ["n1", "n2"]`` (2 CPUs and 2 fake GPUs each), ``.start_seconds``, ``.logs()``."""
    ok, reason = install_slurm()
    if not ok:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs slurmctld/slurmd as root (SlurmUser=root)")
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), gpus_per_node=2)
    try:
        cluster.start(timeout=60)
    except RuntimeError as error:  # a daemon died or nodes never became idle: its logs
        pytest.fail(str(error), pytrace=False)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()
