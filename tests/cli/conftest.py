"""CLI tests run against a real single-node mortard."""

from tests.integration.conftest import node  # noqa: F401  (a fixture, used by name)
