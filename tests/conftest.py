"""Test-wide settings: hypothesis profiles and the markers that split fast tests from the rest."""

from __future__ import annotations

import os

from hypothesis import settings

# "mutation": the same examples on every run and nothing written to disk, so that a mutant is
# judged by the tests, not by luck (scripts/mutate.py selects it).
settings.register_profile("mutation", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
