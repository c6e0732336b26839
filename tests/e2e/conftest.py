"""The cluster fixtures live in :mod:`tests.e2e.cluster_fixture`, registered for every tier by the root
conftest (the e2e and reliability tiers share one cluster per session); tests import ``LocalCluster`` here."""

from .cluster_fixture import SESSION_GPUS, LocalCluster

__all__ = ["SESSION_GPUS", "LocalCluster"]
