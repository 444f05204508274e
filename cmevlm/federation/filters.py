"""NVIDIA FLARE filters of the consortium job: what a site sends, recorded before it leaves.

`SiteAudit` is the last filter on a site's outgoing results (after the DP filter or FLARE's
homomorphic encryptor, when on: it records the ciphertexts that leave): it
serializes the message exactly as FLARE does (fobs) and writes a `sent` record to the site's
audit (<site workdir>/federation/audit.jsonl: kind = parameters, round, bytes, sha256, tensor
count), fsynced, before FLARE sends it; with `federation.capture_messages` it also keeps the
bytes (federation/messages/) for the no-image scan. `RoundLog` is the coordinator's gate and log:
every result that arrives, by site and round, with its size, example count and metrics, in the
file CMEVLM_ROUND_LOG names; one that does not fit the initial tensors is refused (under secure
aggregation also one with a tensor in plaintext).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time

from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.fuel.utils import fobs

ROUND_LOG_ENV = "CMEVLM_ROUND_LOG"


def value_count(v) -> int:
    """Values in one tensor of a message: an array's size, or a CKKS ciphertext's (size())."""
    size = getattr(v, "size", 0)
    return int(size() if callable(size) else size)


def message_facts(shareable: Shareable, fl_ctx: FLContext) -> tuple[bytes, dict]:
    """(the serialized message, its facts: bytes, sha256, tensors, values, round, examples)."""
    from nvflare.apis.dxo import MetaKey, from_shareable
    from nvflare.app_common.decomposers import common_decomposers

    common_decomposers.register()  # numpy and the like, as FLARE's own processes have them (idempotent)
    raw = fobs.dumps(shareable)
    rnd = shareable.get_header(AppConstants.CURRENT_ROUND)
    rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND) if rnd is None else rnd
    facts = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "job": fl_ctx.get_job_id(), "round": rnd}
    try:
        dxo = from_shareable(shareable)
        facts.update(tensors=len(dxo.data or {}), values=sum(value_count(v) for v in (dxo.data or {}).values()),
                     encrypted=sum(bool(x) for x in (dxo.get_meta_prop(MetaKey.PROCESSED_KEYS) or {}).values()),
                     data_kind=dxo.data_kind, examples=(dxo.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND))
    except Exception:  # not a DXO (an error reply): only its size and hash
        facts["data_kind"] = None
    return raw, facts


class SiteAudit(Filter):
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        from cmevlm.config import RunConfig
        from cmevlm.federation.processes import SITE_CONFIG_ENV
        from cmevlm.storage import Storage, join
        from cmevlm.teacher.client import AuditLog

        cfg = RunConfig.model_validate_json(os.environ[SITE_CONFIG_ENV])
        raw, facts = message_facts(shareable, fl_ctx)
        st = Storage(cfg.storage)
        AuditLog(st, join(cfg.workdir, "federation", "audit.jsonl")).sent(
            {"kind": "parameters", "site": cfg.federation.site, "to": cfg.federation.server_host, **facts})
        if cfg.federation.capture_messages:
            st.write_bytes(join(cfg.workdir, "federation", "messages", f"{time.time():.6f}-{facts['sha256'][:12]}.bin"), raw)
        return shareable


def expected_shapes(uri: str, endpoint: str | None = None, region: str | None = None) -> dict[str, tuple]:
    """{name: shape} of the initial trainable tensors (the safetensors header, in the run's storage)."""
    from cmevlm.config import StorageConfig
    from cmevlm.storage import Storage

    raw = Storage(StorageConfig(endpoint=endpoint, region=region)).read_bytes(uri)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def check_update(data: dict, expected: dict[str, tuple], encrypted: dict | None = None) -> str | None:
    """Why a site's tensors cannot be averaged (names, shapes, a dtype other than float32,
    non-finite values), or None.
    With secure aggregation (`encrypted` = the message's {name: encrypted?}) every tensor must
    be a ciphertext of the right number of values: a plaintext one is refused, and values the
    coordinator cannot read it cannot check."""
    import numpy as np

    if set(data) != set(expected):
        missing, extra = sorted(set(expected) - set(data)), sorted(set(data) - set(expected))
        return f"tensor names differ: {len(missing)} missing {missing[:2]}, {len(extra)} unexpected {extra[:2]}"
    for k, v in data.items():
        if encrypted is not None:
            if not encrypted.get(k) or isinstance(v, np.ndarray):
                return f"{k}: not encrypted (secure aggregation takes ciphertexts only)"
            if value_count(v) != int(np.prod(expected[k])):
                return f"{k}: {value_count(v)} encrypted values != {int(np.prod(expected[k]))}"
            continue
        a = np.asarray(v)
        if a.shape != expected[k]:
            return f"{k}: shape {list(a.shape)} != {list(expected[k])}"
        if a.dtype != np.float32:
            return f"{k}: dtype {a.dtype} (sites send float32)"
        if not np.isfinite(a).all():
            return f"{k}: non-finite values"
    return None


class RoundLog(Filter):
    """The coordinator's gate and log of what arrives: a result whose tensors do not fit the
    initial ones (names, shapes) or hold NaN / inf is refused (FedAvg then leaves it out of the
    round, the others are averaged) and logged as rejected with the reason; every result is
    logged with its size, example count and metrics."""

    def __init__(self, initial: str = "", endpoint: str | None = None, region: str | None = None, encrypted: bool = False):
        super().__init__()
        self.initial, self.endpoint, self.region, self.encrypted = initial, endpoint, region, encrypted
        self._expected = None

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        from nvflare.apis.dxo import MetaKey, from_shareable
        from nvflare.apis.fl_constant import ReturnCode
        from nvflare.apis.shareable import make_reply

        _, facts = message_facts(shareable, fl_ctx)
        peer = fl_ctx.get_peer_context()
        facts["site"] = peer.get_identity_name() if peer else None
        try:
            dxo = from_shareable(shareable)
            facts["metrics"] = (dxo.meta or {}).get("initial_metrics") or {}
            if self.initial and self._expected is None:
                self._expected = expected_shapes(self.initial, self.endpoint, self.region)
            keys = (dxo.get_meta_prop(MetaKey.PROCESSED_KEYS) or {}) if self.encrypted else None
            reason = check_update(dxo.data or {}, self._expected, keys) if self._expected else None
        except Exception as e:  # not a DXO: nothing to average
            facts["metrics"], reason = {}, f"not a model update: {type(e).__name__}"
        if reason:
            facts["rejected"] = reason
        append_round_log(facts)
        return make_reply(ReturnCode.BAD_TASK_DATA) if reason else shareable


def append_round_log(facts: dict) -> None:
    """One record of the coordinator's round log (the file CMEVLM_ROUND_LOG names), fsynced."""
    path = os.environ.get(ROUND_LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"time": time.time(), **facts}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
