"""Shared pytest configuration: hypothesis settings profiles.

Choose one with the environment variable ``HYPOTHESIS_PROFILE``:

* ``ci`` (default): moderate, keeps the whole suite well under two minutes
  on two cores;
* ``dev``: small, for a quick edit-test loop;
* ``thorough``: large, for a nightly or pre-release run.
"""

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])

settings.register_profile("ci", max_examples=500, stateful_step_count=50, **_COMMON)
settings.register_profile("dev", max_examples=20, stateful_step_count=15, **_COMMON)
settings.register_profile("thorough", max_examples=2000, stateful_step_count=100, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
