"""An app on the tiny checkpoint, with settings passed straight to the factory."""

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings


@pytest.fixture
def make_settings(tiny_checkpoint):
    def make(**overrides) -> Settings:
        return Settings(**{"checkpoint_dir": tiny_checkpoint, "device": "cpu", **overrides})

    return make


@pytest.fixture
def client(make_settings):
    with TestClient(create_app(make_settings())) as client:
        yield client
