"""Federation on NVIDIA FLARE: a coordinator and two sites as separate processes over gRPC with
mutual TLS, one round of LoRA SFT on each site's own data through Ray Train and the
distribution round, then the DPO job: each site samples and prefers with the consortium's SFT
model, one round of LoRA DPO, the distribution round. What the sites sent is read back from
their own copies of the messages."""

import hashlib
import json
import shutil

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from cmevlm.config import load_config
from cmevlm.federation import coordinator, demo, kits, report, scan
from cmevlm.model.loading import load_model
from cmevlm.storage import Storage
from conftest import free_port

SITES = ["site-a", "site-b"]


def _cfg(workdir, base, synth_dir, fed: dict, site: str | None, *extra):
    fed = {"sites": SITES, "rounds": 1, "dpo_rounds": 1, "local_steps": 2, "capture_messages": True, **fed, "site": site}
    return load_config(overrides=[f"workdir={workdir}", f"model.base={base}", f"sources=[{{uri: '{synth_dir}', site: {site or 'x'}}}]",
                                  "data.image_size=56", "sft.num_workers=1", "sft.zero_stage=0", "sft.per_device_batch_size=2",
                                  "sft.effective_batch_size=2", "sft.lr=1e-2", "sft.lora={r: 4, alpha: 8, dropout: 0.0}", "ray.num_cpus=1",
                                  "evaluate.limit=8", "sample.limit=6", "sample.max_new_tokens=12", "dpo.num_workers=1", "dpo.zero_stage=0",
                                  "dpo.per_device_batch_size=2", "dpo.effective_batch_size=2", "dpo.lr=1e-2", "dpo.lora={r: 4, alpha: 8, dropout: 0.0}",
                                  f"federation={json.dumps(fed)}", *extra])


def _federate(root, taught, tiny_model_dir, synth_dir, **fed):
    """A coordinator and the two sites under `root`, federated: (coordinator, sites, summary).
    site-b holds the second half of the examples: FedAvg must weight it less, and it samples
    other items."""
    fed = {"port": free_port(), **fed}  # each site's kit under its own workdir, the coordinator's under root/kits
    sites = []
    for i, name in enumerate(SITES):
        work = root / name
        for sub in ("frames", "sft"):
            shutil.copytree(taught / sub, work / sub)
        if i == 1:
            st = Storage()
            rows = st.read_parquet(str(work / "sft/train"))
            shutil.rmtree(work / "sft/train")
            st.write_parquet(str(work / "sft/train/part-00000.parquet"), rows.slice(rows.num_rows // 2))
            st.write_manifest(str(work / "sft"), stage="teach")
        sites.append(_cfg(work, tiny_model_dir, synth_dir, fed, name))
    coord = _cfg(root / "coordinator", tiny_model_dir, synth_dir, {**fed, "kits": str(root / "kits")}, None)
    return coord, sites, demo.federate(coord, sites)


@pytest.fixture(scope="module")
def consortium(taught, tmp_path_factory, tiny_model_dir, synth_dir):
    return _federate(tmp_path_factory.mktemp("consortium"), taught, tiny_model_dir, synth_dir)


def _sent(site_cfg) -> list[dict]:
    """The site's captured messages, deserialized as FLARE does: [{round, params, examples, raw}]."""
    from nvflare.apis.dxo import from_shareable
    from nvflare.fuel.utils import fobs

    out = []
    for f in sorted((__import__("pathlib").Path(site_cfg.workdir) / "federation" / "messages").glob("*.bin")):
        raw = f.read_bytes()
        dxo = from_shareable(fobs.loads(raw))
        out.append({"params": {k: torch.as_tensor(v) for k, v in dxo.data.items()}, "meta": dxo.meta, "raw": raw})
    return out


@pytest.mark.parametrize("phase,data", [("sft", "sft/train"), ("dpo", "preferences")])
def test_fedavg_weights_each_sites_tensors_by_its_examples(consortium, phase, data):
    coord, sites, summary = consortium
    first = {"sft": 0, "dpo": 2}[phase]  # messages in order: sft round 0, its distribution, dpo round 0, its distribution
    train_rounds = {s.federation.site: _sent(s)[first] for s in sites}
    assert {m["meta"]["initial_metrics"]["stage"] for m in train_rounds.values()} == {phase}
    n = {site: m["meta"]["NUM_STEPS_CURRENT_ROUND"] for site, m in train_rounds.items()}
    rows = {s.federation.site: Storage().read_parquet(f"{s.workdir}/{data}").num_rows for s in sites}
    assert n == rows and all(rows.values())
    if phase == "sft":
        assert rows["site-b"] < rows["site-a"]  # site-b holds half the SFT examples: it weighs half
    expected = {k: sum(n[s] * train_rounds[s]["params"][k] for s in n) / sum(n.values()) for k in train_rounds["site-a"]["params"]}
    final = load_file(f"{coord.workdir}/federation/coordinator/global-{phase}.safetensors")
    initial = load_file(f"{coord.workdir}/federation/initial-{phase}.safetensors")
    assert set(final) == set(expected) and all("lora_" in k for k in final)  # only the adapter travels
    for k, v in expected.items():
        torch.testing.assert_close(final[k], v.float(), rtol=1e-5, atol=1e-6)
    a, b = (train_rounds[s]["params"] for s in SITES)
    moved = {s: sorted(k for k in m["params"] if not torch.equal(m["params"][k], initial[k])) for s, m in train_rounds.items()}
    assert all(moved.values()), moved  # every site trained
    assert any(not torch.equal(a[k], b[k]) for k in a)  # and apart, on its own data


def test_dpo_starts_from_the_consortium_sft_model_with_each_sites_own_preferences(consortium):
    coord, sites, summary = consortium
    for s in sites:
        samples = Storage().read_manifest(f"{s.workdir}/samples")
        assert samples["model"] == f"{s.workdir}/models/federated" and samples["items"] == 6
        assert Storage().read_manifest(f"{s.workdir}/preferences")["pairs"] > 0
    sft_global, dpo_initial = (load_file(f"{coord.workdir}/federation/{f}") for f in ("coordinator/global-sft.safetensors", "initial-dpo.safetensors"))
    extra = set(dpo_initial) - set(sft_global)  # a new adapter on the SFT model; DPO's policy also trains the vision encoder
    assert set(sft_global) < set(dpo_initial) and all(".visual." in k for k in extra)
    assert all(not dpo_initial[k].any() for k in dpo_initial if "lora_B" in k)  # starts as the SFT model itself


def test_every_site_keeps_and_scores_the_consortium_model_and_so_does_the_coordinator(consortium):
    coord, sites, summary = consortium
    assert summary["engine"] == "nvflare" and summary["phases"] == ["sft", "dpo"]
    for phase in ("sft", "dpo"):
        scores = report.federated_scores(summary["rounds"], phase)
        assert set(scores) == set(SITES) and all(v["n"] == 8 for v in scores.values())
    assert report.federated_scores(summary["rounds"]) == report.federated_scores(summary["rounds"], "dpo")
    for s in [*sites, coord]:
        out = f"{s.workdir}/models/federated"
        assert Storage().read_manifest(out)["trainable"] == "lora"
        assert json.loads(open(f"{out}/adapter_config.json").read())["base_model_name_or_path"] == str(coord.model.base)
        load_model(out)  # base + the consortium's adapter
        dpo = f"{s.workdir}/models/federated-dpo"
        assert Storage().read_manifest(dpo)["phase"] == "dpo"
        assert json.loads(open(f"{dpo}/adapter_config.json").read())["base_model_name_or_path"] == out  # DPO's base: the SFT model
        load_model(dpo)  # base + SFT adapter + DPO adapter
    rounds = {(r["phase"], r["round"], r["site"]) for r in summary["rounds"]}
    assert rounds == {(p, r, s) for p in ("sft", "dpo") for r in (0, 1) for s in SITES}


def test_each_message_is_audited_before_it_leaves_and_holds_no_image_bytes(consortium):
    coord, sites, summary = consortium
    for s in sites:
        sent = _sent(s)
        audit = [json.loads(x) for x in open(f"{s.workdir}/federation/audit.jsonl")]
        assert len(sent) == 4 and len(audit) == 4  # each job's training round and distribution round
        assert all(a["event"] == "sent" and a["kind"] == "parameters" and a["site"] == s.federation.site for a in audit)
        assert sorted(a["sha256"] for a in audit) == sorted(hashlib.sha256(m["raw"]).hexdigest() for m in sent)
        assert all(a["bytes"] == len(m["raw"]) for a, m in zip(sorted(audit, key=lambda a: a["sha256"]),
                                                                sorted(sent, key=lambda m: hashlib.sha256(m["raw"]).hexdigest())))
        images = scan.site_images(s)
        result = scan.scan([m["raw"] for m in sent], images)
        assert result["images"] > 50 and result["probes"] > 50 and result["image_bytes_found"] == 0
        # The scan does find an image that is in a message: encoded, or as raw pixels.
        import io

        import numpy as np
        from PIL import Image

        leak = sent[0]["raw"] + images[3]
        pixels = sent[0]["raw"] + np.asarray(Image.open(io.BytesIO(images[5]))).tobytes()
        assert scan.scan([leak], images)["image_bytes_found"] >= 1 and scan.scan([pixels], images)["image_bytes_found"] >= 1


def test_dp_puts_flares_svt_filter_before_the_audit(tmp_path, tiny_model_dir, synth_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, synth_dir, {"kits": str(tmp_path / "kits"), "dp": {"fraction": 0.5}}, None)
    recipe = coordinator.build_recipe(cfg, str(tmp_path / "initial.safetensors"))
    recipe.export(job_dir=str(tmp_path / "job"))
    client = json.loads(next((tmp_path / "job").rglob("config_fed_client.json")).read_text())
    paths = [f["path"] for chain in client["task_result_filters"] for f in chain["filters"]]
    assert paths == ["nvflare.app_common.filters.svt_privacy.SVTPrivacy", "cmevlm.federation.filters.SiteAudit"]
    svt = client["task_result_filters"][0]["filters"][0]["args"]
    assert svt["fraction"] == 0.5
    server = json.loads(next((tmp_path / "job").rglob("config_fed_server.json")).read_text())
    assert client["executors"][0]["executor"]["args"]["params_transfer_type"] == "DIFF"  # DP clips and noises the round's update
    assert "cmevlm.federation.state.TrainableState" in json.dumps(server)


def test_the_coordinator_refuses_updates_that_do_not_fit_or_are_not_finite(tmp_path, monkeypatch):
    import numpy as np
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.fl_context import FLContext
    from safetensors.torch import save_file

    from cmevlm.federation.filters import ROUND_LOG_ENV, RoundLog

    save_file({"a.lora_A.weight": torch.zeros(4, 8), "a.lora_B.weight": torch.zeros(8, 4)}, str(tmp_path / "init.safetensors"))
    monkeypatch.setenv(ROUND_LOG_ENV, str(tmp_path / "rounds.jsonl"))
    gate = RoundLog(str(tmp_path / "init.safetensors"))
    good = {"a.lora_A.weight": np.ones((4, 8), np.float32), "a.lora_B.weight": np.ones((8, 4), np.float32)}
    bad = {"nan": {**good, "a.lora_B.weight": np.full((8, 4), np.nan, np.float32)},
           "shape": {**good, "a.lora_A.weight": np.ones((4, 9), np.float32)},
           "names": {"a.lora_A.weight": good["a.lora_A.weight"]},
           "ints": {**good, "a.lora_A.weight": np.ones((4, 8), np.int64)}}
    ok = DXO(DataKind.WEIGHTS, data=good).to_shareable()
    assert gate.process(ok, FLContext()) is ok
    for name, data in bad.items():
        out = gate.process(DXO(DataKind.WEIGHTS, data=data).to_shareable(), FLContext())
        assert out.get_return_code() == ReturnCode.BAD_TASK_DATA, name
    from nvflare.apis.shareable import Shareable

    assert gate.process(Shareable(), FLContext()).get_return_code() == ReturnCode.BAD_TASK_DATA  # not a model update
    log = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [("rejected" in r) for r in log] == [False, True, True, True, True, True]
    assert "non-finite" in log[1]["rejected"] and "shape" in log[2]["rejected"] and "names differ" in log[3]["rejected"]


# ---------------------------------------------------------------------------------------------
# Secure aggregation: FLARE's homomorphic encryption (CKKS through TenSEAL)


@pytest.fixture(scope="module")
def encrypted_consortium(taught, tmp_path_factory, tiny_model_dir, synth_dir):
    return _federate(tmp_path_factory.mktemp("encrypted"), taught, tiny_model_dir, synth_dir,
                     secure_aggregation=True, dpo_rounds=0, local_steps=1)


def _decrypted(site_cfg) -> list[dict]:
    """The site's captured messages, every tensor decrypted with the site's own secret key:
    [{params (numpy), meta, contexts (the CKKS contexts the message carries)}]."""
    import tenseal as ts
    from nvflare.apis.dxo import from_shareable
    from nvflare.app_opt.he import decomposers
    from nvflare.fuel.utils import fobs

    decomposers.register()
    key = ts.context_from((kits.kit_of(site_cfg, site_cfg.federation.site) / "startup" / kits.HE_CONTEXT["client"]).read_bytes())
    out = []
    for f in sorted((__import__("pathlib").Path(site_cfg.workdir) / "federation" / "messages").glob("*.bin")):
        dxo = from_shareable(fobs.loads(f.read_bytes()))
        assert all(isinstance(v, ts.CKKSVector) for v in dxo.data.values())
        contexts = [v.context() for v in dxo.data.values()]
        params = {k: __import__("numpy").array(ts.ckks_vector_from(key, v.serialize()).decrypt()) for k, v in dxo.data.items()}
        out.append({"params": params, "meta": dxo.meta, "contexts": contexts})
    return out


def test_secure_aggregation_sends_only_ciphertexts_and_the_sites_get_the_weighted_average(encrypted_consortium):
    import numpy as np
    import tenseal as ts

    coord, sites, summary = encrypted_consortium
    kit = kits.kit_of(coord, coord.federation.server_host)
    assert not ts.context_from((kit / "startup" / kits.HE_CONTEXT["server"]).read_bytes()).is_private()  # no secret key
    assert all(ts.context_from((kits.kit_of(s, s.federation.site) / "startup" / kits.HE_CONTEXT["client"]).read_bytes()).is_private()
               for s in sites)
    sent = {s.federation.site: _decrypted(s) for s in sites}
    assert all(len(m) == 2 for m in sent.values())  # the training round, the distribution round
    assert not any(c.is_private() for m in sent.values() for msg in m for c in msg["contexts"])  # the secret key never leaves
    n = {site: m[0]["meta"]["NUM_STEPS_CURRENT_ROUND"] for site, m in sent.items()}
    trained = {site: {k: v / n[site] for k, v in m[0]["params"].items()} for site, m in sent.items()}  # sites send n x tensors
    expected = {k: sum(n[s] * trained[s][k] for s in n) / sum(n.values()) for k in trained["site-a"]}
    assert any(not np.allclose(trained["site-a"][k], trained["site-b"][k], atol=1e-4) for k in expected)
    for site, m in sent.items():  # what each site received and kept, sent back in the distribution round
        kept = {k: v / n[site] for k, v in m[1]["params"].items()}
        for k, v in expected.items():
            np.testing.assert_allclose(kept[k], v, atol=1e-4)
    log = [r for r in summary["rounds"] if r["round"] == 0]
    assert {r["site"] for r in log} == set(SITES) and all(r["encrypted"] == r["tensors"] > 0 and "rejected" not in r for r in log)
    assert summary["models"]["sft"] is None and not (__import__("pathlib").Path(coord.workdir) / "models" / "federated").exists()
    for s in sites:
        assert Storage().read_manifest(f"{s.workdir}/models/federated")["trainable"] == "lora"
        audit = [json.loads(x) for x in open(f"{s.workdir}/federation/audit.jsonl")]
        assert [a["encrypted"] for a in audit] == [a["tensors"] for a in audit]
    assert set(report.federated_scores(summary["rounds"])) == set(SITES)


def test_under_secure_aggregation_the_coordinator_refuses_a_plaintext_update(tmp_path, monkeypatch):
    import numpy as np
    from nvflare.apis.dxo import DXO, DataKind, MetaKey
    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.fl_context import FLContext
    from safetensors.torch import save_file

    from cmevlm.federation.filters import ROUND_LOG_ENV, RoundLog

    save_file({"a.lora_A.weight": torch.zeros(4, 8)}, str(tmp_path / "init.safetensors"))
    monkeypatch.setenv(ROUND_LOG_ENV, str(tmp_path / "rounds.jsonl"))
    dxo = DXO(DataKind.WEIGHTS, data={"a.lora_A.weight": np.ones((4, 8), np.float32)})
    dxo.set_meta_prop(MetaKey.PROCESSED_KEYS, {"a.lora_A.weight": False})
    out = RoundLog(str(tmp_path / "init.safetensors"), encrypted=True).process(dxo.to_shareable(), FLContext())
    assert out.get_return_code() == ReturnCode.BAD_TASK_DATA
    assert "not encrypted" in json.loads((tmp_path / "rounds.jsonl").read_text())["rejected"]


def test_secure_aggregation_refuses_dp_and_a_full_dpo_start():
    from pydantic import ValidationError

    from cmevlm.config import FederationConfig

    with pytest.raises(ValidationError, match="choose one"):
        FederationConfig(secure_aggregation=True, dp={})
    with pytest.raises(ValidationError, match="trainable: lora"):
        FederationConfig(secure_aggregation=True, trainable="full", dpo_rounds=1)
    FederationConfig(secure_aggregation=True, trainable="full", dpo_rounds=0)


def test_a_site_never_sends_a_round_that_trained_to_nan():
    from cmevlm.federation import site_app

    cfg = load_config(overrides=["federation.site=site-a"])
    with pytest.raises(RuntimeError, match="1 non-finite tensors.*not sent"):
        site_app.check_finite(cfg, {"a": torch.tensor([1.0, float("nan")]), "b": torch.ones(2)}, 1, {"loss": float("nan")})
    site_app.check_finite(cfg, {"a": torch.ones(2)}, 1, {"loss": 0.5})


class _Payload:
    """A pickle that runs code when loaded (what a hostile party could put in a result)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_the_coordinators_result_is_loaded_as_tensors_only(tmp_path):
    """global_state reads FLARE's FL_global_model.pt with weights_only: tensors load, a pickle
    that would run code is refused and runs nothing."""
    good = tmp_path / "good" / "app_server"
    good.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(2)}}, good / "FL_global_model.pt")
    assert coordinator.global_state(tmp_path / "good")["w"].tolist() == [1.0, 1.0]
    bad = tmp_path / "bad"
    bad.mkdir()
    marker = tmp_path / "ran"
    torch.save({"model": {"w": _Payload(marker)}}, bad / "FL_global_model.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        coordinator.global_state(bad)
    assert not marker.exists()
