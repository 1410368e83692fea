"""The connection budget derived from the fd limit."""

import resource

import pytest

from relay.config import Config
from relay.net import admission


@pytest.mark.parametrize("soft,expected", [(256, (256 - 64) // 6), (1024, (1024 - 200) // 6), (20000, 3300), (8, 1)])
def test_budget_from_the_fd_limit(monkeypatch, soft, expected):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, soft))
    config = Config.from_values({"upstream": ["127.0.0.1:3128"]}, source="test", complete=True)
    assert admission.connection_budget(config) == expected


def test_max_connections_wins(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, 256))
    config = Config.from_values(
        {"upstream": ["127.0.0.1:3128"], "max-connections": "5000"}, source="test", complete=True
    )
    assert admission.connection_budget(config) == 5000
