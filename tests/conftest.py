"""Shared fixtures: a moto S3 server on 127.0.0.1 (real HTTP), a tiny model, synthetic data.

Expensive things are built once per session. Nothing here reaches the internet."""

from __future__ import annotations

import os
import socket

from cmevlm.cluster import apply_env_defaults  # noqa: E402  (light: no torch, no Ray)

apply_env_defaults()
# Keys for the loopback fakes; set before Ray starts so its workers inherit them.
os.environ.setdefault("GEMINI_API_KEY", "test-gemini-key")
os.environ.setdefault("OPENAI_API_KEY", "test-openai-key")

import pytest  # noqa: E402

from fake_llm import FakeLLM  # noqa: E402


def kill_ray_session(driver_pid: int) -> None:
    """Kill what a SIGKILLed driver's local Ray left behind. Ray starts its GCS, raylet and
    workers outside the driver's process group, so killing the group is not enough; they are
    found by the session name, which ends with the driver's pid."""
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if f"_{driver_pid}/" in " ".join(p.info["cmdline"] or [])
             or f"_{driver_pid} " in " ".join(p.info["cmdline"] or []) + " "]
    victims = {p.pid: p for r in roots for p in [r, *r.children(recursive=True)]}
    for p in victims.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims.values()), timeout=10)


def weights(model_dir) -> dict:
    """Every tensor of a model folder, one safetensors file or sharded with an index (as the real
    repo and the fixture are)."""
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server speaking the real S3 HTTP protocol on 127.0.0.1; yields its endpoint."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the moto server; yields `s3://<bucket>`."""
    import boto3

    name = "b-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:50]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from cmevlm.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from cmevlm.data.synth import write_dataset

    out = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(out, procedures=6, frames_per_procedure=6, sites=2, seed=3)
    return out


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session (start-up costs ~5 s). Started after the S3 server
    so that workers inherit its AWS_* environment."""
    from cmevlm.cluster import connect
    from cmevlm.config import RayConfig

    ray = connect(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def bad_source(tmp_path_factory):
    """A synthetic source with one of every kind of bad input; returns (path, expected), where
    expected = {"accepted": n, "quarantined": {reason fragment: n}}."""
    import shutil

    import numpy as np
    from PIL import Image

    from cmevlm.data.synth import write_dataset

    root = tmp_path_factory.mktemp("bad") / "src"
    write_dataset(root, procedures=3, frames_per_procedure=3, sites=1, seed=5)
    masks = lambda p, f: sorted((root / p / "masks" / f).glob("*.png"))  # noqa: E731
    total = len(list(root.glob("*/masks/*/*.png")))
    bad: dict[str, int] = {}

    def save(path, arr):
        Image.fromarray(arr).save(path)

    # A truncated frame: every structure of that frame is lost with it.
    f = root / "proc_000/frames/frame_0000.png"
    f.write_bytes(f.read_bytes()[:300])
    bad["unreadable frame"] = len(masks("proc_000", "frame_0000"))
    save(masks("proc_000", "frame_0001")[0], np.full((10, 10), 255, np.uint8))
    bad["differs from frame size"] = 1
    save(masks("proc_000", "frame_0002")[0], np.zeros((320, 400), np.uint8))
    bad["empty mask"] = 1
    save(masks("proc_001", "frame_0000")[0], np.full((320, 400, 3), 255, np.uint8))
    bad["not single-channel"] = 1
    save(masks("proc_001", "frame_0001")[0], (np.arange(320 * 400) % 4).astype(np.uint8).reshape(320, 400))
    bad["distinct values"] = 1
    shutil.copy(masks("proc_001", "frame_0002")[0], root / "proc_001/masks/frame_0002/liver.png")
    bad["unknown structure"] = 1
    # A procedure that procedures.csv does not know.
    (root / "proc_999/frames").mkdir(parents=True)
    shutil.copy(root / "proc_002/frames/frame_0000.png", root / "proc_999/frames/frame_0000.png")
    shutil.copytree(root / "proc_002/masks/frame_0000", root / "proc_999/masks/frame_0000")
    bad["not in procedures.csv"] = len(masks("proc_999", "frame_0000"))
    (root / "proc_002/masks/frame_9999").mkdir()
    shutil.copy(masks("proc_002", "frame_0000")[0], root / "proc_002/masks/frame_9999/duodenum.png")
    bad["mask without a frame"] = 1
    accepted = total - sum(v for k, v in bad.items() if k not in ("unknown structure", "not in procedures.csv", "mask without a frame"))
    return root, {"accepted": accepted, "quarantined": bad}


@pytest.fixture
def fake_llm():
    """A Gemini/OpenAI-speaking server on 127.0.0.1 that logs every request."""
    with FakeLLM() as srv:
        yield srv


@pytest.fixture(scope="session")
def taught(ray_local, tmp_path_factory, synth_dir, tiny_model_dir):
    """A workdir after ingest and the offline teacher (frames/, sft/), with the tiny model
    standing in as a finished models/sft. Tests copy what they need out of it."""
    import shutil

    from cmevlm import ingest, teach
    from cmevlm.config import load_config
    from cmevlm.storage import Storage

    workdir = tmp_path_factory.mktemp("taught") / "run"
    cfg = load_config(overrides=[f"workdir={workdir}", f"model.base={tiny_model_dir}", f"sources=[{{uri: '{synth_dir}'}}]",
                                 "data.image_size=56"])
    ingest.run(cfg)
    teach.run(cfg)
    shutil.copytree(tiny_model_dir, workdir / "models/sft")
    Storage().write_manifest(str(workdir / "models/sft"), stage="sft")
    return workdir


def wait_for(predicate, timeout_s: float, poll_s: float = 1.0) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes; its last answer."""
    import time

    end = time.time() + timeout_s
    while time.time() < end:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()
