"""Fixtures of the stream-runtime tests."""

from __future__ import annotations

import pytest

from recstream.settings import Settings


@pytest.fixture(params=["moto", "kinesis_mock"])
def stream_settings(request: pytest.FixtureRequest) -> Settings:
    """The same test against moto (sequence numbers 1, 2, 3) and kinesis-mock (56 digits),
    with short leases and polls so the tests stay quick."""
    name = "settings" if request.param == "moto" else "kinesis_mock_settings"
    settings: Settings = request.getfixturevalue(name)
    return settings.model_copy(update={"poll_interval_s": 0.05, "lease_duration_s": 3.0})
