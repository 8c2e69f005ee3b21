"""Real databases for store tests: a SQLite file, or a PostgreSQL database made for one test
and dropped after it.

PostgreSQL is the server at AGORA_TEST_POSTGRES_URL (default: 127.0.0.1:5432, trust auth). When
none answers there, a private server is started in a temporary directory with the machine's
`initdb`/`pg_ctl` (as the `postgres` user when the tests run as root): PostgreSQL tests never skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy
from sqlalchemy import make_url

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _answers(url: str) -> bool:
    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return True
    except sqlalchemy.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / name).exists():
            return str(base / name)
    raise RuntimeError(f"no PostgreSQL server answers and `{name}` is not installed")


@contextmanager
def _private_server() -> Iterator[str]:
    """initdb + pg_ctl start on a free loopback port; stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="agora-pg-"))
    data, port = root / "data", _free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_user, _pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
        check=True, capture_output=True,
    )  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}"
    subprocess.run(
        [*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-o", options, "-w", "-l",
         str(root / "server.log"), "start"],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
            check=False, capture_output=True,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """The admin URL of a PostgreSQL server that answers."""
    url = os.environ.get("AGORA_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)
    if _answers(url):
        yield url
        return
    with _private_server() as private:
        deadline = time.monotonic() + 30
        while not _answers(private):
            if time.monotonic() > deadline:
                raise RuntimeError("the private PostgreSQL server did not start")
            time.sleep(0.2)
        yield private


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh, empty database on the server; dropped (with its connections) afterwards."""
    name = f"agora_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
