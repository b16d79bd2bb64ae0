"""Shared test set-up: one torch thread (the CI machine has two cores shared with other jobs)."""

import os

import torch
from hypothesis import settings

torch.set_num_threads(1)

# Property tests: a fixed, derandomized budget in CI; BAYESFLOW_HYPOTHESIS_PROFILE=thorough for more.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("BAYESFLOW_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(session, config, items):
    """posteriors' own suite (tests/test_peer_suite.py) takes minutes: start it in the background as
    soon as it is selected, so that it runs on the second core beside the rest of the suite."""
    for item in items:
        if item.nodeid.endswith("test_peer_suite.py::test_posteriors_own_tests_pass_with_the_import_renamed"):
            item.module.start()
