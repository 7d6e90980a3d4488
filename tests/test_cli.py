"""The ``dicomshare`` command line, run as a real subprocess on real data directories."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import zipfile
from pathlib import Path

import psycopg
import pydicom
import pytest
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import (
    POSTGRES_URL,
    Server,
    cli,
    drop_postgres_schema,
    make_file,
    parseable_files,
    postgres_schema_url,
)
from dicomshare.dicom.header import read_header
from dicomshare.errors import DicomshareError

SUMMARY = re.compile(r"^stored: (\d+)  already present: (\d+)  rejected: (\d+)$", re.M)
PASSWORD = "correct horse battery"

def summary(result: subprocess.CompletedProcess[str]) -> tuple[int, int, int]:
    match = SUMMARY.search(result.stdout)
    assert match, result.stdout
    stored, present, rejected = (int(g) for g in match.groups())
    return stored, present, rejected


def rejections(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return dict(re.findall(r"^  rejected (.+?): (.+)$", result.stdout, re.M))


def checked(result: subprocess.CompletedProcess[str]) -> int:
    match = re.search(r"^checked (\d+) instances$", result.stdout, re.M)
    assert match, result.stdout
    return int(match.group(1))


def blob_path(data_dir: Path, content: bytes) -> Path:
    key = hashlib.sha256(content).hexdigest()
    return data_dir / "blobs" / key[:2] / key


# -- initialisation and where the data lives -----------------------------------------------
@pytest.mark.parametrize("command", [["check"], ["tokens", "list"]])
def test_any_command_initialises_a_fresh_data_dir(tmp_path: Path, command: list[str]) -> None:
    data_dir = tmp_path / "new" / "data"
    result = cli(data_dir, *command)
    assert (data_dir / "index.db").is_file() and (data_dir / "blobs").is_dir()
    with sqlite3.connect(data_dir / "index.db") as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"study", "series", "instance", "user_account", "api_token",
            "alembic_version"} <= tables
    if command == ["check"]:
        assert "ok: index and blobs agree" in result.stdout and checked(result) == 0


def test_data_dir_from_environment_and_flag(tmp_path: Path) -> None:
    from_env, from_flag = tmp_path / "env", tmp_path / "flag"
    one = make_file(tmp_path / "in")
    assert summary(cli(from_env, "import", "--quiet", str(one))) == (1, 0, 0)
    # The flag wins over DICOMSHARE_DATA_DIR (which cli() sets to from_env).
    two, three = make_file(tmp_path / "in2"), make_file(tmp_path / "in2")
    result = cli(from_env, "--data-dir", str(from_flag), "import", "--quiet", str(two),
                 str(three))
    assert summary(result) == (2, 0, 0)
    assert checked(cli(from_env, "check")) == 1
    assert checked(cli(tmp_path / "unused", "--data-dir", str(from_flag), "check")) == 2
    assert not (tmp_path / "unused").exists()
    assert blob_path(from_flag, two.read_bytes()).is_file()
    assert not blob_path(from_env, two.read_bytes()).exists()


# -- import --------------------------------------------------------------------------------
def test_import_file_folder_and_zip(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    single = make_file(tmp_path / "single")
    assert summary(cli(data_dir, "import", str(single))) == (1, 0, 0)

    folder = tmp_path / "folder"
    nested = [make_file(folder / "a"), make_file(folder / "a" / "b" / "c"),
              make_file(folder, "MR_small.dcm")]
    result = cli(data_dir, "import", "--quiet", str(folder))
    assert summary(result) == (3, 0, 0) and result.returncode == 0

    zipped = [make_file(tmp_path / "forzip") for _ in range(3)]
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, path in enumerate(zipped):
            zf.write(path, f"dir{i}/sub/{path.name}")
        zf.writestr("dir0/", "")
    result = cli(data_dir, "import", "--quiet", str(archive))
    assert summary(result) == (3, 0, 0)
    assert checked(cli(data_dir, "check")) == 7
    for path in [single, *nested, *zipped]:
        assert blob_path(data_dir, path.read_bytes()).read_bytes() == path.read_bytes()

    again = cli(data_dir, "import", "--quiet", str(single), str(folder), str(archive))
    assert summary(again) == (0, 7, 0) and again.returncode == 0


def test_import_reports_each_rejection_and_exits_1(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    folder = tmp_path / "mixed"
    good = make_file(folder)
    (folder / "notes.txt").write_text("not an image")
    broken = folder / "truncated.dcm"
    broken.write_bytes(make_file(tmp_path / "x").read_bytes()[:-1000])  # inside PixelData
    no_uid = dcmread(get_testdata_file("CT_small.dcm"))
    del no_uid.StudyInstanceUID
    no_uid.SOPInstanceUID = no_uid.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_uid.save_as(folder / "no_study.dcm", enforce_file_format=True)
    # Same SOP Instance UID as `good`, different content.
    twin = dcmread(good)
    twin.StudyDescription = "A DIFFERENT OBJECT"
    twin.save_as(folder / "zz_conflict.dcm", enforce_file_format=True)
    bad_zip = tmp_path / "bundle.zip"
    with zipfile.ZipFile(bad_zip, "w") as zf:
        zf.writestr("readme.txt", "hello")
        zf.write(make_file(tmp_path / "z"), "ok.dcm")
    missing = tmp_path / "does-not-exist"

    result = cli(data_dir, "import", "--quiet", str(folder), str(bad_zip), str(missing),
                 check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert summary(result) == (2, 0, 6)
    reasons = rejections(result)
    assert set(reasons) == {str(folder / "notes.txt"), str(broken), str(folder / "no_study.dcm"),
                            str(folder / "zz_conflict.dcm"), f"{bad_zip}:readme.txt",
                            str(missing)}
    assert "not a DICOM" in reasons[str(folder / "notes.txt")]
    assert "truncated" in reasons[str(broken)]
    assert "StudyInstanceUID" in reasons[str(folder / "no_study.dcm")]
    assert "different content" in reasons[str(folder / "zz_conflict.dcm")]
    assert "no such file" in reasons[str(missing)]
    # The first object was kept, nothing else stored or left behind.
    assert blob_path(data_dir, good.read_bytes()).is_file()
    assert not blob_path(data_dir, (folder / "zz_conflict.dcm").read_bytes()).exists()
    assert "ok: index and blobs agree" in cli(data_dir, "check").stdout
    assert not list((data_dir / "blobs" / "tmp").iterdir())


def test_import_rejects_a_file_cut_inside_its_header(tmp_path: Path) -> None:
    path = make_file(tmp_path / "whole")
    whole = path.read_bytes()
    ds = dcmread(path)
    raw = [ds.get_item(tag, keep_deferred=True) for tag in ds.keys() if tag < 0x7FE00010]
    last = max((e for e in raw if hasattr(e, "value_tell")), key=lambda e: e.value_tell)
    cuts = tmp_path / "cuts"
    cuts.mkdir()
    # Inside the value of the last element before Pixel Data, and inside its tag header.
    for cut in (last.value_tell + last.length - 1, last.value_tell - 4):
        (cuts / f"cut{cut}.dcm").write_bytes(whole[:cut])
    result = cli(tmp_path / "data", "import", "--quiet", str(cuts), check=False)
    assert summary(result) == (0, 0, 2), result.stdout
    assert all("truncated" in reason for reason in rejections(result).values()), result.stdout


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_import_of_pydicom_test_files(tmp_path: Path) -> None:
    """Every file pydicom ships: each either stored or rejected with a reason."""
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    files = [p for p in folder.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR"]
    result = cli(tmp_path / "data", "import", "--quiet", str(folder), check=False)
    stored, present, rejected = summary(result)
    assert stored + present + rejected == len(files)
    reasons = rejections(result)
    assert len(reasons) == rejected and all(r.strip() for r in reasons.values())
    # Files a conforming archive must accept (conftest's definition, applied recursively)
    # are stored, unless another file with the same SOP Instance UID came first.
    acceptable = {}
    for path in files:
        try:
            acceptable[str(path)] = read_header(path).sop_uid
        except DicomshareError:
            pass
    assert {str(p) for p in parseable_files() if p.parent == folder} <= set(acceptable)
    for name, reason in reasons.items():
        assert name not in acceptable or "already stored with different content" in reason, name
    assert stored == len(set(acceptable.values()))
    assert len(acceptable) - stored - present == sum(
        "different content" in r for r in reasons.values())
    assert result.returncode == 1
    assert checked(cli(tmp_path / "data", "check", "--quick")) == stored


@pytest.mark.postgres
def test_import_into_postgresql(tmp_path: Path) -> None:
    if not POSTGRES_URL:  # as conftest's database_url: never skipped in CI
        if os.environ.get("CI"):
            pytest.fail("DICOMSHARE_TEST_POSTGRES_URL is not set in CI")
        pytest.skip("DICOMSHARE_TEST_POSTGRES_URL is not set")
    url, schema = postgres_schema_url(POSTGRES_URL)
    try:
        files = [make_file(tmp_path / "in") for _ in range(3)]
        result = cli(tmp_path / "data", "--database-url", url, "import", "--quiet",
                     str(tmp_path / "in"))
        assert summary(result) == (3, 0, 0)
        assert not (tmp_path / "data" / "index.db").exists()
        plain = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain) as conn:
            uids = {r[0] for r in conn.execute(f"SELECT sop_instance_uid FROM {schema}.instance")}
        assert uids == {dcmread(p).SOPInstanceUID for p in files}
        env = {"DICOMSHARE_DATABASE_URL": url}
        assert summary(cli(tmp_path / "data", "import", "--quiet", str(files[0]), env=env)
                       ) == (0, 1, 0)
        assert checked(cli(tmp_path / "data", "check", env=env)) == 3
    finally:
        drop_postgres_schema(POSTGRES_URL, schema)


# -- users and tokens ----------------------------------------------------------------------
def test_users_create_stores_an_argon2_hash(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    cli(data_dir, "users", "create", "alice", "--org", "clinic", "--role", "clinician",
        "--password-stdin", stdin=PASSWORD + "\n")
    with sqlite3.connect(data_dir / "index.db") as db:
        [(hashed, role)] = db.execute(
            "SELECT password_hash, role FROM user_account WHERE name = 'alice'").fetchall()
    assert hashed.startswith("$argon2") and role == "clinician"
    assert PASSWORD.encode() not in (data_dir / "index.db").read_bytes()
    from argon2 import PasswordHasher

    assert PasswordHasher().verify(hashed, PASSWORD)

    dup = cli(data_dir, "users", "create", "alice", "--org", "clinic", "--role", "admin",
              "--password-stdin", stdin="another password\n", check=False)
    assert dup.returncode != 0 and "already exists" in dup.stderr
    short = cli(data_dir, "users", "create", "bob", "--org", "clinic", "--role", "clinician",
                "--password-stdin", stdin="short\n", check=False)
    assert short.returncode != 0 and "8 characters" in short.stderr
    bad_role = cli(data_dir, "users", "create", "carol", "--org", "clinic", "--role", "root",
                   "--password-stdin", stdin=PASSWORD + "\n", check=False)
    assert bad_role.returncode == 2
    with sqlite3.connect(data_dir / "index.db") as db:
        assert [r[0] for r in db.execute("SELECT name FROM user_account")] == ["alice"]


def test_users_set_password_lets_a_token_only_user_log_in(fresh_server: Server) -> None:
    """The first-start admin has only a token; `users set-password` opens browser login."""
    srv = fresh_server
    srv.cli("users", "create", "erin", "--org", "test", "--role", "admin", "--no-password")
    login = f"{srv.url}/api/login"
    assert requests.post(login, json={"username": "erin", "password": PASSWORD},
                         timeout=30).status_code == 401
    short = srv.cli("users", "set-password", "erin", "--password-stdin", stdin="short\n",
                    check=False)
    assert short.returncode != 0 and "8 to 1000 characters" in short.stderr
    nobody = srv.cli("users", "set-password", "nobody", "--password-stdin",
                     stdin=PASSWORD + "\n", check=False)
    assert nobody.returncode != 0
    srv.cli("users", "set-password", "erin", "--password-stdin", stdin=PASSWORD + "\n")
    assert requests.post(login, json={"username": "erin", "password": PASSWORD},
                         timeout=30).status_code == 200
    assert "user.set-password" in srv.cli("audit", "list").stdout


def test_tokens_create_list_revoke(fresh_server: Server) -> None:
    srv = fresh_server
    srv.cli("users", "create", "dora", "--org", "test", "--role", "clinician",
            "--password-stdin", stdin=PASSWORD + "\n")
    created = srv.cli("tokens", "create", "dora", "--name", "laptop")
    lines = created.stdout.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"dsh_[A-Za-z0-9_-]{20,}", lines[0])
    token = lines[0]
    token_id = int(re.search(r"token id (\d+)", created.stderr).group(1))  # type: ignore[union-attr]
    studies = f"{srv.dicomweb}/studies"
    assert srv.session(token).get(studies, timeout=10).status_code == 200

    listing = srv.cli("tokens", "list")
    assert token not in listing.stdout + listing.stderr
    assert srv.token not in listing.stdout + listing.stderr
    rows = [line.split("\t") for line in listing.stdout.splitlines()]
    mine = next(r for r in rows if r[0] == str(token_id))
    assert mine[1:3] == ["dora", "laptop"] and mine[4] == "active"
    assert token.startswith(mine[3].rstrip(".")) and len(mine[3].rstrip(".")) < len(token) // 2
    with sqlite3.connect(srv.data_dir / "index.db") as db:
        stored = [r[0] for r in db.execute("SELECT secret_hash FROM api_token")]
    assert token not in stored and hashlib.sha256(token.encode()).hexdigest() in stored

    srv.cli("tokens", "revoke", str(token_id))
    denied = srv.session(token).get(studies, timeout=10)
    assert denied.status_code == 401 and "WWW-Authenticate" in denied.headers
    assert srv.session().get(studies, timeout=10).status_code == 200  # others unaffected
    revoked = [r for r in (line.split("\t") for line in srv.cli("tokens", "list").stdout
                           .splitlines()) if r[0] == str(token_id)]
    assert revoked[0][4] == "revoked"
    assert srv.cli("tokens", "revoke", "99999", check=False).returncode == 1
    assert srv.cli("tokens", "create", "nobody", check=False).returncode == 1


# -- check ---------------------------------------------------------------------------------
@pytest.fixture
def archive_dir(tmp_path: Path) -> tuple[Path, list[Path]]:
    data_dir = tmp_path / "data"
    files = [make_file(tmp_path / "in") for _ in range(4)]
    assert summary(cli(data_dir, "import", "--quiet", str(tmp_path / "in"))) == (4, 0, 0)
    return data_dir, files


def test_check_clean_archive(archive_dir: tuple[Path, list[Path]]) -> None:
    data_dir, _ = archive_dir
    for flags in ([], ["--quick"]):
        result = cli(data_dir, "check", *flags)
        assert checked(result) == 4 and "ok: index and blobs agree" in result.stdout


def test_check_finds_missing_corrupt_and_orphan_blobs(archive_dir: tuple[Path, list[Path]],
                                                      tmp_path: Path) -> None:
    data_dir, files = archive_dir
    lost, damaged = files[0], files[1]
    blob_path(data_dir, lost.read_bytes()).unlink()
    corrupt = blob_path(data_dir, damaged.read_bytes())
    content = bytearray(corrupt.read_bytes())
    content[-1] ^= 0xFF
    corrupt.write_bytes(bytes(content))
    orphan = make_file(tmp_path / "orphan")
    target = blob_path(data_dir, orphan.read_bytes())
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(orphan, target)

    result = cli(data_dir, "check", check=False)
    assert result.returncode == 1 and "ok:" not in result.stdout
    assert f"missing blob: instance {dcmread(lost).SOPInstanceUID}" in result.stdout
    assert f"hash mismatch: instance {dcmread(damaged).SOPInstanceUID}" in result.stdout
    assert f"blob not in the index: {target.name}" in result.stdout
    # --quick checks presence only: the corrupt blob goes unnoticed, the rest does not.
    quick = cli(data_dir, "check", "--quick", check=False).stdout
    assert "missing blob" in quick and "hash mismatch" not in quick


def test_check_repair(archive_dir: tuple[Path, list[Path]], tmp_path: Path) -> None:
    data_dir, files = archive_dir
    blob_path(data_dir, files[0].read_bytes()).unlink()
    orphan = make_file(tmp_path / "orphan")
    target = blob_path(data_dir, orphan.read_bytes())
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(orphan, target)
    junk = blob_path(data_dir, b"junk")
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"junk")

    repaired = cli(data_dir, "check", "--repair")
    # Whoever uploaded it is unknown: it goes to the archive's only organisation.
    assert (f"re-indexed orphan blob {target.name} ({dcmread(orphan).SOPInstanceUID}) "
            "for organisation local") in repaired.stdout
    assert f"removed index entry of lost instance {dcmread(files[0]).SOPInstanceUID}" \
        in repaired.stdout
    assert "removed unreadable orphan blob" in repaired.stdout
    after = cli(data_dir, "check")
    assert "ok: index and blobs agree" in after.stdout and checked(after) == 4
    assert not junk.exists() and target.read_bytes() == orphan.read_bytes()
    # The re-indexed instance is a normal stored instance again.
    assert summary(cli(data_dir, "import", "--quiet", str(orphan))) == (0, 1, 0)
    assert summary(cli(data_dir, "import", "--quiet", str(files[0]))) == (1, 0, 0)


def test_check_repair_of_a_misnamed_orphan(archive_dir: tuple[Path, list[Path]],
                                           tmp_path: Path) -> None:
    """A DICOM file dropped into blobs/ under a name that is not its hash."""
    data_dir, _ = archive_dir
    orphan = make_file(tmp_path / "orphan")
    wrong = data_dir / "blobs" / "ab" / ("abcd" + "0" * 60)
    wrong.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(orphan, wrong)
    assert f"blob not in the index: {wrong.name}" in cli(data_dir, "check", check=False).stdout
    cli(data_dir, "check", "--repair")
    after = cli(data_dir, "check", check=False)
    assert after.returncode == 0 and checked(after) == 5, after.stdout
    assert blob_path(data_dir, orphan.read_bytes()).read_bytes() == orphan.read_bytes()


def test_check_repair_does_not_hide_corruption(archive_dir: tuple[Path, list[Path]]) -> None:
    data_dir, files = archive_dir
    corrupt = blob_path(data_dir, files[2].read_bytes())
    corrupt.write_bytes(corrupt.read_bytes()[:-10] + b"0123456789")
    result = cli(data_dir, "check", "--repair", check=False)
    assert result.returncode == 1 and "hash mismatch" in result.stdout
    assert corrupt.exists()  # evidence is kept for a human to decide
    assert cli(data_dir, "check", check=False).returncode == 1
