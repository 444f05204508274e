"""Shared fixtures: a moto S3 server on 127.0.0.1 (real HTTP), a tiny model, synthetic data.

Expensive things are built once per session. Nothing here reaches the internet."""

from __future__ import annotations

import os
import socket

for _k, _v in {
    "OMP_NUM_THREADS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402


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
