#!/usr/bin/env python3
"""Benchmark dicomshare against Orthanc over DIMSE (C-STORE in, C-MOVE out) with DCMTK tools.

Modalities and PACS talk DIMSE, not DICOMweb, so ingest and retrieve speed over
it is what sites notice.  Both servers run side by side and are measured
alternately with the same DCMTK clients; the markdown gives absolute figures
and dicomshare/Orthanc ratios.  Nothing is asserted.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import cast

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python bench/dimse.py`: import as the `bench` package
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(REPO_ROOT)
    else:
        sys.path.insert(0, str(REPO_ROOT))

from bench import datagen  # noqa: E402
from bench.procmem import RssSampler, tree  # noqa: E402
from bench.report import Report, median  # noqa: E402
from bench.run import _order, _orthanc_overrides, header, log  # noqa: E402
from bench.servers import (  # noqa: E402
    DICOMSHARE,
    ORTHANC,
    Server,
    free_port,
    resolve_dicomshare,
    start_dicomshare,
    start_orthanc,
)

PHASES = ("store", "move")
TOOLS = ("storescu", "movescu", "storescp", "echoscu")
BENCH_AET = "BENCH"
SCP_AET = "STORESCP"
LOCALHOST = "127.0.0.1"
# DCMTK >= 3.6.6 leaves Nagle on unless TCP_NODELAY=1 (dcmnet dul.cc/dulfsm.cc).  The clients,
# storescp and Orthanc (which links the same libdcmnet) all get it; dicomshare gets the same env.
DCMTK_ENV = {"TCP_NODELAY": "1"}
_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")
_FINAL_MOVE = re.compile(r"Received Final Move Response \(([^)]*)\)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--only", choices=[DICOMSHARE, ORTHANC], help="benchmark a single server")
    p.add_argument("--skip", default="", help="comma list of phases to skip: " + ",".join(PHASES))
    p.add_argument("--slices", type=int, default=2000, help="CT slices for C-STORE (512x512x16)")
    p.add_argument("--series-size", type=int, default=500, help="instances in the C-MOVE series")
    p.add_argument("--associations", default="1,4", help="comma list of parallel storescu runs")
    p.add_argument("--repeat", type=int, default=1, help="C-STORE repetitions (median reported)")
    p.add_argument("--move-repeat", type=int, default=3, help="C-MOVEs per server (median)")
    p.add_argument("--echo-timeout", type=float, default=30.0, help="seconds to wait for C-ECHO")
    p.add_argument("--dimse-timeout", type=int, default=120, help="storescu/movescu -td (s)")
    p.add_argument("--data", type=Path, default=Path("/tmp/dicomshare-bench-data"))
    p.add_argument("--tmp-dir", type=Path, default=None, help="parent of the work folders")
    p.add_argument("--keep-tmp", action="store_true", help="keep work folders and DCMTK logs")
    p.add_argument("--dicomshare-cmd", default=".venv/bin/dicomshare")
    p.add_argument("--orthanc-cmd", default="/usr/sbin/Orthanc")
    p.add_argument("--orthanc-set", action="append", default=[], metavar="KEY=JSON")
    p.add_argument("--json", type=Path, default=None, help="also write raw figures to this file")
    args = p.parse_args(argv)
    args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip_set - set(PHASES):
        p.error(f"unknown phase(s) in --skip: {', '.join(sorted(args.skip_set - set(PHASES)))}")
    args.assoc_list = [int(x) for x in args.associations.split(",") if x.strip()]
    return args


def dcmtk(cmd: list[str], log_path: Path, timeout: float | None = None) -> int:
    """Run one DCMTK tool with TCP_NODELAY=1, output to `log_path`; returns its exit status."""
    with log_path.open("ab") as out:
        try:
            return subprocess.run(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, **DCMTK_ENV),
                timeout=timeout,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:  # run() has killed it
            out.write(f"\nE: killed by the harness after {timeout}s\n".encode())
            return -9


def _first_error(text: str) -> str:
    return next((ln for ln in text.splitlines() if ln.startswith(("F:", "E:"))), "").strip()


def dcmtk_version() -> str:
    out = subprocess.run(["storescu", "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"v(\d+\.\d+\.\d+)", out.stdout)
    return m.group(1) if m else "?"


def wait_echo(srv: Server, timeout: float, log_path: Path) -> str | None:
    """None once the server answers C-ECHO, else why not (checked before any timing)."""
    deadline = time.monotonic() + timeout
    cmd = ["echoscu", "-to", "3", "-ta", "3", "-aet", BENCH_AET, "-aec", srv.ae_title]
    cmd += [LOCALHOST, str(srv.dicom_port)]
    while True:
        if srv.proc.poll() is not None:
            return f"server exited with {srv.proc.returncode}:\n{srv.log_tail(10)}"
        start = log_path.stat().st_size if log_path.exists() else 0
        if dcmtk(cmd, log_path, timeout=15) == 0:
            return None
        last = _first_error(log_path.read_text(errors="replace")[start:])
        if time.monotonic() > deadline:
            return (
                f"no C-ECHO answer from {srv.ae_title} on {LOCALHOST}:{srv.dicom_port} within "
                f"{timeout:.0f}s ({last or 'no error text'}); does this build have the DIMSE "
                "listener (`serve --dicom-port`)?"
            )
        time.sleep(0.5)


class StoreScp:
    """One DCMTK storescp, the C-MOVE destination; --ignore measures the sender, not our disk."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.port, self.log_path = port, workdir / "storescp.log"
        self._logf = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            ["storescp", "-v", "--ignore", "-aet", SCP_AET, str(port)],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, **DCMTK_ENV),
        )
        echo = ["echoscu", "-to", "3", "-aet", BENCH_AET, "-aec", SCP_AET, LOCALHOST, str(port)]
        deadline = time.monotonic() + 15
        while dcmtk(echo, workdir / "echo-storescp.log", timeout=15) != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"storescp on port {port} did not start: see {self.log_path}")
            time.sleep(0.2)

    def received(self) -> int:
        return self.log_path.read_text(errors="replace").count("Received Store Request")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()


@dataclass
class StoreResult:
    sent: int = 0
    ok: int = 0
    seconds: float = 0.0
    peak_rss_kib: int = 0
    errors: list[str] = field(default_factory=list)


def store(srv: Server, dirs: list[Path], logdir: Path, dimse_timeout: int) -> StoreResult:
    """One storescu per folder, all started together; each runs a single association."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    res = StoreResult(sent=sum(len(list(d.iterdir())) for d in dirs))
    env = dict(os.environ, **DCMTK_ENV)
    with RssSampler(srv.proc.pid, 0.05) as sampler:
        t0 = time.perf_counter()
        for i, folder in enumerate(dirs):
            log_path = logdir / f"storescu-{srv.name}-{folder.parent.name}-{i}.log"
            # -R: only the contexts the files need; -nh: keep going, failures are counted
            cmd = ["storescu", "-v", "-R", "-nh", "-to", "10", "-td", str(dimse_timeout)]
            cmd += ["-aet", BENCH_AET]
            cmd += ["-aec", srv.ae_title, "+sd", LOCALHOST, str(srv.dicom_port), str(folder)]
            with log_path.open("wb") as out:
                procs.append(
                    (subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env), log_path)
                )
        for proc, _ in procs:
            proc.wait()
        res.seconds = time.perf_counter() - t0
    res.peak_rss_kib = sampler.result().sampled_kib
    for proc, log_path in procs:
        text = log_path.read_text(errors="replace")
        statuses = _RESPONSE.findall(text)
        res.ok += sum(s.startswith(("Success", "Warning")) for s in statuses)
        bad = [s for s in statuses if not s.startswith(("Success", "Warning"))]
        if proc.returncode != 0 or bad:
            res.errors.append(
                f"storescu rc {proc.returncode}: {_first_error(text) or bad[:1]} ({log_path.name})"
            )
    return res


@dataclass
class MoveResult:
    received: int
    seconds: float
    status: str
    peak_rss_kib: int
    error: str = ""


def move(
    srv: Server, scp: StoreScp, study: str, series: str, logdir: Path, dimse_timeout: int
) -> MoveResult:
    """C-MOVE one series (study root) to storescp; counts what storescp actually received."""
    before = scp.received()
    log_path = logdir / f"movescu-{srv.name}-{time.monotonic_ns()}.log"
    cmd = ["movescu", "-v", "-S", "-to", "10", "-td", str(dimse_timeout)]
    cmd += ["-aet", BENCH_AET, "-aem", SCP_AET]
    cmd += ["-aec", srv.ae_title, LOCALHOST, str(srv.dicom_port), "-k", "QueryRetrieveLevel=SERIES"]
    cmd += ["-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={series}"]
    with RssSampler(srv.proc.pid, 0.05) as sampler:
        t0 = time.perf_counter()
        rc = dcmtk(cmd, log_path, timeout=3600)
        seconds = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    final = _FINAL_MOVE.findall(text)
    status = final[-1] if final else "no final response"
    received = scp.received() - before
    error = "" if rc == 0 and status == "Success" else f"movescu rc {rc}, {status}"
    if error and _first_error(text):
        error += f": {_first_error(text)}"
    return MoveResult(received, seconds, status, sampler.result().sampled_kib, error)


def ct_data(args: argparse.Namespace) -> datagen.CtData:
    """Reuse a cache with series at least as long as asked: regrouping would regenerate it."""
    size = args.series_size
    try:
        cached = int(json.loads((args.data / "ct" / "meta.json").read_text())["series_size"])
        size = max(size, cached)
    except (OSError, ValueError, KeyError):
        pass
    return datagen.ensure_ct(args.data, max(args.slices, args.series_size), size, log)


def write_copy(files: list[Path], slot: str, dest: Path, parts: int) -> list[Path]:
    """Fresh-UID copies of `files` in `parts` folders of contiguous slices (untimed)."""
    dirs = [dest / f"part{k}" for k in range(parts)]
    for d in dirs:
        d.mkdir(parents=True)
    for i, f in enumerate(files):
        (dirs[i * parts // len(files)] / f.name).write_bytes(datagen.reslot(f.read_bytes(), slot))
    return dirs


def start_server(name: str, args: argparse.Namespace, cmd: str, tmp: Path, scp_port: int) -> Server:
    port = free_port()
    if name == ORTHANC:
        overrides: dict[str, object] = {
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {SCP_AET: [SCP_AET, LOCALHOST, scp_port]},
            "UnknownSopClassAccepted": True,
        }
        overrides.update(_orthanc_overrides(args.orthanc_set))
        return start_orthanc(
            args.orthanc_cmd, "", overrides, tmp, args.keep_tmp, log, port, DCMTK_ENV
        )
    # The calling AE is registered (for the bench organisation, read and write): an unknown
    # caller let in by --dicom-accept-unknown may store but not retrieve.
    peers = [(SCP_AET, LOCALHOST, scp_port), (BENCH_AET, LOCALHOST, 104)]
    return start_dicomshare(cmd, None, tmp, args.keep_tmp, log, port, peers, DCMTK_ENV)


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process tree, from /proc/<pid>/stat."""
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def settle(servers: dict[str, Server], limit: float = 60.0) -> None:
    """Wait until no server is still busy with earlier work (deferred indexing, fsync, ...),
    so it does not steal CPU from the next timed run of the other server."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        before = {n: cpu_seconds(s.proc.pid) for n, s in servers.items()}
        time.sleep(0.5)
        busy = {n: cpu_seconds(s.proc.pid) - before[n] for n, s in servers.items()}
        if all(v < 0.05 for v in busy.values()):
            break
    waited = time.monotonic() - t0
    if waited > 1.5:
        log(f"waited {waited:.1f}s for the servers to go idle")


def _mib(kib: int) -> float:
    return kib / 1024.0


def _med(values: list[float]) -> float | None:
    return median(values) if values else None


def run_store(
    servers: dict[str, Server],
    files: list[Path],
    args: argparse.Namespace,
    slots: datagen.SlotAllocator,
    rep: Report,
    tmp: Path,
) -> None:
    size = sum(f.stat().st_size for f in files)
    section = (
        f"C-STORE ingest (DCMTK storescu): {len(files)} CT instances of 512 KiB "
        f"({size / datagen.MIB:.0f} MiB), fresh UIDs per run"
    )
    for ci, assoc in enumerate(args.assoc_list):
        runs: dict[str, list[StoreResult]] = {n: [] for n in servers}
        for r in range(args.repeat):
            slot = slots.take()
            dest = tmp / f"store-{slot}"
            log(f"writing {len(files)} fresh-UID copies (slot {slot}) in {assoc} folder(s)")
            dirs = write_copy(files, slot, dest, assoc)
            try:
                for name in _order(list(servers), ci + r):
                    settle(servers)
                    res = store(servers[name], dirs, tmp / "logs", args.dimse_timeout)
                    runs[name].append(res)
                    log(
                        f"C-STORE {name} associations={assoc}: {res.ok}/{res.sent} in "
                        f"{res.seconds:.2f}s = {res.ok / res.seconds:.1f} inst/s, "
                        f"{size / datagen.MIB / res.seconds:.1f} MiB/s, peak RSS "
                        f"{_mib(res.peak_rss_kib):.0f} MiB {res.errors[:1]}"
                    )
            finally:
                shutil.rmtree(dest, ignore_errors=True)
        label = f"{assoc} association{'s' if assoc > 1 else ''}"
        rep.notes.append(reference_receivers(files, slots, tmp, assoc, args.dimse_timeout, label))
        for name, results in runs.items():
            errors = [e for x in results for e in x.errors]
            failed = sum(x.sent - x.ok for x in results)
            note = f"{failed} failed" if failed else ""
            if errors:
                rep.error(section, name, f"{label}: {errors[0]}")
                note = (note + "; " if note else "") + "errors"
            ok = [x for x in results if x.ok == x.sent]
            ips = _med([x.ok / x.seconds for x in ok])
            mbs = _med([size / datagen.MIB / x.seconds for x in ok])
            rss = _mib(max(x.peak_rss_kib for x in results)) if results else None
            rep.add(section, f"{label}: instances/s", "", "higher", name, ips, note)
            rep.add(section, f"{label}: MiB/s", "", "higher", name, mbs, note)
            rep.add(section, f"{label}: server peak RSS", "MiB", "lower", name, rss)


def reference_receivers(files: list[Path], slots: datagen.SlotAllocator, tmp: Path,
                        assoc: int, dimse_timeout: int, label: str) -> str:
    """What the same storescu runs reach against DCMTK's own storescp: receiving only
    (`--ignore`: the client's and the network's share) and writing each file (no fsync,
    one process: a C++ receiver that keeps nothing durable; with several associations also
    `--fork`, a process per association). A note, not a row: it bounds what any archive
    can show in this harness on this machine."""
    figures = []
    modes = [("--ignore", ["--ignore"]), ("writing files", ["-od"])]
    if assoc > 1:
        modes.append(("writing files, a process per association", ["--fork", "-od"]))
    for what, extra in modes:
        slot = slots.take()
        dest = tmp / f"reference-{slot}"
        dirs = write_copy(files, slot, dest, assoc)
        out = tmp / f"reference-out-{slot}"
        out.mkdir()
        port = free_port()
        args = [*extra, str(out)] if "-od" in extra else extra
        with (tmp / f"reference-{slot}.log").open("wb") as logf:
            proc = subprocess.Popen(["storescp", *args, "-aet", "REFERENCE", str(port)],
                                    stdout=logf, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, **DCMTK_ENV))
        try:
            echo = ["echoscu", "-to", "3", "-aet", BENCH_AET, "-aec", "REFERENCE", LOCALHOST,
                    str(port)]
            deadline = time.monotonic() + 15
            while dcmtk(echo, tmp / "echo-reference.log", timeout=15) != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("storescp (reference) did not start")
                time.sleep(0.2)
            target = SimpleNamespace(proc=proc, ae_title="REFERENCE", dicom_port=port,
                                     name="reference")
            res = store(cast(Server, target), dirs, tmp / "logs", dimse_timeout)
            figures.append(f"{what} {res.ok / res.seconds:.0f} inst/s"
                           + (f" ({res.sent - res.ok} failed)" if res.ok != res.sent else ""))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    log(f"reference storescp, {label}: {', '.join(figures)}")
    return (f"Reference, {label}: the same storescu runs against DCMTK storescp: "
            f"{'; '.join(figures)}.")


def run_move(
    servers: dict[str, Server],
    ct: datagen.CtData,
    args: argparse.Namespace,
    slots: datagen.SlotAllocator,
    rep: Report,
    tmp: Path,
    scp: StoreScp,
) -> None:
    files = ct.series_files(0)[: args.series_size]
    size = sum(f.stat().st_size for f in files)
    section = (
        f"C-MOVE of one {len(files)}-instance series ({size / datagen.MIB:.0f} MiB) to DCMTK "
        f"storescp --ignore, median of {args.move_repeat}"
    )
    slot = slots.take()
    dest = tmp / f"move-{slot}"
    dirs = write_copy(files, slot, dest, 1)
    study, series = (datagen.reslot_uid(u, slot) for u in (ct.study_uid, ct.series_uids[0]))
    loaded: dict[str, Server] = {}
    try:
        for name, srv in servers.items():
            load = store(srv, dirs, tmp / "logs", args.dimse_timeout)
            log(f"loaded the C-MOVE series into {name}: {load.ok}/{load.sent} {load.errors[:1]}")
            if load.ok == load.sent:
                loaded[name] = srv
            else:
                rep.error(section, name, f"loading the series: {load.ok}/{load.sent} stored")
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    runs: dict[str, list[MoveResult]] = {n: [] for n in loaded}
    for r in range(args.move_repeat):
        for name in _order(list(loaded), r):
            settle(servers)
            res = move(loaded[name], scp, study, series, tmp / "logs", args.dimse_timeout)
            runs[name].append(res)
            log(
                f"C-MOVE {name}: {res.received}/{len(files)} received in {res.seconds:.2f}s = "
                f"{res.received / res.seconds:.1f} inst/s ({res.status}), peak RSS "
                f"{_mib(res.peak_rss_kib):.0f} MiB {res.error}"
            )
    for name, results in runs.items():
        bad = [x for x in results if x.error or x.received != len(files)]
        note = ""
        if bad:
            b = bad[0]
            rep.error(section, name, f"{b.received}/{len(files)} received; {b.error}")
            note = f"{len(bad)} incomplete"
        ok = [x for x in results if x not in bad]
        ips, mbs = _med([len(files) / x.seconds for x in ok]), _med([size / x.seconds for x in ok])
        rep.add(section, "instances/s", "", "higher", name, ips, note)
        rep.add(section, "MiB/s", "", "higher", name, None if mbs is None else mbs / datagen.MIB)
        rep.add(section, "time for the series", "s", "lower", name, _med([x.seconds for x in ok]))
        rss = _mib(max(x.peak_rss_kib for x in results)) if results else None
        rep.add(section, "server peak RSS", "MiB", "lower", name, rss)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [args.only] if args.only else [DICOMSHARE, ORTHANC]
    phases = [p for p in PHASES if p not in args.skip_set]
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        print(
            f"error: DCMTK tools not found: {', '.join(missing)} (apt-get install dcmtk)",
            file=sys.stderr,
        )
        return 2
    cmd = ""
    if DICOMSHARE in names:
        try:
            cmd = resolve_dicomshare(args.dicomshare_cmd, REPO_ROOT)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="dicomshare-dimse-", dir=args.tmp_dir))
    (tmp / "logs").mkdir()
    rep = Report(names)
    slots = datagen.SlotAllocator()
    args.data.mkdir(parents=True, exist_ok=True)
    ct = ct_data(args)
    log(f"warming page cache: {datagen.warm_page_cache(ct.files) / datagen.MIB:.0f} MiB")
    versions: dict[str, str] = {}
    servers: dict[str, Server] = {}
    scp = StoreScp(tmp, free_port())
    try:
        for name in names:
            try:
                srv = start_server(name, args, cmd, tmp, scp.port)
            except Exception as exc:  # report, carry on with the other server
                rep.error("startup", name, str(exc))
                log(f"{name} failed to start: {exc}")
                continue
            err = wait_echo(srv, args.echo_timeout, tmp / "logs" / f"echoscu-{name}.log")
            if err:
                rep.error("startup", name, err)
                log(f"{name}: {err}; {srv.stop()}")
                continue
            servers[name], versions[name] = srv, srv.version
        for phase in phases:
            if not servers:
                break
            log(f"--- phase {phase} ---")
            try:
                if phase == "store":
                    run_store(servers, ct.files[: args.slices], args, slots, rep, tmp)
                else:
                    run_move(servers, ct, args, slots, rep, tmp, scp)
            except Exception as exc:  # report and carry on with the next phase
                rep.error(phase, ",".join(servers), f"{type(exc).__name__}: {exc}")
                log(f"phase {phase} failed: {exc}")
            for name, srv in list(servers.items()):
                if srv.proc.poll() is not None:
                    rep.error(phase, name, f"server died:\n{srv.log_tail(10)}")
                    del servers[name]
    finally:
        for name, srv in servers.items():
            log(f"{name}: {srv.stop()}")
        scp.stop()
    rep.notes += [
        f"DCMTK {dcmtk_version()} clients on {LOCALHOST}, calling AE {BENCH_AET}, all with "
        "TCP_NODELAY=1 (DCMTK keeps Nagle on otherwise); Orthanc's DIMSE stack is the same "
        "libdcmnet and gets the same variable, dicomshare gets it in its environment too.",
        "storescu proposes only the contexts the files need (`-R`: CT Image Storage, Explicit "
        "VR Little Endian); it reads and re-encodes each file, and on a 2-core host its CPU use "
        "is part of the result for both servers alike.  MiB/s counts DICOM file bytes.",
        "C-MOVE: study root, SERIES level, one association from the server to storescp "
        "(single process, `--ignore`: receives everything, writes nothing).",
    ]
    if args.keep_tmp:
        rep.notes.append(f"work folders and DCMTK logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(rep.markdown(header(args, versions, "DIMSE benchmark", "bench/dimse.py")))
    if args.json:
        args.json.write_text(rep.to_json())
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
