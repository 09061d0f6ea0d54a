"""The workspace the README's commands and the design's example lines run in (built once)."""

import pytest

from tests.docs.workspace import build_workspace


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, shared_data):
    ws = build_workspace(tmp_path_factory.mktemp("readme"), shared_data)
    yield ws
    ws.close()
