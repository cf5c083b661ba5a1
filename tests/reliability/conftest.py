"""Fixtures for the reliability and security tests."""

from __future__ import annotations

import pytest

from recstream.settings import Settings
from tests.conftest import LocalStack, make_settings


@pytest.fixture
def settings_fuzz(local_stack: LocalStack) -> Settings:
    # The fuzzer posts far beyond any sane per-IP rate: rate limits are tested elsewhere.
    return make_settings(local_stack, rate_limit_enabled=False)
