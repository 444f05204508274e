"""NVIDIA FLARE filters of the consortium job: what a site sends, recorded before it leaves.

`SiteAudit` is the last filter on a site's outgoing results (after the DP filter, when on): it
serializes the message exactly as FLARE does (fobs) and writes a `sent` record to the site's
audit (<site workdir>/federation/audit.jsonl: kind = parameters, round, bytes, sha256, tensor
count), fsynced, before FLARE sends it; with `federation.capture_messages` it also keeps the
bytes (federation/messages/) for the no-image scan. `RoundLog` is the coordinator's: every
result that arrives, by site and round, with its size, example count and metrics, in the file
CMEVLM_ROUND_LOG names.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.fuel.utils import fobs

ROUND_LOG_ENV = "CMEVLM_ROUND_LOG"


def message_facts(shareable: Shareable, fl_ctx: FLContext) -> tuple[bytes, dict]:
    """(the serialized message, its facts: bytes, sha256, tensors, values, round, examples)."""
    from nvflare.apis.dxo import from_shareable

    raw = fobs.dumps(shareable)
    rnd = shareable.get_header(AppConstants.CURRENT_ROUND)
    rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND) if rnd is None else rnd
    facts = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "round": rnd}
    try:
        dxo = from_shareable(shareable)
        facts.update(tensors=len(dxo.data or {}), values=int(sum(getattr(v, "size", 0) for v in (dxo.data or {}).values())),
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


class RoundLog(Filter):
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        path = os.environ.get(ROUND_LOG_ENV)
        if path:
            _, facts = message_facts(shareable, fl_ctx)
            peer = fl_ctx.get_peer_context()
            site = peer.get_identity_name() if peer else None
            from nvflare.apis.dxo import from_shareable

            try:
                metrics = (from_shareable(shareable).meta or {}).get("initial_metrics") or {}
            except Exception:
                metrics = {}
            with open(path, "a") as f:
                f.write(json.dumps({"site": site, "time": time.time(), "metrics": metrics, **facts}, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return shareable
