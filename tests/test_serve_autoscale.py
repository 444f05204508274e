"""Autoscaling, shown working on a local Ray: a bounded load takes the deployment from one
replica to two, it returns to one after the load stops, and no request fails meanwhile."""

import json
import threading
import time
import urllib.request

from cmevlm.config import load_config
from conftest import free_port

KEY = "autoscale-test-key"


def _replicas(server) -> float:
    req = urllib.request.Request(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    text = urllib.request.urlopen(req, timeout=60).read().decode()
    return float(next(x.split()[-1] for x in text.splitlines() if x.startswith("cmevlm_replicas ")))


def _running() -> int:
    from ray import serve

    return serve.status().applications["cmevlm"].deployments["VLMServer"].replica_states.get("RUNNING", 0)


def _wait_for(count: int, seconds: float) -> float:
    t0 = time.time()
    while time.time() - t0 < seconds:
        if _running() == count:
            return time.time() - t0
        time.sleep(0.5)
    raise AssertionError(f"{count} replicas not reached in {seconds} s (running: {_running()})")


def test_load_scales_one_replica_to_two_and_back_without_a_failed_request(ray_local, tiny_model_dir, tmp_path):
    from ray import serve

    from cmevlm.serve import app
    from test_serve_hostile import GOOD_IMAGE, _chat

    port = free_port()
    cfg = load_config(overrides=[f"workdir={tmp_path}", f"serve.model={tiny_model_dir}", f"serve.port={port}", f"serve.api_keys=[{KEY}]",
                                 "serve.min_replicas=1", "serve.max_replicas=2", "serve.num_cpus_per_replica=0.25",
                                 "serve.target_ongoing_requests=2", "serve.upscale_delay_s=1", "serve.downscale_delay_s=3",
                                 "serve.look_back_period_s=5", "serve.max_batch_size=4", "serve.batch_wait_timeout_s=0.05", "data.image_size=56"])
    app.run(cfg, block=False)
    server = f"http://127.0.0.1:{port}"
    statuses, load_stop, stop = [], threading.Event(), threading.Event()
    body = json.dumps(_chat(image=GOOD_IMAGE, max_tokens=24)).encode()

    def client(until: threading.Event, pause: float):
        while not until.is_set():
            try:
                req = urllib.request.Request(server + "/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
                with urllib.request.urlopen(req, timeout=120) as r:
                    statuses.append(r.status)
            except Exception as e:  # noqa: BLE001 - any failure is counted, not raised in a thread
                statuses.append(repr(e))
            time.sleep(pause)

    try:
        assert _running() == 1
        heavy = [threading.Thread(target=client, args=(load_stop, 0.0)) for _ in range(16)]
        light = threading.Thread(target=client, args=(stop, 0.5))  # one slow client all along, through both changes
        for t in (*heavy, light):
            t.start()
        up = _wait_for(2, 120)
        assert _replicas(server) == 2
        load_stop.set()  # the load stops; the light client goes on
        down = _wait_for(1, 120)
        stop.set()
        for t in (*heavy, light):
            t.join()
        print(f"autoscaling: 1 -> 2 replicas after {up:.0f} s of load, back to 1 {down:.0f} s after it stopped; "
              f"{len(statuses)} requests")
        assert statuses and all(s == 200 for s in statuses), [s for s in statuses if s != 200][:5]
        assert _replicas(server) == 1
    finally:
        load_stop.set()
        stop.set()
        serve.shutdown()
