"""Start, probe and stop the servers under test, each in its own temp folder.

The harness owns both processes so that they run on the same machine in the
same minute: absolute timings on shared 2-core runners drift, ratios less so.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

Log = Callable[[str], None]
DICOMSHARE = "dicomshare"
ORTHANC = "orthanc"
ORTHANC_AET = "ORTHANC"
DICOMSHARE_AET = "DICOMSHARE"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running server: DICOMweb root URL, auth headers and the process to watch."""

    name: str
    root: str  # DICOMweb root without trailing slash
    headers: dict[str, str]
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    version: str = ""
    keep: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    dicom_port: int = 0  # DIMSE listener, 0 when not enabled
    ae_title: str = ""

    def session(self) -> requests.Session:
        """One persistent connection per client; identity encoding keeps both servers honest."""
        s = requests.Session()
        s.headers.update(self.headers)
        s.headers["Accept-Encoding"] = "identity"
        return s

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> str:
        """SIGTERM, then SIGKILL after `timeout`; returns how it ended, for the log."""
        t0 = time.monotonic()
        how = "already exited"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
                how = "stopped"
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                how = f"killed (no exit {timeout:.0f}s after SIGTERM)"
        t1 = time.monotonic()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return (
            f"{how}, rc {self.proc.returncode} after {t1 - t0:.1f}s; "
            f"work folder removed in {time.monotonic() - t1:.1f}s"
        )


def _wait_ready(
    url: str,
    proc: subprocess.Popen[bytes],
    timeout: float,
    log_path: Path,
    headers: dict[str, str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited with {proc.returncode} before ready:\n{tail}")
        try:
            r = requests.get(url, headers=headers or {}, timeout=2)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s ({last}); see {log_path}")


def find_dicomweb_plugin() -> str:
    """Locate the Orthanc DICOMweb plugin shipped by the Debian package."""
    candidates: list[str] = []
    try:
        out = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False
        ).stdout
        candidates += [ln for ln in out.splitlines() if ln.endswith(".so") and "plugins" in ln]
    except OSError:
        pass
    candidates += glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb*.so*")
    candidates += glob.glob("/usr/lib/orthanc/plugins/libOrthancDicomWeb*.so*")
    candidates += glob.glob("/usr/lib/orthanc/libOrthancDicomWeb*.so*")
    for c in candidates:
        if os.path.exists(c):
            return c
    raise RuntimeError("Orthanc DICOMweb plugin not found (apt-get install orthanc-dicomweb)")


def orthanc_config(
    workdir: Path,
    http_port: int,
    plugin: str,
    overrides: dict[str, object],
    dicom_port: int = 0,
) -> dict[str, object]:
    """Stock Orthanc settings except what isolation needs (ports, folders, no remote access).

    `plugin` "" leaves DICOMweb out; `dicom_port` > 0 enables the DIMSE server as ORTHANC.
    """
    cfg: dict[str, object] = {
        "Name": "dicomshare-bench",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "DicomPort": free_port(),
        "WebDavEnabled": False,
        "SaveJobs": False,
        # Default 30 s would cut off the 1 GiB STOW-RS request on a slow runner.
        "HttpRequestTimeout": 3600,
    }
    if plugin:
        cfg["Plugins"] = [plugin]
        cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
    if dicom_port:
        cfg.update(DicomServerEnabled=True, DicomPort=dicom_port, DicomAet=ORTHANC_AET)
    cfg.update(overrides)
    return cfg


def start_orthanc(
    cmd: str,
    plugin: str,
    overrides: dict[str, object],
    tmp_root: Path,
    keep: bool,
    log: Log,
    dicom_port: int = 0,
    env: dict[str, str] | None = None,
) -> Server:
    """`plugin` "" runs without DICOMweb; `env` is added to the server's environment."""
    workdir = Path(tempfile.mkdtemp(prefix="orthanc-", dir=tmp_root))
    port = free_port()
    cfg_path = workdir / "orthanc.json"
    cfg = orthanc_config(workdir, port, plugin, overrides, dicom_port)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    log_path = workdir / "orthanc.log"
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(
            [cmd, str(cfg_path)],
            cwd=workdir,
            env=dict(os.environ, **env) if env else None,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    _wait_ready(f"{base}/system", proc, 60, log_path)
    if plugin:
        _wait_ready(f"{base}/dicom-web/studies?limit=1", proc, 30, log_path)
    version = requests.get(f"{base}/system", timeout=5).json().get("Version", "?")
    plug = "?"
    if plugin:
        try:
            plug = requests.get(f"{base}/plugins/dicom-web", timeout=5).json().get("Version", "?")
        except (requests.RequestException, ValueError):
            pass
    label = f"Orthanc {version}" + (f", DICOMweb plugin {plug}" if plugin else "")
    dicom = f", DICOM {cfg['DicomAet']} on port {cfg['DicomPort']}" if dicom_port else ""
    log(f"{label} pid {proc.pid} on {base}{dicom}")
    return Server(
        ORTHANC,
        f"{base}/dicom-web",
        {},
        proc,
        workdir,
        log_path,
        label,
        keep,
        dicom_port=int(str(cfg["DicomPort"])) if dicom_port else 0,
        ae_title=str(cfg["DicomAet"]) if dicom_port else "",
    )


def resolve_dicomshare(cmd: str, repo_root: Path) -> str:
    path = Path(cmd)
    if not path.is_absolute() and os.sep in cmd:
        path = repo_root / path
    found = str(path) if path.exists() else shutil.which(cmd)
    if not found:
        raise FileNotFoundError(
            f"dicomshare command not found: {cmd} (run `make install`, pass --dicomshare-cmd, "
            "or use --only orthanc)"
        )
    return found


def start_dicomshare(
    cmd: str,
    database_url: str | None,
    tmp_root: Path,
    keep: bool,
    log: Log,
    dicom_port: int = 0,
    peers: Sequence[tuple[str, str, int]] = (),
    extra_env: dict[str, str] | None = None,
) -> Server:
    """`dicom_port` > 0 starts the DIMSE listener (accepting unknown callers) and
    registers `peers` (AE title, host, port) first, e.g. C-MOVE destinations."""
    workdir = Path(tempfile.mkdtemp(prefix="dicomshare-", dir=tmp_root))
    env = dict(os.environ, DICOMSHARE_DATA_DIR=str(workdir / "data"), **(extra_env or {}))
    if database_url:
        env["DICOMSHARE_DATABASE_URL"] = database_url

    def cli(*args: str, stdin: str | None = None) -> str:
        res = subprocess.run(
            [cmd, *args],
            input=stdin,
            env=env,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"dicomshare {' '.join(args)} failed ({res.returncode}):\n"
                f"{res.stdout[-2000:]}{res.stderr[-2000:]}"
            )
        return res.stdout

    try:
        cli(
            "users",
            "create",
            "bench",
            "--org",
            "bench",
            "--role",
            "admin",
            "--password-stdin",
            stdin="bench-password\n",
        )
    except RuntimeError as exc:
        if not database_url:
            raise
        # A persistent PostgreSQL database may already hold the user from an earlier run.
        log(f"ignoring (database reused?): {exc}")
    token = cli("tokens", "create", "bench").strip().splitlines()[-1].strip()
    for title, host, peer_port in peers:
        cli("ae", "add", title, "--host", host, "--port", str(peer_port))
    try:
        version = subprocess.run(
            [cmd, "--version"], env=env, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    port = free_port()
    log_path = workdir / "dicomshare.log"
    serve = [cmd, "serve", "--http-host", "127.0.0.1", "--http-port", str(port)]
    if dicom_port:
        serve += ["--dicom-port", str(dicom_port), "--ae-title", DICOMSHARE_AET]
        serve += ["--dicom-accept-unknown"]
    else:
        serve += ["--dicom-port", "0"]  # no DIMSE listener for the DICOMweb benchmark
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(
            serve,
            cwd=workdir,
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    _wait_ready(f"{base}/healthz", proc, 90, log_path)
    log(
        f"dicomshare {version or '(version unknown)'} pid {proc.pid} on {base}"
        f"{' with ' + database_url.split('@')[-1] if database_url else ''}"
        f"{f', DICOM {DICOMSHARE_AET} on port {dicom_port}' if dicom_port else ''}"
    )
    return Server(
        DICOMSHARE,
        f"{base}/dicomweb",
        {"Authorization": f"Bearer {token}"},
        proc,
        workdir,
        log_path,
        version or "dicomshare",
        keep,
        {"database": "postgresql" if database_url else "default"},
        dicom_port,
        DICOMSHARE_AET if dicom_port else "",
    )


@dataclass
class ServerSpec:
    """Everything needed to start fresh servers of either kind on demand."""

    dicomshare_cmd: str
    database_url: str | None
    orthanc_cmd: str
    orthanc_plugin: str
    orthanc_overrides: dict[str, object]
    tmp_root: Path
    keep: bool

    def start(self, name: str, log: Log) -> Server:
        if name == ORTHANC:
            return start_orthanc(
                self.orthanc_cmd,
                self.orthanc_plugin,
                self.orthanc_overrides,
                self.tmp_root,
                self.keep,
                log,
            )
        return start_dicomshare(
            self.dicomshare_cmd, self.database_url, self.tmp_root, self.keep, log
        )
