"""The suite's own settings: under CI, hypothesis examples are the same in every fresh clone."""
from __future__ import annotations

import os

from hypothesis import settings


def test_hypothesis_profile_follows_the_ci_variable():
    ci, dev = settings.get_profile("ci"), settings.get_profile("dev")  # both registered by conftest
    assert ci.derandomize and ci.database is None and ci.deadline is None
    assert ci.max_examples == 100, "a fixed example count, whatever hypothesis' default becomes"
    assert not dev.derandomize
    current = settings.default
    if os.environ.get("CI"):
        assert current.derandomize, "CI must replay the same examples on every run"
        assert current.database is None, "CI must not depend on a local example database"
    else:
        assert not current.derandomize, "the dev profile explores new examples"
