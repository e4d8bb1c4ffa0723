"""The Hugging Face hook's tests run tiny random-init ``transformers`` models on a CPU."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (extra 'server')")
