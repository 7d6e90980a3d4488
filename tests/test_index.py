"""The Index conformance suite: the same behaviour from SQLite and from PostgreSQL.

Everything goes through the library (``Archive`` over a real database and a real blob
folder) with real DICOM files derived from pydicom's CT_small.dcm and MR_small.dcm.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import config, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from conftest import make_file
from dicomshare.archive import Archive
from dicomshare.config import load_settings
from dicomshare.dicom.attributes import Level
from dicomshare.dicom.matching import parse_qido
from dicomshare.errors import DuplicateConflict, NotFound
from dicomshare.storage.base import Outcome

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
MR_CLASS = "1.2.840.10008.5.1.4.1.1.4"

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def archive(tmp_path: Path, database_url: str) -> Iterator[Archive]:
    arc = Archive.open(load_settings({"data_dir": tmp_path / "data",
                                      "database_url": database_url}))
    yield arc
    arc.close()


def search(archive: Archive, level: Level, study: str | None = None, series: str | None = None,
           **params: str) -> list[dict[str, Any]]:
    return archive.search(parse_qido(level, list(params.items())), study, series)


def value(ds: dict[str, Any], tag: str) -> Any:
    values = ds.get(tag, {}).get("Value", [])
    return values[0] if values else None


def values(ds: dict[str, Any], tag: str) -> list[Any]:
    return list(ds.get(tag, {}).get("Value", []))


def blob_files(archive: Archive) -> set[str]:
    return set(archive.blobs.keys())


# -- store outcomes ------------------------------------------------------------------------
def test_store_then_same_bytes_again_is_already_present(archive: Archive, tmp_path: Path) -> None:
    path = make_file(tmp_path / "in")
    first = archive.store_file(path)
    assert first.ok and first.outcome is Outcome.STORED
    ds = dcmread(path)
    assert (first.sop_uid, first.study_uid, first.series_uid) == (
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID)
    again = archive.store_file(path)
    assert again.ok and again.outcome is Outcome.ALREADY_PRESENT
    assert archive.index.counts() == {"studies": 1, "series": 1, "instances": 1}
    assert blob_files(archive) == {sha256(path.read_bytes())}


def test_conflict_keeps_the_first_object_and_drops_the_second_blob(archive: Archive,
                                                                    tmp_path: Path) -> None:
    sop, study, series = generate_uid(), generate_uid(), generate_uid()
    first = make_file(tmp_path / "a", study=study, series=series, sop=sop,
                      StudyDescription="FIRST")
    second = make_file(tmp_path / "b", study=study, series=series, sop=sop,
                       StudyDescription="SECOND")
    assert first.read_bytes() != second.read_bytes()
    assert archive.store_file(first).outcome is Outcome.STORED
    result = archive.store_file(second)
    assert result.outcome is Outcome.CONFLICT
    assert isinstance(result.error, DuplicateConflict) and not result.ok
    assert result.error.failure_reason == 0x0111
    [(inst, _)] = archive.locate(study)
    assert inst.sha256 == sha256(first.read_bytes())
    assert b"".join(archive.read_chunks(inst.blob_key)) == first.read_bytes()
    assert blob_files(archive) == {sha256(first.read_bytes())}
    [found] = search(archive, Level.STUDY, StudyInstanceUID=study)
    assert value(found, "00081030") == "FIRST"


def test_conflict_when_series_belongs_to_another_study(archive: Archive, tmp_path: Path) -> None:
    series = generate_uid()
    study_a, study_b = generate_uid(), generate_uid()
    assert archive.store_file(make_file(tmp_path, study=study_a, series=series)).ok
    other = make_file(tmp_path, study=study_b, series=series)
    result = archive.store_file(other)
    assert result.outcome is Outcome.CONFLICT and not result.ok
    assert sha256(other.read_bytes()) not in blob_files(archive)
    # The refused instance leaves no trace: no study B, nothing under it.
    assert [value(d, "0020000D") for d in search(archive, Level.STUDY)] == [study_a]
    assert archive.index.counts() == {"studies": 1, "series": 1, "instances": 1}


def test_store_received_batch_reports_each_object_in_order(archive: Archive,
                                                          tmp_path: Path) -> None:
    good = make_file(tmp_path)
    temps = []
    for data in (good.read_bytes(), b"not dicom at all" * 20, good.read_bytes()):
        temp = archive.new_temp()
        temp.write(data)
        temps.append(temp)
    results = archive.store_received(temps)
    assert [r.outcome for r in results] == [Outcome.STORED, None, Outcome.ALREADY_PRESENT]
    assert results[1].error is not None and "DICOM" in results[1].error.reason
    assert archive.index.counts()["instances"] == 1
    assert not list(archive.blobs.tmp.glob("*.part"))


def test_store_received_refuses_other_study(archive: Archive, tmp_path: Path) -> None:
    temp = archive.new_temp()
    temp.write(make_file(tmp_path).read_bytes())
    [result] = archive.store_received([temp], study_uid=generate_uid())
    assert not result.ok and result.error is not None and result.error.http_status == 409
    assert archive.index.counts()["instances"] == 0 and not blob_files(archive)


# -- search with computed attributes -------------------------------------------------------
@pytest.fixture
def two_studies(archive: Archive, tmp_path: Path) -> dict[str, Any]:
    """Study A: CT series (3 instances) + MR series (2); study B: one MR instance."""
    a, b = generate_uid(), generate_uid()
    ct, mr, mr_b = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for n in (3, 1, 2):
        paths.append(make_file(tmp_path, study=a, series=ct, InstanceNumber=n, SeriesNumber=2,
                               StudyDate="20200101", PatientID="PA"))
    for n in (2, 1):
        paths.append(make_file(tmp_path, "MR_small.dcm", study=a, series=mr, InstanceNumber=n,
                               SeriesNumber=1, StudyDate="20200101", PatientID="PA"))
    paths.append(make_file(tmp_path, "MR_small.dcm", study=b, series=mr_b,
                           StudyDate="20210101", PatientID="PB"))
    for path in paths:
        assert archive.store_file(path).outcome is Outcome.STORED
    return {"a": a, "b": b, "ct": ct, "mr": mr, "mr_b": mr_b, "paths": paths}


def test_study_search_computed_attributes(archive: Archive, two_studies: dict[str, Any]) -> None:
    found = {value(d, "0020000D"): d for d in search(archive, Level.STUDY)}
    assert set(found) == {two_studies["a"], two_studies["b"]}
    a, b = found[two_studies["a"]], found[two_studies["b"]]
    assert values(a, "00080061") == ["CT", "MR"]
    assert values(b, "00080061") == ["MR"]
    assert (value(a, "00201206"), value(a, "00201208")) == (2, 5)
    assert (value(b, "00201206"), value(b, "00201208")) == (1, 1)
    assert "00080062" not in a  # SOPClassesInStudy only on request
    [a] = search(archive, Level.STUDY, StudyInstanceUID=two_studies["a"],
                 includefield="SOPClassesInStudy")
    assert values(a, "00080062") == sorted([CT_CLASS, MR_CLASS])
    # Newest study first.
    assert [value(d, "0020000D") for d in search(archive, Level.STUDY)] == [
        two_studies["b"], two_studies["a"]]


def test_series_and_instance_search(archive: Archive, two_studies: dict[str, Any]) -> None:
    series = search(archive, Level.SERIES, two_studies["a"])
    # Ordered by SeriesNumber: MR (1) before CT (2).
    assert [value(d, "0020000E") for d in series] == [two_studies["mr"], two_studies["ct"]]
    assert [value(d, "00201209") for d in series] == [2, 3]
    assert [value(d, "00080060") for d in series] == ["MR", "CT"]
    ct_only = search(archive, Level.SERIES, Modality="CT")
    assert [value(d, "0020000D") for d in ct_only] == [two_studies["a"]]
    insts = search(archive, Level.IMAGE, two_studies["a"], two_studies["ct"])
    assert [value(d, "00200013") for d in insts] == [1, 2, 3]
    assert {value(d, "00080016") for d in insts} == {CT_CLASS}
    assert all(value(d, "0020000E") == two_studies["ct"] for d in insts)
    every = search(archive, Level.IMAGE)
    assert len(every) == 6
    assert all("BulkDataURI" not in str(d) for d in every)
    # Study-level keys filter lower levels too.
    assert len(search(archive, Level.IMAGE, PatientID="PB")) == 1
    assert len(search(archive, Level.SERIES, StudyDate="20200101")) == 2
    # A lower-level key filters higher levels: studies with at least one CT series.
    assert [value(d, "0020000D") for d in search(archive, Level.STUDY, ModalitiesInStudy="CT")
            ] == [two_studies["a"]]


def test_locate_orders_by_series_then_instance_number(archive: Archive,
                                                      two_studies: dict[str, Any]) -> None:
    located = archive.locate(two_studies["a"])
    order = [(inst.series_uid,
              dcmread(io.BytesIO(b"".join(archive.read_chunks(inst.blob_key)))).InstanceNumber)
             for inst, _ in located]
    mr, ct = two_studies["mr"], two_studies["ct"]
    assert order == [(mr, 1), (mr, 2), (ct, 1), (ct, 2), (ct, 3)]
    [(one, meta)] = archive.locate(two_studies["b"], two_studies["mr_b"], with_metadata=True)
    assert meta is not None and one.sop_uid in meta
    assert one.sop_class_uid == MR_CLASS and one.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    with pytest.raises(NotFound):
        archive.locate(generate_uid())
    with pytest.raises(NotFound):
        archive.locate(two_studies["a"], two_studies["mr_b"])


def test_all_instances_lists_every_stored_instance(archive: Archive,
                                                   two_studies: dict[str, Any]) -> None:
    listed = list(archive.index.all_instances())
    expected = {sha256(p.read_bytes()) for p in two_studies["paths"]}
    assert {i.sha256 for i in listed} == expected and len(listed) == 6
    assert {i.blob_key for i in listed} == blob_files(archive)
    assert all(i.size == len(b"".join(archive.read_chunks(i.blob_key))) for i in listed)


# -- remove --------------------------------------------------------------------------------
def test_remove_instance_series_study(archive: Archive, two_studies: dict[str, Any]) -> None:
    a, ct, mr = two_studies["a"], two_studies["ct"], two_studies["mr"]
    [(first_mr, _), (second_mr, _)] = archive.locate(a, mr)
    gone = archive.delete(a, mr, first_mr.sop_uid)
    assert [g.sop_uid for g in gone] == [first_mr.sop_uid]
    assert first_mr.blob_key not in blob_files(archive)
    [series_mr] = search(archive, Level.SERIES, a, SeriesInstanceUID=mr)
    assert value(series_mr, "00201209") == 1
    # Removing the last instance removes the emptied series, not the study.
    archive.delete(a, mr, second_mr.sop_uid)
    assert [value(d, "0020000E") for d in search(archive, Level.SERIES, a)] == [ct]
    [study_a] = search(archive, Level.STUDY, StudyInstanceUID=a)
    assert values(study_a, "00080061") == ["CT"] and value(study_a, "00201208") == 3
    # Removing a series that empties the study removes the study.
    ct_blobs = {i.blob_key for i, _ in archive.locate(a, ct)}
    assert len(archive.delete(a, ct)) == 3
    assert not ct_blobs & blob_files(archive)
    assert search(archive, Level.STUDY, StudyInstanceUID=a) == []
    with pytest.raises(NotFound):
        archive.delete(a)
    # Whole-study removal.
    assert len(archive.delete(two_studies["b"])) == 1
    assert archive.index.counts() == {"studies": 0, "series": 0, "instances": 0}
    assert blob_files(archive) == set()
    # And the same objects can be stored again afterwards.
    assert archive.store_file(two_studies["paths"][0]).outcome is Outcome.STORED


def test_remove_of_unknown_resource_is_not_found(archive: Archive,
                                                 two_studies: dict[str, Any]) -> None:
    with pytest.raises(NotFound):
        archive.delete(two_studies["a"], two_studies["ct"], generate_uid())
    with pytest.raises(NotFound):
        archive.delete(two_studies["b"], two_studies["ct"])  # series of another study
    assert archive.index.counts()["instances"] == 6


# -- concurrency ---------------------------------------------------------------------------
def test_concurrent_ingest_into_one_series(archive: Archive, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    per_thread = 6
    files = [[make_file(tmp_path / f"t{t}", study=study, series=series,
                        InstanceNumber=t * per_thread + i + 1) for i in range(per_thread)]
             for t in range(8)]
    errors: list[BaseException] = []
    outcomes: list[Outcome | None] = []
    barrier = threading.Barrier(8)

    def work(paths: list[Path]) -> None:
        try:
            barrier.wait()
            for path in paths:
                result = archive.store_file(path)
                if not result.ok:
                    raise AssertionError(result.error.reason if result.error else "failed")
                outcomes.append(result.outcome)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(paths,)) for paths in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert outcomes == [Outcome.STORED] * 48
    assert archive.index.counts() == {"studies": 1, "series": 1, "instances": 48}
    [found] = search(archive, Level.STUDY)
    assert (value(found, "00201206"), value(found, "00201208")) == (1, 48)
    [ser] = search(archive, Level.SERIES)
    assert value(ser, "00201209") == 48
    assert [value(d, "00200013") for d in search(archive, Level.IMAGE)] == list(range(1, 49))


def _race(archives: list[Archive], paths: list[Path]) -> list[Any]:
    """Store paths[i] through archives[i % n], all threads released at once."""
    results: list[Any] = [None] * len(paths)
    barrier = threading.Barrier(len(paths))

    def work(i: int) -> None:
        barrier.wait()
        results[i] = archives[i % len(archives)].store_file(paths[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.fixture
def workers(tmp_path: Path, database_url: str) -> Iterator[list[Archive]]:
    """Four archives on one data directory, as four server worker processes would be."""
    settings = load_settings({"data_dir": tmp_path / "data", "database_url": database_url})
    arcs = [Archive.open(settings) for _ in range(4)]
    yield arcs
    for arc in arcs:
        arc.close()


def test_concurrent_ingest_of_the_same_object(workers: list[Archive], tmp_path: Path) -> None:
    path = make_file(tmp_path)
    results = _race(workers, [path] * 8)
    assert all(r.ok for r in results)
    assert sorted(r.outcome for r in results) == sorted(
        [Outcome.STORED] + [Outcome.ALREADY_PRESENT] * 7)
    assert workers[0].index.counts()["instances"] == 1
    assert blob_files(workers[0]) == {sha256(path.read_bytes())}


def test_concurrent_conflicting_objects_acknowledge_only_the_stored_one(
        workers: list[Archive], tmp_path: Path) -> None:
    """Same SOP Instance UID, eight different contents at once: exactly one is stored, and
    exactly that one is acknowledged; the other blobs are not left behind."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    paths = [make_file(tmp_path, study=study, series=series, sop=sop, StudyDescription=f"V{i}")
             for i in range(8)]
    results = _race(workers, paths)
    stored = [p for p, r in zip(paths, results, strict=True) if r.outcome is Outcome.STORED]
    assert len(stored) == 1, [r.outcome for r in results]
    assert sum(isinstance(r.error, DuplicateConflict) for r in results) == 7
    [(inst, _)] = workers[0].locate(study)
    assert inst.sha256 == sha256(stored[0].read_bytes())
    assert blob_files(workers[0]) == {inst.blob_key}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_non_conformant_values_are_kept_in_metadata(archive: Archive, tmp_path: Path) -> None:
    """A value longer than its VR allows (LO > 64) is stored, indexed and returned alike."""
    long = "VERY LONG DESCRIPTION " * 4
    study = generate_uid()
    assert archive.store_file(make_file(tmp_path, study=study, StudyDescription=long)).ok
    [found] = search(archive, Level.STUDY, StudyDescription=long.strip())
    assert value(found, "0020000D") == study
    assert value(found, "00081030") == long.strip()
    [(_, meta)] = archive.locate(study, with_metadata=True)
    assert long.strip() in (meta or "")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_concurrent_ingest_leaves_pydicom_settings_alone(archive: Archive,
                                                         tmp_path: Path) -> None:
    """Header parsing in parallel threads must not switch the process into pydicom's strict
    mode (after which files with a non-conformant value fail with a raw ValueError)."""
    study = generate_uid()
    lenient = make_file(tmp_path / "lenient", study=study, StudyDescription="X" * 80)
    for round_ in range(12):
        paths = [make_file(tmp_path / f"r{round_}", study=study) for _ in range(16)]
        assert all(r.ok for r in _race([archive], paths))
        assert config.settings.reading_validation_mode == config.WARN, f"round {round_}"
    assert archive.store_file(lenient).ok


# -- migrations ----------------------------------------------------------------------------
def _heads() -> list[str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from dicomshare.storage import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return list(ScriptDirectory.from_config(cfg).get_heads())


def _version(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))]
    finally:
        engine.dispose()


def test_opening_twice_is_idempotent(tmp_path: Path, database_url: str) -> None:
    settings = load_settings({"data_dir": tmp_path / "data", "database_url": database_url})
    first = Archive.open(settings)
    path = make_file(tmp_path)
    assert first.store_file(path).outcome is Outcome.STORED
    first.close()
    second = Archive.open(settings)
    try:
        assert second.index.counts()["instances"] == 1
        assert second.store_file(path).outcome is Outcome.ALREADY_PRESENT
    finally:
        second.close()
    assert _version(database_url) == _heads()


def test_older_schema_is_upgraded(tmp_path: Path, database_url: str) -> None:
    """A database left at the oldest revision (with data in it) opens and reaches head."""
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from dicomshare.storage import MIGRATIONS, make_engine

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    oldest = [rev.revision for rev in ScriptDirectory.from_config(cfg).walk_revisions()][-1]
    engine = make_engine(database_url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, oldest)
        conn.execute(text("INSERT INTO organisation (name, created_at) "
                          "VALUES ('old-org', CURRENT_TIMESTAMP)"))
    engine.dispose()
    assert _version(database_url) == [oldest]

    settings = load_settings({"data_dir": tmp_path / "data", "database_url": database_url})
    for _ in range(2):  # open, close, re-open
        arc = Archive.open(settings)
        try:
            with arc.index.engine.connect() as conn:
                orgs = conn.execute(text("SELECT name FROM organisation")).scalars().all()
            assert orgs == ["old-org"]
            arc.store_file(make_file(tmp_path))
        finally:
            arc.close()
    assert _version(database_url) == _heads()
    arc = Archive.open(settings)
    try:
        assert arc.index.counts()["instances"] == 2
    finally:
        arc.close()


def test_upgrade_lowercases_existing_person_names(tmp_path: Path, database_url: str) -> None:
    """Migration 0002 fills the lower-cased name columns of studies stored before it."""
    from alembic import command
    from alembic.config import Config

    from dicomshare.storage import MIGRATIONS, make_engine

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = make_engine(database_url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text(
            "INSERT INTO study (study_instance_uid, patient_name, attributes, created_at, "
            "updated_at) VALUES ('1.2.3.4', 'MÜLLER^JÜRGEN', '{}', CURRENT_TIMESTAMP, "
            "CURRENT_TIMESTAMP)"))
    engine.dispose()
    arc = Archive.open(load_settings({"data_dir": tmp_path / "data",
                                      "database_url": database_url}))
    try:
        for value in ("müller*", "MÜLLER^JÜRGEN", "*jürgen"):
            found = arc.search(parse_qido(Level.STUDY, [("PatientName", value)]))
            assert [d["0020000D"]["Value"][0] for d in found] == ["1.2.3.4"], value
    finally:
        arc.close()
