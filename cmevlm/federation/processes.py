"""The coordinator's and the sites' NVIDIA FLARE processes, started from their startup kits.

These are the commands a kit's own `startup/sub_start.sh` runs (FLARE's server_train and
client_train with `secure_train=true`: gRPC over mutual TLS with the kit's certificates), as
children of `cmevlm federate` / `cmevlm site`, so each runs in the foreground of its pod and
dies with it. A site's process gets the site's run config in CMEVLM_SITE_CONFIG; the job's
client script (cmevlm.federation.site_app) reads it there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cmevlm.cluster import ENV_DEFAULTS

SITE_CONFIG_ENV = "CMEVLM_SITE_CONFIG"


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in ENV_DEFAULTS.items()}, **(extra or {})}
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))  # `python3` of the job = this one
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")) if p)
    return env


def _fresh_workspace(kit: Path, work: Path) -> Path:
    """A writable copy of the kit's layout (startup/ and local/ are read; the process writes
    its runs next to them): a mounted Secret is read-only."""
    import shutil

    work.mkdir(parents=True, exist_ok=True)
    for sub in ("startup", "local"):
        if (kit / sub).is_dir() and not (work / sub).exists():
            shutil.copytree(kit / sub, work / sub)
    for f in (work / "local").glob("*.default"):
        target = f.with_suffix("")
        if not target.exists():
            shutil.copy(f, target)
    return work


def start_server(kit: Path, work: Path, org: str, log: Path) -> subprocess.Popen:
    from cmevlm.federation import site_policy

    ws = _fresh_workspace(kit, work)
    site_policy.apply_coordinator(ws)
    cmd = [sys.executable, "-u", "-m", "nvflare.private.fed.app.server.server_train", "-m", str(ws), "-s", "fed_server.json",
           "--set", "secure_train=true", f"org={org}", "config_folder=config"]
    return _spawn(cmd, ws, log, _env())


def start_site(kit: Path, work: Path, site: str, org: str, site_config_json: str, log: Path) -> subprocess.Popen:
    from cmevlm.federation import site_policy

    ws = _fresh_workspace(kit, work)
    site_policy.apply(ws)  # the site's own authorization and job guard, written at every start
    cmd = [sys.executable, "-u", "-m", "nvflare.private.fed.app.client.client_train", "-m", str(ws), "-s", "fed_client.json",
           "--set", "secure_train=true", f"uid={site}", f"org={org}", "config_folder=config"]
    return _spawn(cmd, ws, log, _env({SITE_CONFIG_ENV: site_config_json}))


def _spawn(cmd: list[str], cwd: Path, log: Path, env: dict) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until the server listens (or its process died)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the federation server exited with {proc.returncode} before it listened")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"the federation server did not listen on {host}:{port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM the process group (FLARE's job processes are its children), then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
