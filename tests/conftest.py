"""Real servers on free ports, real databases, real DICOM files.

``server`` is one dicomshare process (SQLite) shared by a test module; ``fresh_server``
gives a test its own. ``database_url`` runs a test against SQLite and against the real
PostgreSQL (``DICOMSHARE_TEST_POSTGRES_URL``), each in a schema of its own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
DICOMSHARE = [sys.executable, "-m", "dicomshare.cli"]
POSTGRES_URL = os.environ.get("DICOMSHARE_TEST_POSTGRES_URL", "")


@pytest.fixture(autouse=True)
def lenient_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin pydicom's default WARN validation for every test. Archives serve what they
    stored, and some sample files carry invalid values; dicomweb-client leaves pydicom in
    RAISE mode when a call it wraps fails, which would otherwise leak between tests."""
    from pydicom import config

    monkeypatch.setattr(config.settings, "reading_validation_mode", config.WARN)
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.WARN)


def split_multipart(response: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """(part headers with lower-cased names, body) of each part of a multipart response."""
    from email.message import Message

    msg = Message()
    msg["content-type"] = response.headers["content-type"]
    assert msg.get_content_type() == "multipart/related", response.headers["content-type"]
    boundary = msg.get_param("boundary")
    assert isinstance(boundary, str)
    chunks = (b"\r\n" + response.content).split(b"\r\n--" + boundary.encode())
    assert chunks[0] == b"", "unexpected preamble"
    assert chunks[-1].startswith(b"--"), "no closing delimiter"
    parts = []
    for chunk in chunks[1:-1]:
        head, sep, body = chunk.partition(b"\r\n\r\n")
        assert sep, "part without a header/body separator"
        lines = head.decode().split("\r\n")[1:]
        parts.append(({k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines)}, body))
    return parts


def make_file(folder: Path, base: str = "CT_small.dcm", study: str | None = None,
              series: str | None = None, sop: str | None = None, **attrs: object) -> Path:
    """A copy of a pydicom test file with new (or given) UIDs and some attributes set:
    a new instance, as a Part 10 file in ``folder``."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file(base))
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for name, value in attrs.items():
        setattr(ds, name, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def testdata(name: str) -> str:
    """Path of a pydicom or pydicom-data sample file; skips when it is not installed."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return str(path)


def read_full(path: str) -> pydicom.Dataset:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_files() -> list[Path]:
    """Every DICOM file pydicom and pydicom-data ship (some of them deliberately broken)."""
    base = Path(pydicom.__file__).parent / "data" / "test_files"
    files = sorted(base.glob("*.dcm"))
    try:
        import data_store  # pydicom-data

        files += sorted((Path(data_store.__file__).parent / "data").glob("*.dcm"))
    except ImportError:
        pass
    return files


def parseable_files() -> list[Path]:
    """Files a conforming archive must accept: Part 10, identifying UIDs valid."""
    from dicomshare.dicom.header import read_header
    from dicomshare.errors import DicomshareError

    out = []
    for path in test_files():
        try:
            read_header(path)
        except DicomshareError:
            continue
        out.append(path)
    return out


def cli(data_dir: Path, *args: str, stdin: str | None = None,
        env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "DICOMSHARE_DATA_DIR": str(data_dir), **(env or {})}
    result = subprocess.run([*DICOMSHARE, *args], input=stdin, capture_output=True, text=True,
                            env=full_env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"dicomshare {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


@dataclass
class Server:
    """A running dicomshare process and how to talk to it."""

    data_dir: Path
    port: int
    token: str
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    dicom_port: int = field(default_factory=free_port)
    ae_title: str = "DICOMSHARE"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicomweb"

    def session(self, token: str | None = None) -> requests.Session:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {token or self.token}"
        return s

    def client(self, token: str | None = None):  # type: ignore[no-untyped-def]
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(self.dicomweb, session=self.session(token))

    def start(self) -> None:
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        env = {**os.environ, "DICOMSHARE_DATA_DIR": str(self.data_dir), **self.env}
        self.process = subprocess.Popen(
            [*DICOMSHARE, "serve", "--http-port", str(self.port), "--dicom-port",
             str(self.dicom_port), "--ae-title", self.ae_title], env=env, stdout=log,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):  # not up, or busy starting
                time.sleep(0.1)
        raise RuntimeError("server did not start in 60 s")

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def cli(self, *args: str, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli(self.data_dir, *args, stdin=stdin, env=self.env, check=check)

    def new_token(self, user: str, role: str = "clinician") -> str:
        self.cli("users", "create", user, "--org", "test", "--role", role,
                 "--password-stdin", stdin="correct horse battery\n")
        return self.cli("tokens", "create", user).stdout.strip()

    def make_root(self) -> str:
        """Create the site superuser ``root`` (organisation "site", no password) with the
        CLI, and return a new token of theirs."""
        self.cli("users", "create", "root", "--org", "site", "--role", "admin", "--superuser",
                 "--no-password")
        return self.cli("tokens", "create", "root").stdout.strip()

    def make_user(self, admin: requests.Session, name: str, org: str, role: str) -> str:
        """Create user ``name`` (``role`` in organisation ``org``, password "correct horse
        battery") through the API as ``admin``, and return a new token of theirs."""
        r = admin.post(f"{self.url}/api/users", json={
            "name": name, "organisation": org, "role": role,
            "password": "correct horse battery"})
        assert r.status_code == 201, r.text
        r = admin.post(f"{self.url}/api/tokens", json={"user": name})
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token


def make_server(tmp: Path, env: dict[str, str] | None = None,
                ae_title: str = "DICOMSHARE") -> Server:
    data_dir = tmp / "data"
    # The title goes in the environment too: `send` and `remote` run as separate commands
    # and must call peers with the server's own title.
    server = Server(data_dir, free_port(), "", env={"DICOMSHARE_AE_TITLE": ae_title,
                                                    **(env or {})}, ae_title=ae_title)
    server.cli("users", "create", "tester", "--org", "test", "--role", "admin",
               "--password-stdin", stdin="correct horse battery\n")
    server.token = server.cli("tokens", "create", "tester").stdout.strip()
    server.start()
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = make_server(tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[Server]:
    srv = make_server(tmp_path)
    yield srv
    srv.stop()


def postgres_schema_url(base: str) -> tuple[str, str]:
    """A new, empty schema in the test database, and a URL whose search_path uses it."""
    import psycopg

    schema = f"ds_{uuid.uuid4().hex[:12]}"
    plain = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}", schema


def drop_postgres_schema(base: str, schema: str) -> None:
    import psycopg

    plain = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each backend in turn. CI sets DICOMSHARE_TEST_POSTGRES_URL, so PostgreSQL never skips
    there; a developer machine without it skips with a reason."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.db'}"
        return
    if not POSTGRES_URL:
        if os.environ.get("CI"):
            pytest.fail("DICOMSHARE_TEST_POSTGRES_URL is not set in CI")
        pytest.skip("DICOMSHARE_TEST_POSTGRES_URL is not set")
    url, schema = postgres_schema_url(POSTGRES_URL)
    yield url
    drop_postgres_schema(POSTGRES_URL, schema)


def sign_in(page: Any, base_url: str, user: str, password: str, start: str = "/app/") -> None:
    """Open ``start`` in a browser page, be sent to the login page, log in and come back
    (a Playwright ``Page``; playwright is imported only by browser tests)."""
    import re

    from playwright.sync_api import expect

    page.goto(base_url + start)
    page.wait_for_url(re.compile(r"/app/login"))
    page.get_by_test_id("username").fill(user)
    page.get_by_test_id("password").fill(password)
    page.get_by_test_id("login-button").click()
    page.wait_for_url(re.compile(re.escape(start) + "$"))
    expect(page.get_by_test_id("who")).to_contain_text(user)
