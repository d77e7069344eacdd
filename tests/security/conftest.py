"""Fixtures of the adversarial suite: real processes started by the project's own helpers."""

from __future__ import annotations

# Bridge's adversarial tests run against the same small platform as the interface tests.
from tests.interfaces.conftest import extra_bridge, platform  # noqa: F401
