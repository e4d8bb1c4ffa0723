"""Every check test runs twice: with the compiled block scan and with the NumPy path."""

from __future__ import annotations

import pytest

from replay_bridge import checks


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def scan_path(request, monkeypatch):
    if request.param == "numpy":
        monkeypatch.setattr(checks, "_compiled_scan", None)
    else:  # the suite's install builds it (scripts/setup.sh); a missing build is a failure
        assert checks._compiled_scan is not None, "replay_bridge._blockscan is not built"
    return request.param
