"""The engine over many inputs, in this process or in a pool of processes (``--jobs``).

Inputs are :class:`Task` values (a file path, or a zip file and a member), which pickle in a
few bytes: each worker reads its own inputs, de-identifies them and writes the outputs, and
sends back only the small :class:`InstanceReport`. Work goes out in chunks through a
bounded window, so memory stays flat however many inputs there are. Workers start from a
fork server (spawn where there is none): nothing is inherited from the caller but what is
pickled, so it is safe with threads in the parent and on every platform.
"""

from __future__ import annotations

import multiprocessing
import re
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from pathlib import Path
from time import perf_counter

from pydicom.dataset import Dataset

from dicomshare.deid.engine import Deidentifier
from dicomshare.deid.pixels import PixelHook
from dicomshare.deid.profile import EDITION
from dicomshare.deid.report import InstanceReport, RunReport
from dicomshare.errors import InvalidDicom

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
Outcome = InstanceReport | tuple[str, str]  # a report, or (source, reason) when rejected


@dataclass(frozen=True)
class Task:
    """One input: ``path`` is a DICOM file, or a zip file holding ``member``."""

    name: str
    path: str
    member: str | None = None


@dataclass(frozen=True)
class Config:
    """What every worker needs to build the same de-identifier."""

    options: tuple[str, ...]
    key: bytes
    out_dir: str
    pixel_hook: PixelHook | None = None  # a module-level function when jobs > 1


def layout(out_dir: Path) -> Callable[[Dataset], Path]:
    """``OUT/<pseudonymous patient>/<study UID>/<series UID>/<SOP UID>.dcm``."""
    def place(ds: Dataset) -> Path:
        parts = [_safe(ds.get("PatientID"), "unknown-patient"),
                 _safe(ds.get("StudyInstanceUID"), "unknown-study"),
                 _safe(ds.get("SeriesInstanceUID"), "unknown-series")]
        return out_dir.joinpath(*parts, _safe(ds.get("SOPInstanceUID"), "unknown") + ".dcm")
    return place


def _safe(value: object, default: str) -> str:
    text = _UNSAFE.sub("_", str(value or "").strip()).strip("._")
    return text[:64] or default


class _Worker:
    """A de-identifier, its output layout and the zip files it has open."""

    def __init__(self, config: Config) -> None:
        self.deid = Deidentifier(config.options, config.key, config.pixel_hook)
        self.place = layout(Path(config.out_dir))
        self._zips: dict[str, zipfile.ZipFile] = {}

    def process(self, task: Task) -> Outcome:
        try:
            if task.member is None:
                return self.deid.deidentify_file(task.path, self.place, source=task.name)
            archive = self._zips.get(task.path)
            if archive is None:
                if len(self._zips) > 8:
                    for old in self._zips.values():
                        old.close()
                    self._zips.clear()
                archive = self._zips[task.path] = zipfile.ZipFile(task.path)
            data = archive.read(task.member)
            return self.deid.deidentify_file(data, self.place, source=task.name)
        except InvalidDicom as exc:
            return task.name, exc.reason
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            return task.name, f"cannot read or write: {exc}"
        except Exception as exc:  # one instance must not stop a run of thousands
            return task.name, f"cannot de-identify: {exc!r}"


_worker: _Worker | None = None


def _init(config: Config) -> None:
    global _worker
    _worker = _Worker(config)


def _run_chunk(tasks: list[Task]) -> list[Outcome]:
    assert _worker is not None, "worker not initialised"
    return [_worker.process(t) for t in tasks]


def _context() -> BaseContext:
    """forkserver where there is one (workers fork from a process that has imported the
    engine once), else spawn; either way nothing is inherited but what is pickled."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def run(tasks: Sequence[Task], config: Config, jobs: int = 1,
        progress: Callable[[int], object] | None = None) -> RunReport:
    """De-identify every task into ``config.out_dir``; the report lists them in input order.

    ``progress`` is called with the number of inputs just finished.
    """
    report = RunReport(options=tuple(config.options), edition=EDITION)
    outcomes: dict[str, Outcome] = {}
    started = perf_counter()

    def collect(results: list[Outcome]) -> None:
        for outcome in results:
            outcomes[outcome.source if isinstance(outcome, InstanceReport) else outcome[0]] = \
                outcome
        if progress is not None:
            progress(len(results))

    if jobs <= 1 or len(tasks) <= 1:
        worker = _Worker(config)
        for task in tasks:
            collect([worker.process(task)])
    else:
        chunk = max(1, min(16, len(tasks) // (jobs * 4)))
        context = _context()
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init,
                                 initargs=(config,)) as pool:
            pending: set[Future[list[Outcome]]] = set()
            for start in range(0, len(tasks), chunk):
                pending.add(pool.submit(_run_chunk, list(tasks[start:start + chunk])))
                if len(pending) >= jobs * 4:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        collect(future.result())
            for future in pending:
                collect(future.result())
    report.seconds = perf_counter() - started
    written: dict[str, str] = {}
    for task in tasks:
        outcome = outcomes.get(task.name)
        if outcome is None:
            report.reject(task.name, "not processed")
        elif isinstance(outcome, InstanceReport):
            if outcome.output_path in written:
                outcome.notes.append(f"same output as {written[outcome.output_path]}: "
                                     "the input repeats a SOP Instance UID")
            elif outcome.output_path:
                written[outcome.output_path] = task.name
            report.add(outcome)
        else:
            report.reject(*outcome)
    return report
