"""Shared test configuration. Keep minimal: other fixtures may be appended below.

Every hypothesis test runs under the "ci" profile: ``derandomize=True`` draws examples from a fixed
seed (reproducible runs), ``deadline=None`` because timings on a shared machine vary too much for
per-example deadlines, and ``print_blob=True`` prints the blob that replays a failure.
"""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("ci")
