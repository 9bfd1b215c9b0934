"""Real backing services for tests: a throwaway Postgres database and a moto S3 server on loopback.

Used by the test suite (and handy for local experiments); nothing here mocks a service. Each helper makes
uniquely named resources, so pytest-xdist workers and concurrent runs never share state.

- `PRUNERY_TEST_POSTGRES_URL`: an admin URL of the Postgres server whose databases the tests may create
  and drop (default `postgresql+psycopg://postgres@127.0.0.1:5432/postgres`).
- moto's standalone server (`moto[server]`, a dev dependency) is started as a subprocess on a free port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from .db import normalize_url

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


def postgres_admin_url() -> str:
    return normalize_url(os.environ.get("PRUNERY_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL))


@contextmanager
def temporary_postgres_database(admin_url: str | None = None, prefix: str = "prunery_test") -> Iterator[str]:
    """Create an empty database with a unique name, yield its URL, drop it afterwards (even if in use)."""
    admin = make_url(admin_url or postgres_admin_url())
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin.set(database=name).render_as_string(hide_password=False)
        finally:
            with engine.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server(timeout_s: float = 30.0) -> Iterator[str]:
    """Run moto's S3-compatible HTTP server on a free loopback port; yield its endpoint URL.

    The caller sets AWS credentials in its environment (any values; see MOTO_CREDENTIALS)."""
    for _attempt in range(3):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                    ready = True
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        if not ready:
            proc.kill()
            _, err = proc.communicate()
            last_error = err.decode(errors="replace")[-2000:]
            continue
        try:
            yield endpoint
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        return
    raise RuntimeError(f"moto server did not start: {last_error}")
