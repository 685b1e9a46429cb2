"""The app on the tiny checkpoint, its lifespan running, for the route tests."""

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import tiny_settings


@pytest.fixture
def client(tiny_checkpoint):
    with TestClient(create_app(tiny_settings(tiny_checkpoint))) as client:
        yield client
