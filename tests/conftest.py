"""Shared by every test module."""

import pytest

from pefrl.models import prequantized


@pytest.fixture(autouse=True)
def _quantized_cache(tmp_path, monkeypatch):
    """4-bit bases quantized in a test (model.prequantize, on by default) go to the test's own directory, not
    to the user's cache, where every run's fresh tmp_path model would leave an entry."""
    monkeypatch.setattr(prequantized, "cache_dir", lambda: tmp_path / "quantized-cache")
