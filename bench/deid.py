#!/usr/bin/env python3
"""De-identification throughput: dicomshare's engine against dicognito and pydicom/deid.

What it measures
    Instances per second to read, de-identify and write the same corpus of DICOM files,
    in one run, with:

    - **dicognito** with its defaults: its own command-line ``main()`` (``Anonymizer()``,
      the burned-in annotation guard, files saved by new SOP Instance UID), ``--quiet``
      so it does not print a summary;
    - **deid** (pydicom/deid) with its defaults: ``replace_identifiers(files, save=True,
      output_folder=OUT, overwrite=True)``, i.e. the packaged default recipe;
    - **dicomshare** with the full Basic Profile (no options), through
      ``dicomshare.deid.batch.run`` with ``--jobs 1`` and ``--jobs 2`` (worker processes
      started with ``spawn``; their start-up is inside the timing, as a user sees it).

    Every tool runs in a fresh Python process that times only its own loop over the files
    (imports and interpreter start-up are outside the timing; each tool's first-use
    set-up is inside). dicognito and deid run from a separate virtualenv,
    ``--peers-venv`` (default /tmp/deid-peers-venv; created with ``pip install dicognito
    deid`` when missing), so the project venv is not polluted. Both venvs have the same
    pydicom and numpy. The tools run in turn, the order rotating between repetitions so
    that drift on a shared machine hits all of them alike; the median of ``--repeat``
    runs is reported. Before each run the harness waits (up to ``--quiet-wait`` s) for
    the CPUs to be less than 15% busy and reports how busy they were. Timings never
    change the exit status; a tool that fails or writes fewer files than it read does (1).

The corpus
    ``--files`` copies (default 400) of pydicom's CT_small, MR_small, rtplan, rtdose,
    rtstruct and test-SR, round-robin, each with fresh Study/Series/SOP Instance UIDs and
    one of ``--files // 10`` patients (ID and name), as Part 10 files. Cached in
    ``--data`` (default /tmp/dicomshare-bench-deid) and reused while it is big enough.

How to run
    .venv/bin/python bench/deid.py | tee /tmp/deid.md
    .venv/bin/python bench/deid.py --files 200 --repeat 1          # quick
    .venv/bin/python bench/deid.py --skip deid --jobs 1,2,4

    The progress log goes to stderr, the markdown report to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BASES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "rtstruct.dcm",
         "test-SR.dcm")
CORPUS_VERSION = 1
PEERS = ("dicognito", "deid")
_T0 = time.monotonic()

# Runs in the tool's own interpreter: times the tool's loop and prints one JSON line.
RUNNER = r'''
import json, sys, time
from importlib.metadata import version
from pathlib import Path


def count(out):
    return sum(1 for p in Path(out).rglob("*") if p.is_file())


def main():
    tool, listfile, out, jobs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    files = [ln for ln in Path(listfile).read_text().splitlines() if ln]
    result = {"tool": tool, "files": len(files), "notes": []}
    if tool == "dicognito":
        import logging
        from dicognito.__main__ import main as dicognito_main
        result["version"] = version("dicognito")
        start = time.perf_counter()
        dicognito_main(["--output-directory", out, "--quiet", *files])
        result["seconds"] = time.perf_counter() - start
        logging.shutdown()
    elif tool == "deid":
        from deid.dicom import replace_identifiers
        result["version"] = version("deid")
        start = time.perf_counter()
        replace_identifiers(files, save=True, output_folder=out, overwrite=True)
        result["seconds"] = time.perf_counter() - start
    else:
        from dicomshare.deid.batch import Config, Task, run
        result["version"] = version("dicomshare")
        tasks = [Task(f, f) for f in files]
        key = b"bench-deid-project-key-0123456789"
        config = Config((), key, out)
        marks = []  # (time, inputs done): the steady rate runs from the first result

        def progress(done):
            marks.append((time.perf_counter(), done))

        start = time.perf_counter()
        report = run(tasks, config, jobs=jobs, progress=progress)
        result["seconds"] = time.perf_counter() - start
        if len(marks) > 1:
            (first, k), last = marks[0], marks[-1][0]
            result["first"] = first - start
            result["steady"] = (len(files) - k) / max(1e-9, last - first)
        if report.held_back or report.rejected:
            result["notes"].append(f"{len(report.held_back)} held back, "
                                   f"{len(report.rejected)} rejected")
    result["pydicom"] = version("pydicom")
    result["written"] = count(out)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
'''


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Tool:
    """One configuration to time: a label, the interpreter and the runner arguments."""

    label: str
    kind: str  # dicognito | deid | dicomshare
    python: str
    jobs: int = 1
    rates: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)  # seconds to the first result
    steady: list[float] = field(default_factory=list)  # rate from the first result on
    errors: list[str] = field(default_factory=list)
    notes: set[str] = field(default_factory=set)
    version: str = ""
    pydicom: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--files", type=int, default=400, help="instances in the corpus")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool (median reported)")
    p.add_argument("--jobs", default="1,2", help="comma list of dicomshare --jobs values")
    p.add_argument("--skip", default="", help="comma list of tools to skip: "
                   "dicognito,deid,dicomshare")
    p.add_argument("--data", type=Path, default=Path("/tmp/dicomshare-bench-deid"),
                   help="cache folder for the corpus")
    p.add_argument("--peers-venv", type=Path, default=Path("/tmp/deid-peers-venv"),
                   help="virtualenv with dicognito and deid (created when missing)")
    p.add_argument("--python", default=str(REPO_ROOT / ".venv/bin/python"),
                   help="interpreter with dicomshare installed")
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="seconds to wait for idle CPUs before each run")
    p.add_argument("--tmp-dir", type=Path, default=None, help="parent of the output folders")
    p.add_argument("--json", type=Path, default=None, help="also write raw figures here")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip_set - {*PEERS, "dicomshare"}
    if unknown:
        p.error(f"unknown tool(s) in --skip: {', '.join(sorted(unknown))}")
    args.job_list = [int(j) for j in args.jobs.split(",") if j.strip()]
    return args


# -- corpus ----------------------------------------------------------------------------------
def ensure_corpus(folder: Path, n: int) -> list[Path]:
    """``n`` Part 10 files with fresh UIDs, cached in ``folder`` (regenerated when short)."""
    manifest = folder / "manifest.json"
    if manifest.exists():
        doc = json.loads(manifest.read_text())
        if doc.get("version") == CORPUS_VERSION and doc.get("files", 0) >= n:
            files = [folder / f"{i:05d}.dcm" for i in range(n)]
            if all(f.exists() for f in files):
                return files
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    log(f"generating a corpus of {n} files in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    templates = []
    for name in BASES:
        found = get_testdata_file(name)
        if not isinstance(found, str):
            raise SystemExit(f"pydicom test file {name} not found")
        templates.append(pydicom.dcmread(found, force=True))
    patients = max(1, n // 10)
    files = []
    for i in range(n):
        ds = templates[i % len(templates)]
        patient = i % patients
        ds.PatientID = f"BENCH{patient:05d}"
        ds.PatientName = f"DOE^PATIENT{patient}"
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    manifest.write_text(json.dumps({"version": CORPUS_VERSION, "files": n,
                                    "bases": list(BASES)}))
    return files


# -- tools -----------------------------------------------------------------------------------
def ensure_peers(venv: Path) -> str:
    """The peers' interpreter; the venv is created and filled when it is missing."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import dicognito, deid"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return str(python)
    log(f"creating {venv} with dicognito and deid")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "dicognito", "deid"], check=True)
    return str(python)


def importable(python: str, module: str) -> str:
    """'' if ``module`` imports in ``python``, else the error's last line."""
    proc = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    if proc.returncode == 0:
        return ""
    return (proc.stderr.strip().splitlines() or ["import failed"])[-1]


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(limit: float) -> float:
    deadline = time.monotonic() + limit
    busy = cpu_busy()
    while busy > 0.15 and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


def run_tool(tool: Tool, runner: Path, listfile: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([tool.python, str(runner), tool.kind, str(listfile), str(out),
                           str(tool.jobs)], capture_output=True, text=True, env=env,
                          cwd=str(runner.parent))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        tool.errors.append(f"exit {proc.returncode}: {tail}")
        log(f"{tool.label}: failed: {tail}")
        return
    res = json.loads(line[len("RESULT "):])
    tool.version, tool.pydicom = res["version"], res["pydicom"]
    tool.notes.update(res["notes"])
    if res["written"] < res["files"]:
        tool.errors.append(f"wrote {res['written']} of {res['files']} files")
    rate = res["files"] / res["seconds"]
    tool.rates.append(rate)
    if "steady" in res:
        tool.first.append(res["first"])
        tool.steady.append(res["steady"])
    log(f"{tool.label}: {res['files']} instances in {res['seconds']:.2f}s = {rate:.1f}/s "
        f"({res['written']} files written)")
    shutil.rmtree(out, ignore_errors=True)


# -- report ----------------------------------------------------------------------------------
def header(args: argparse.Namespace, n: int) -> list[str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    return [
        f"## De-identification throughput, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- Host: {cpu}, {os.cpu_count()} CPUs (shared with other work), Linux "
        f"{platform.release()}, Python {platform.python_version()}",
        f"- Corpus: {n} files, copies of pydicom's {', '.join(BASES)} with fresh UIDs; "
        f"median of {args.repeat} run(s) per tool",
        f"- Command: `{shlex.join(['.venv/bin/python', 'bench/deid.py', *args.argv])}`",
    ]


def report(tools: list[Tool], args: argparse.Namespace, n: int, skipped: list[str]) -> str:
    lines = header(args, n)
    lines += ["", "| tool | version (pydicom) | instances/s | runs | ratio to dicognito | "
              "CPU busy before | note |", "|---|---|---:|---|---:|---:|---|"]
    base = next((t for t in tools if t.kind == "dicognito" and t.rates), None)
    base_rate = statistics.median(base.rates) if base else None
    for t in tools:
        rate = statistics.median(t.rates) if t.rates else None
        ratio = f"{rate / base_rate:.2f}x" if rate and base_rate else ""
        runs = ", ".join(f"{r:.0f}" for r in t.rates)
        busy = f"{max(t.busy) * 100:.0f}%" if t.busy else ""
        notes = sorted(t.notes) + t.errors[:2]
        if t.steady:
            notes.append(f"first result after {statistics.median(t.first):.2f} s, then "
                         f"{statistics.median(t.steady):.0f}/s")
        note = "; ".join(notes)
        lines.append(f"| {t.label} | {t.version} ({t.pydicom}) | "
                     f"{'' if rate is None else f'{rate:.0f}'} | {runs} | {ratio} | {busy} | "
                     f"{note} |")
    lines.append("")
    ours = {t.jobs: statistics.median(t.rates) for t in tools
            if t.kind == "dicomshare" and t.rates}
    steady = {t.jobs: statistics.median(t.steady) for t in tools
              if t.kind == "dicomshare" and t.steady}
    if 1 in ours and base_rate:
        times = ours[1] / base_rate
        verdict = "meets" if times >= 3 else "does **not** meet"
        lines.append(f"dicomshare (Basic Profile, 1 process) is {times:.2f}x dicognito: it "
                     f"{verdict} the goal of >= 3x dicognito.")
    elif 1 in ours:
        lines.append("dicognito was not measured: no ratio to the >= 3x goal.")
    for jobs, rate in sorted(ours.items()):
        if jobs > 1 and 1 in ours:
            line = (f"dicomshare --jobs {jobs}: {rate / ours[1]:.2f}x its 1-process rate "
                    "overall (pool start-up included)")
            if jobs in steady and 1 in steady:
                line += f", {steady[jobs] / steady[1]:.2f}x from the first result on"
            lines.append(line + f"; linear is {jobs:.2f}x ({os.cpu_count()} CPUs, shared).")
    lines += [f"Skipped: {s}" for s in skipped]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = ensure_corpus(args.data, args.files)
    for f in files:  # warm the page cache: every tool then reads from memory
        f.read_bytes()
    tools: list[Tool] = []
    skipped: list[str] = []
    peers = [k for k in PEERS if k not in args.skip_set]
    if peers:
        try:
            peers_python = ensure_peers(args.peers_venv)
            tools += [Tool(k, k, peers_python) for k in peers]
        except (OSError, subprocess.CalledProcessError) as exc:
            skipped.append(f"dicognito and deid: cannot set up {args.peers_venv}: {exc}")
    if "dicomshare" not in args.skip_set:
        problem = importable(args.python, "dicomshare.deid.batch")
        if problem:
            skipped.append(f"dicomshare: the engine is not importable ({problem})")
            log(f"skipping dicomshare: {problem}")
        else:
            tools += [Tool(f"dicomshare Basic Profile, --jobs {j}", "dicomshare", args.python, j)
                      for j in args.job_list]
    work = Path(tempfile.mkdtemp(prefix="dicomshare-bench-deid-", dir=args.tmp_dir))
    try:
        runner = work / "deid_runner.py"
        runner.write_text(RUNNER)
        listfile = work / "files.txt"
        listfile.write_text("\n".join(str(f) for f in files) + "\n")
        for r in range(args.repeat):
            shift = r % max(1, len(tools))
            for tool in tools[shift:] + tools[:shift]:
                busy = wait_quiet(args.quiet_wait)
                tool.busy.append(busy)
                log(f"run {r + 1}/{args.repeat}: {tool.label} (CPUs {busy * 100:.0f}% busy)")
                run_tool(tool, runner, listfile, work / "out")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(tools, args, len(files), skipped))
    if args.json:
        args.json.write_text(json.dumps([{"label": t.label, "version": t.version,
                                          "rates": t.rates, "busy": t.busy,
                                          "errors": t.errors} for t in tools], indent=1))
    return 1 if any(t.errors for t in tools) else 0


if __name__ == "__main__":
    sys.exit(main())
