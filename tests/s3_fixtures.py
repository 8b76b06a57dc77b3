"""pytest fixtures of the object-store tests: one moto S3 server on 127.0.0.1 per session, a fresh bucket per
test, and the environment that points every client at the server (tests/s3_server.py).

    from tests.s3_fixtures import s3, s3_url  # noqa: F401  (in a test module)
"""

from __future__ import annotations

import uuid

import pytest

from tests.s3_server import s3_server


@pytest.fixture(scope="session")
def s3_session():
    with s3_server() as server:
        yield server


@pytest.fixture
def s3(s3_session, monkeypatch):
    """The server, with AWS_ENDPOINT_URL, credentials and no-metadata-service set for this test (and its
    subprocesses); --storage-option values of earlier tests are cleared."""
    from pipeline.store.backend import set_storage_options

    for key, value in s3_session.env().items():
        monkeypatch.setenv(key, value)
    set_storage_options({})
    yield s3_session
    set_storage_options({})


@pytest.fixture
def s3_url(s3):
    """s3://<a new bucket>/cache"""
    bucket = f"genrecal-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(bucket)
    return f"s3://{bucket}/cache"
