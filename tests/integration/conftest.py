"""Session-wide servers for the scale-out tests (see tests/servers.py): one S3 endpoint and one
PostgreSQL cluster per test session, on 127.0.0.1, started on first use and stopped at the end."""

from __future__ import annotations

import pytest

from tests.servers import PostgresServer, S3Server, postgres_missing, start_postgres, start_s3


@pytest.fixture(scope="module")
def harness():
    """Prefect's test harness (its own temporary API and database), one per test module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """moto's S3 server with bucket ``mmpipe``: ``.endpoint``, ``.bucket``, ``.env`` (AWS_*)."""
    with start_s3(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3Server:
    """The session's S3 server, with its AWS_* variables in this test's environment."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """A PostgreSQL 15 cluster (trust auth, 127.0.0.1 only); ``.create_database()`` → URI."""
    missing = postgres_missing()
    if missing:
        pytest.skip(missing)
    with start_postgres() as server:
        yield server


@pytest.fixture
def postgres(postgres_server) -> str:
    """The URI of a fresh, empty database on the session's PostgreSQL."""
    return postgres_server.create_database()
