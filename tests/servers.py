"""Real servers for the scale-out tests: an S3 endpoint (moto) and PostgreSQL, on 127.0.0.1 only.

    with start_s3() as s3: ...        # s3.endpoint, s3.bucket, s3.env (AWS_* for subprocesses)
    with start_postgres() as pg: ...  # pg.uri: postgresql://mmpipe@127.0.0.1:PORT/<db>

Each is started once per test session by the fixtures in ``tests/integration/conftest.py`` and
stopped (its process group, its data directory) when the session ends. Nothing here is a fake of
mmpipe's own code: moto speaks the S3 REST API that s3fs, boto3 (MLflow) and dvc-s3 use, and
PostgreSQL is Debian's server itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
# moto accepts any key/secret; fixed values keep the env reproducible (never real credentials)
_S3_KEY, _S3_SECRET, _REGION = "mmpipe-test", "mmpipe-test-secret", "us-east-1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint and one empty bucket on it."""

    endpoint: str
    bucket: str
    env: dict[str, str] = field(repr=False)  # AWS_* (+ MLflow's endpoint) to give a subprocess

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL cluster (trust auth, 127.0.0.1 only) and how to reach it."""

    port: int
    user: str
    host = "127.0.0.1"  # never another interface

    def uri(self, database: str) -> str:
        """A SQLAlchemy URI of ``database`` (created by ``create_database``)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URI."""
        name = name or f"mlflow_{uuid.uuid4().hex[:10]}"
        _run(
            [str(PG_BIN / "createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, name]
        )
        return self.uri(name)


def _boto_kwargs() -> dict[str, str]:
    return {
        "aws_access_key_id": _S3_KEY,
        "aws_secret_access_key": _S3_SECRET,
        "region_name": _REGION,
    }


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard variables every S3 client here reads (s3fs, boto3, dvc-s3, MLflow)."""
    return {
        "AWS_ACCESS_KEY_ID": _S3_KEY,
        "AWS_SECRET_ACCESS_KEY": _S3_SECRET,
        "AWS_DEFAULT_REGION": _REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }


def _wait(ready, what: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout} s")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def start_s3(log_dir: Path | None = None) -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1:<free port> with one bucket; stopped on exit."""
    import boto3

    moto = Path(sys.executable).with_name("moto_server")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open((log_dir or Path(tempfile.gettempdir())) / f"moto-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        _wait(lambda: _http_ok(f"{endpoint}/moto-api/"), "moto_server", proc)
        bucket = "mmpipe"
        boto3.client("s3", endpoint_url=endpoint, **_boto_kwargs()).create_bucket(Bucket=bucket)
        yield S3Server(endpoint, bucket, s3_env(endpoint))
    finally:
        _stop(proc)
        log.close()


def _as_postgres(argv: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root: drop to the `postgres` user Debian creates
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr[-2000:]}")


def postgres_missing() -> str | None:
    """Why PostgreSQL cannot start here, or None (`.ci/run` installs Debian's package)."""
    if not (PG_BIN / "initdb").is_file():
        return f"PostgreSQL 15 not installed ({PG_BIN}/initdb missing: apt-get install postgresql)"
    return None


@contextlib.contextmanager
def start_postgres() -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL cluster in a temp dir on 127.0.0.1:<free port>; removed on exit."""
    root = Path(tempfile.mkdtemp(prefix="mmpipe-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    user, port = "mmpipe", free_port()
    _run(
        _as_postgres(
            [str(PG_BIN / "initdb"), "-D", str(data), "-U", user, "-A", "trust", "-E", "UTF8"]
        )
    )
    proc = subprocess.Popen(
        _as_postgres([
            str(PG_BIN / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
            "-k", str(sock), "-c", "fsync=off", "-c", "max_connections=200",
        ]),
        stdout=subprocess.DEVNULL, stderr=(root / "postgres.log").open("w"), start_new_session=True,
    )  # fmt: skip
    try:
        _wait(lambda: _pg_ready(port), "postgres", proc)
        yield PostgresServer(port, user)
    finally:
        _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _pg_ready(port: int) -> bool:
    argv = [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"]
    return subprocess.run(argv, check=False).returncode == 0
