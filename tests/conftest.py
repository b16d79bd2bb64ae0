"""Shared test set-up: one torch thread (the CI machine has two cores shared with other jobs)."""

import os

import torch
from hypothesis import settings

torch.set_num_threads(1)

# Property tests: a fixed, derandomized budget in CI; BAYESFLOW_HYPOTHESIS_PROFILE=thorough for more.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("BAYESFLOW_HYPOTHESIS_PROFILE", "ci"))
