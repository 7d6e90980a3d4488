#!/usr/bin/env python3
"""Benchmark dicomshare against Orthanc over PS3.18 DICOMweb, side by side in one run.

Both servers are started by the harness on loopback and measured alternately,
because absolute timings on shared 2-core machines drift; the printed markdown
gives absolute figures and dicomshare/Orthanc ratios.  Nothing is asserted.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python bench/run.py`: import as the `bench` package
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(REPO_ROOT)
    else:
        sys.path.insert(0, str(REPO_ROOT))

from bench import datagen, workloads  # noqa: E402
from bench.procmem import rss_kib, tree  # noqa: E402
from bench.report import LABELS, Report, median, percentile  # noqa: E402
from bench.servers import (  # noqa: E402
    DICOMSHARE,
    ORTHANC,
    Server,
    ServerSpec,
    find_dicomweb_plugin,
    resolve_dicomshare,
)

PHASES = ("stow", "qido", "wado", "memory")
KIB_PER_MIB = 1024.0
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=[DICOMSHARE, ORTHANC], help="benchmark a single server")
    p.add_argument("--skip", default="", help="comma list of phases to skip: " + ",".join(PHASES))
    p.add_argument("--slices", type=int, default=2000, help="CT slices for STOW (512x512x16 bit)")
    p.add_argument("--series-size", type=int, default=500, help="slices per CT series (WADO size)")
    p.add_argument("--clients", default="1,4", help="comma list of concurrent STOW clients")
    p.add_argument(
        "--batch",
        type=int,
        default=0,
        help="also run STOW with K instances per request (0: only 1 per request)",
    )
    p.add_argument("--repeat", type=int, default=1, help="STOW repetitions (median reported)")
    p.add_argument("--studies", type=int, default=10000, help="one-instance studies for QIDO")
    p.add_argument("--queries", type=int, default=200, help="timed QIDO queries per server")
    p.add_argument("--wado-repeat", type=int, default=3, help="WADO retrievals (median reported)")
    p.add_argument(
        "--big-mb",
        default="256,1024",
        help="comma list of single-STOW request sizes in MiB for the memory phase",
    )
    p.add_argument("--load-batch", type=int, default=200, help="instances per untimed load request")
    p.add_argument(
        "--data",
        type=Path,
        default=Path("/tmp/dicomshare-bench-data"),
        help="cache folder for generated DICOM data",
    )
    p.add_argument("--tmp-dir", type=Path, default=None, help="parent of per-server work folders")
    p.add_argument("--keep-tmp", action="store_true", help="keep server work folders and logs")
    p.add_argument(
        "--dicomshare-cmd",
        default=".venv/bin/dicomshare",
        help="dicomshare executable (relative paths are relative to the repo root)",
    )
    p.add_argument(
        "--database-url",
        default=None,
        help="DICOMSHARE_DATABASE_URL for dicomshare, e.g. postgresql+psycopg://...",
    )
    p.add_argument("--orthanc-cmd", default="/usr/sbin/Orthanc")
    p.add_argument("--orthanc-plugin", default=None, help="DICOMweb plugin .so (default: dpkg -L)")
    p.add_argument(
        "--orthanc-set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override an Orthanc setting, e.g. StorageAccessOnFind='\"Never\"'",
    )
    p.add_argument("--json", type=Path, default=None, help="also write raw figures to this file")
    args = p.parse_args(argv)
    args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip_set - set(PHASES)
    if unknown:
        p.error(f"unknown phase(s) in --skip: {', '.join(sorted(unknown))}")
    args.client_list = _ints(args.clients)
    args.big_list = sorted(set(_ints(args.big_mb)))
    return args


def _orthanc_overrides(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw  # bare strings are convenient on the command line
    return out


def _order(names: list[str], k: int) -> list[str]:
    """Alternate which server goes first so slow drift hits both equally."""
    return names if k % 2 == 0 else list(reversed(names))


def run_stow(
    servers: dict[str, Server],
    ct: datagen.CtData,
    args: argparse.Namespace,
    slots: datagen.SlotAllocator,
    rep: Report,
) -> None:
    section = f"STOW-RS ingest: {len(ct.files)} CT instances of 512 KiB, fresh UIDs per run"
    configs = [(c, 1) for c in args.client_list]
    if args.batch > 1:
        configs += [(c, args.batch) for c in args.client_list]
    log(f"warming page cache: {datagen.warm_page_cache(ct.files) / datagen.MIB:.0f} MiB")
    names = list(servers)
    for ci, (clients, batch) in enumerate(configs):
        runs: dict[str, list[workloads.StowResult]] = {n: [] for n in names}
        for r in range(args.repeat):
            for name in _order(names, ci + r):
                res = workloads.stow(servers[name], ct.files, clients, batch, slots.take())
                runs[name].append(res)
                log(
                    f"STOW {name} clients={clients} batch={batch}: {res.instances} inst in "
                    f"{res.seconds:.2f}s = {res.instances / res.seconds:.1f} inst/s, "
                    f"{res.payload_bytes / datagen.MIB / res.seconds:.1f} MiB/s, "
                    f"failed={res.failed} {res.errors[:1]}"
                )
        plural = "s" if batch > 1 else ""
        label = f"{clients} client{'s' if clients > 1 else ''}, {batch} instance{plural}/request"
        for name, results in runs.items():
            failed = sum(x.failed for x in results)
            errors = [e for x in results for e in x.errors]
            note = f"{failed} failed" if failed else ""
            if errors:
                rep.error(section, name, f"{label}: {errors[0]}")
                note = (note + "; " if note else "") + "errors"
            ok = [x for x in results if x.instances == len(ct.files)]
            ips = median([x.instances / x.seconds for x in ok]) if ok else None
            mbs = median([x.payload_bytes / datagen.MIB / x.seconds for x in ok]) if ok else None
            rep.add(section, f"{label}: instances/s", "", "higher", name, ips, note)
            rep.add(section, f"{label}: MiB/s", "", "higher", name, mbs, note)


def run_qido(
    servers: dict[str, Server],
    small: list[Path],
    args: argparse.Namespace,
    slots: datagen.SlotAllocator,
    rep: Report,
    extra_studies: int,
) -> None:
    section = f"QIDO-RS study search latency: {len(small)} studies indexed, {args.queries} queries"
    for srv in servers.values():
        workloads.upload(srv, small, slots.take(), args.load_batch, 2, log, "small studies")
    warmup = 10
    queries = workloads.make_queries(len(small), args.queries + warmup)
    results = workloads.qido(list(servers.values()), queries, warmup)
    for name, res in results.items():
        for e in res.errors[:3]:
            rep.error(section, name, e)
        allq = [x * 1000 for x in res.all()]
        note = f"{len(res.errors)} errors" if res.errors else ""
        rep.add(section, "all queries p50", "ms", "lower", name, percentile(allq, 50), note)
        rep.add(section, "all queries p95", "ms", "lower", name, percentile(allq, 95), note)
        for kind in (k for k in workloads.QUERY_KINDS if k in res.latencies):
            ms = [x * 1000 for x in res.latencies[kind]]
            rep.add(section, f"{kind}: p50", "ms", "lower", name, percentile(ms, 50))
            rep.add(section, f"{kind}: p95", "ms", "lower", name, percentile(ms, 95))
        log(f"QIDO {name}: p50 {percentile(allq, 50):.1f} ms, p95 {percentile(allq, 95):.1f} ms")
    if len(results) == 2:
        a, b = (results[n].counts for n in (DICOMSHARE, ORTHANC))
        diff = [
            (kind, f"`{q}`: {x} vs {y}")
            for (kind, q), x, y in zip(queries[warmup:], a, b, strict=False)
            if x != y
        ]
        kinds = Counter(k for k, _ in diff)
        rep.notes.append(
            f"QIDO result counts (dicomshare vs Orthanc) differ for {len(diff)} of {len(a)} "
            "queries"
            + (f" ({', '.join(f'{k}: {n}' for k, n in kinds.items())}), e.g. " if diff else "")
            + "; ".join(t for _, t in diff[:3])
        )
    if extra_studies:
        rep.notes.append(
            f"QIDO ran on the STOW servers, which also held {extra_studies} CT studies."
        )


def run_wado(
    servers: dict[str, Server],
    ct: datagen.CtData,
    args: argparse.Namespace,
    slots: datagen.SlotAllocator,
    rep: Report,
) -> None:
    files = ct.series_files(0)
    payload = sum(p.stat().st_size for p in files)
    section = (
        f"WADO-RS retrieve of one {len(files)}-instance series "
        f"({payload / datagen.MIB:.0f} MiB), median of {args.wado_repeat}"
    )
    uids: dict[str, tuple[str, str]] = {}
    for name, srv in servers.items():
        slot = slots.take()
        workloads.upload(srv, files, slot, 25, 2, log, "WADO series instances")
        uids[name] = (
            datagen.reslot_uid(ct.study_uid, slot),
            datagen.reslot_uid(ct.series_uids[0], slot),
        )
    runs: dict[str, list[workloads.WadoResult]] = {n: [] for n in servers}
    for r in range(args.wado_repeat):
        for name in _order(list(servers), r):
            try:
                res = workloads.wado_series(servers[name], *uids[name])
            except Exception as exc:  # keep the other server's figures
                rep.error(section, name, str(exc))
                continue
            runs[name].append(res)
            log(
                f"WADO {name}: {res.bytes / datagen.MIB:.1f} MiB in {res.seconds:.2f}s = "
                f"{res.bytes / datagen.MIB / res.seconds:.1f} MiB/s"
            )
    for name, results in runs.items():
        if not results:
            continue
        short = [x for x in results if x.bytes < payload]
        note = f"only {short[0].bytes} of {payload} payload bytes received" if short else ""
        rep.add(
            section,
            "throughput",
            "MiB/s",
            "higher",
            name,
            median([x.bytes / datagen.MIB / x.seconds for x in results]),
            note,
        )
        rep.add(
            section, "time for the series", "s", "lower", name, median([x.seconds for x in results])
        )


def run_memory(
    spec: ServerSpec,
    names: list[str],
    bodies: list[tuple[int, datagen.BigBody]],
    slots: datagen.SlotAllocator,
    rep: Report,
    versions: dict[str, str],
) -> None:
    """One fresh server at a time, so neither competes with the other for CPU or RAM."""
    section = "Server memory (RSS of the process tree) around one big STOW-RS request"
    for name in names:
        try:
            srv = spec.start(name, log)
            versions[name] = srv.version
        except Exception as exc:
            rep.error(section, name, f"start failed: {exc}")
            continue
        try:
            _memory_one(srv, bodies, slots, rep, section)
        finally:
            log(f"{name}: {srv.stop()}")


def _memory_one(
    srv: Server,
    bodies: list[tuple[int, datagen.BigBody]],
    slots: datagen.SlotAllocator,
    rep: Report,
    section: str,
) -> None:
    def add(metric: str, kib: float | None, note: str = "") -> None:
        value = None if kib is None else kib / KIB_PER_MIB
        rep.add(section, metric, "MiB", "lower", srv.name, value, note)

    time.sleep(3)  # let start-up allocations settle
    add("idle after start", rss_kib(tree(srv.proc.pid)))
    for mib, body in bodies:
        res = workloads.big_stow(srv, body, mib, slots.take())
        log(
            f"memory {srv.name} {mib} MiB ({body.instances} inst): {res.seconds:.1f}s, RSS "
            f"{res.rss_before_kib / 1024:.0f} -> peak {res.peak_sampled_kib / 1024:.0f} "
            f"(HWM {res.peak_hwm_kib / 1024:.0f}) -> {res.rss_after_kib / 1024:.0f} MiB; "
            f"failed={res.failed} {res.error}"
        )
        if res.error:
            rep.error(section, srv.name, f"{mib} MiB request: {res.error}")
        m = f"{mib} MiB request"
        failed = f"{res.failed}/{body.instances} failed" if res.failed else ""
        add(f"{m}: RSS before", res.rss_before_kib)
        add(f"{m}: peak RSS (sampled every 10 ms)", res.peak_sampled_kib, failed)
        hwm_note = "" if res.hwm_reset else "clear_refs not permitted"
        add(f"{m}: peak VmHWM", res.peak_hwm_kib if res.hwm_reset else None, hwm_note)
        add(f"{m}: peak minus RSS before", res.peak_sampled_kib - res.rss_before_kib)
        add(f"{m}: RSS 2 s after", res.rss_after_kib)
        speed = None if res.failed else res.body_bytes / datagen.MIB / res.seconds
        rep.add(section, f"{m}: ingest throughput", "MiB/s", "higher", srv.name, speed)


def header(
    args: argparse.Namespace,
    versions: dict[str, str],
    title: str = "DICOMweb benchmark",
    script: str = "bench/run.py",
) -> list[str]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        (
            int(ln.split()[1]) // 1024
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal")
        ),
        0,
    )
    from importlib.metadata import version

    lines = [
        f"## {title}, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- Host: {cpu}, {os.cpu_count()} CPUs, {mem} MiB RAM, Linux {platform.release()}",
        f"- Client: Python {platform.python_version()}, requests {version('requests')}, "
        f"pydicom {version('pydicom')}, numpy {version('numpy')}",
    ]
    lines += [f"- {LABELS[n]}: {v}" for n, v in versions.items()]
    lines.append(f"- Command: `python {script} " + shlex.join(sys.argv[1:]) + "`")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [args.only] if args.only else [DICOMSHARE, ORTHANC]
    phases = [p for p in PHASES if p not in args.skip_set]
    dicomshare_cmd = ""
    if DICOMSHARE in names:
        try:
            dicomshare_cmd = resolve_dicomshare(args.dicomshare_cmd, REPO_ROOT)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    plugin = args.orthanc_plugin or (find_dicomweb_plugin() if ORTHANC in names else "")
    tmp_root = Path(tempfile.mkdtemp(prefix="dicomshare-bench-", dir=args.tmp_dir))
    spec = ServerSpec(
        dicomshare_cmd,
        args.database_url,
        args.orthanc_cmd,
        plugin,
        _orthanc_overrides(args.orthanc_set),
        tmp_root,
        args.keep_tmp,
    )
    rep = Report(names)
    slots = datagen.SlotAllocator()
    args.data.mkdir(parents=True, exist_ok=True)
    ct = (
        datagen.ensure_ct(args.data, args.slices, args.series_size, log)
        if {"stow", "wado"} & set(phases)
        else None
    )
    small = datagen.ensure_small(args.data, args.studies, log) if "qido" in phases else []
    bodies = (
        [(m, datagen.ensure_big_body(args.data, m, log)) for m in args.big_list]
        if "memory" in phases
        else []
    )
    versions: dict[str, str] = {}
    if {"stow", "qido", "wado"} & set(phases):
        servers: dict[str, Server] = {}
        try:
            for name in names:
                try:
                    servers[name] = spec.start(name, log)
                    versions[name] = servers[name].version
                except Exception as exc:
                    rep.error("startup", name, str(exc))
                    log(f"{name} failed to start: {exc}")
            steps: list[tuple[str, Callable[[], None]]] = []
            if ct and "stow" in phases:
                steps.append(("stow", lambda: run_stow(servers, ct, args, slots, rep)))
            if "qido" in phases:
                # each STOW run stores the CT study once more (fresh UIDs)
                extra = (
                    len(args.client_list) * (2 if args.batch > 1 else 1) * args.repeat
                    if "stow" in phases
                    else 0
                )
                steps.append(("qido", lambda: run_qido(servers, small, args, slots, rep, extra)))
            if ct and "wado" in phases:
                steps.append(("wado", lambda: run_wado(servers, ct, args, slots, rep)))
            for phase, step in steps:
                if not servers:
                    break
                log(f"--- phase {phase} ---")
                try:
                    step()
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
    if bodies:
        log("--- phase memory ---")
        run_memory(spec, names, bodies, slots, rep, versions)
    if not args.keep_tmp:
        shutil.rmtree(tmp_root, ignore_errors=True)
    else:
        rep.notes.append(f"server work folders and logs kept in {tmp_root}")
    md = rep.markdown(header(args, versions))
    print(md)
    if args.json:
        args.json.write_text(rep.to_json())
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
