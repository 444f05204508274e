"""A Ray the CLI starts refuses anyone without its token: its GCS and raylet listen on every
interface, so a process that can reach the machine must not be able to join it and run code
next to the frames. Nothing in the defaults turns Ray's authentication off."""

import os
import subprocess
import sys
import time

from cmevlm.cluster import ENV_DEFAULTS

HOLD = """
import sys
from cmevlm.cluster import connect
from cmevlm.config import RayConfig
ray = connect(RayConfig(num_cpus=1))
import os
print(ray.get_runtime_context().gcs_address, os.environ["RAY_AUTH_TOKEN"], flush=True)
sys.stdin.read()
"""

JOIN = """
import ray, sys
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    print("joined", ray.get(ray.remote(lambda: 6 * 7).remote()))
except Exception as e:
    print("refused", type(e).__name__, str(e)[:200])
"""


def _join(address: str, env: dict) -> str:
    r = subprocess.run([sys.executable, "-c", JOIN, address], capture_output=True, text=True, env=env, timeout=120)
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]


def test_a_local_ray_refuses_a_client_without_its_token():
    assert "RAY_AUTH_MODE" not in ENV_DEFAULTS
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        address, token = holder.stdout.readline().split()
        assert len(token) == 64
        outsider = {**env, "RAY_USAGE_STATS_ENABLED": "0"}
        assert _join(address, outsider).startswith("refused"), "a client without the token joined"
        assert _join(address, {**outsider, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}).startswith("refused")
        assert _join(address, {**outsider, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}) == "joined 42"
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        time.sleep(1)
