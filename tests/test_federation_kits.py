"""Distributed provisioning (NVIDIA FLARE's `nvflare cert` / `nvflare package`), through the
commands each party runs: every site's private key is made and kept at the site, the
coordinator signs and holds only public material, and under secure aggregation it gets only
the public encryption context. A hostile coordinator, holding everything it holds, can neither
sign as a site nor decrypt a site's update."""

import json
import stat
from pathlib import Path

import pytest
import yaml

from cmevlm.cli import main
from cmevlm.federation import kits

SITES = "[site-a, site_b]"


def _args(workdir: Path, site: str | None = None) -> list[str]:
    fed = f"{{sites: {SITES}, secure_aggregation: true, dpo_rounds: 0, trainable: lora" + (f", site: {site}" if site else "") + "}"
    return ["--set", f"workdir={workdir}", "--set", f"federation={fed}"]


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory):
    """The coordinator and two sites, each in its own folder, through the CLI, in order."""
    root = tmp_path_factory.mktemp("enrol")
    coord, sites = root / "coordinator", {s: root / s for s in ("site-a", "site_b")}
    assert main(["federate", "--provision", *_args(coord)]) == 0
    fp = json.loads((coord / "federation/kits/ca/ca.json").read_text())["rootCA_fingerprint"]
    for site, work in sites.items():
        assert main(["site", "--request", *_args(work, site)]) == 0
        request = next((work / "federation/kits" / f"{site}.request").glob("*.request.zip"))
        assert main(["federate", "--approve", str(request), *_args(coord)]) == 0  # only the zip travels
        signed = coord / "federation/kits/signed" / f"{site}.signed.zip"
        assert main(["site", "--package", str(signed), "--fingerprint", fp, *_args(work, site)]) == 0
    assert main(["site", "--he-keys", *_args(sites["site-a"], "site-a")]) == 0  # one site makes the keys
    secret = sites["site-a"] / "federation/kits/site-a/startup/client_context.tenseal"
    assert main(["site", "--he-keys", str(secret), *_args(sites["site_b"], "site_b")]) == 0  # shared among sites only
    digests = [str(w / "federation/kits" / f"{s}.digests.json") for s, w in sites.items()]  # all the coordinator learns of a kit
    assert main(["federate", "--he-public", str(sites["site-a"] / "federation/kits/server_context.tenseal"), "--sign", *digests,
                 *_args(coord)]) == 0
    for site, work in sites.items():
        assert main(["site", "--he-signature", str(coord / "federation/kits/signed" / f"{site}.signature.json"), *_args(work, site)]) == 0
    return coord, sites


def _private_keys(folder: Path) -> list:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    out = []
    for f in folder.rglob("*"):
        if f.is_file() and b"PRIVATE KEY-----" in f.read_bytes()[:4096]:
            out.append(load_pem_private_key(f.read_bytes(), password=None))
    return out


def _public_key(cert: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return x509.load_pem_x509_certificate(cert.read_bytes()).public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def test_each_site_keeps_its_own_key_and_the_coordinator_cannot_sign_as_a_site(enrolled):
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    coord, sites = enrolled
    held = {k.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo) for k in _private_keys(coord)}
    assert held  # its CA key and its own server and admin keys
    for site, work in sites.items():
        kit = work / "federation/kits" / site / "startup"
        client = json.loads((kit / "fed_client.json").read_text())
        assert client["client"]["connection_security"] == "mtls" and client["servers"][0]["service"]["scheme"] == "grpc"
        assert _public_key(kit / "client.crt") not in held  # nothing the coordinator holds pairs with a site's certificate
        assert _public_key(kit / "client.crt") in {k.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
                                                   for k in _private_keys(work)}  # the site does hold it
    assert not [p for p in coord.rglob("*.key") if any(site in str(p) for site in sites)]


def test_the_coordinator_cannot_decrypt_and_holds_only_the_public_context(enrolled):
    import tenseal as ts

    coord, sites = enrolled
    contexts = [f for f in coord.rglob("*.tenseal")]
    assert contexts and not any(ts.context_from(f.read_bytes()).is_private() for f in contexts)
    a, b = (ts.context_from((w / "federation/kits" / s / "startup/client_context.tenseal").read_bytes()) for s, w in sites.items())
    assert a.is_private() and b.is_private()
    update = ts.ckks_vector(a, [0.5, -1.25, 3.0])  # a site's encrypted update
    assert [round(x, 3) for x in ts.ckks_vector_from(b, update.serialize()).decrypt()] == [0.5, -1.25, 3.0]  # the other site can
    public = ts.context_from(next(iter(contexts)).read_bytes())
    with pytest.raises(ValueError):
        ts.ckks_vector_from(public, update.serialize()).decrypt()  # the coordinator cannot


def test_secret_material_is_0600_in_0700_folders(enrolled):
    coord, sites = enrolled
    for root in (coord / "federation/kits", *(w / "federation/kits" for w in sites.values())):
        for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        secret = [f for f in root.rglob("*") if f.is_file() and (f.suffix == ".key" or f.name == "client_context.tenseal")]
        assert secret and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in secret), secret


def test_each_party_writes_only_its_own_secrets_and_hostile_requests_are_refused(enrolled, tmp_path, capsys):
    coord, sites = enrolled
    assert main(["site", "--secrets", str(tmp_path / "a"), *_args(sites["site-a"], "site-a")]) == 0
    assert main(["federate", "--secrets", str(tmp_path / "c"), *_args(coord)]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["cmevlm-kit-site-a.yaml"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["cmevlm-kit-admin-at-cmevlm-local.yaml", "cmevlm-kit-localhost.yaml"]
    doc = yaml.safe_load((tmp_path / "a" / "cmevlm-kit-site-a.yaml").read_text())
    assert doc["kind"] == "Secret" and {"client.key", "client.crt", "rootCA.pem", "fed_client.json"} <= set(doc["data"])
    assert stat.S_IMODE((tmp_path / "a" / "cmevlm-kit-site-a.yaml").stat().st_mode) == 0o600
    # A context with its secret key is never installed at the coordinator; an unknown site is never signed.
    secret = sites["site-a"] / "federation/kits/site-a/startup/client_context.tenseal"
    assert main(["federate", "--he-public", str(secret), *_args(coord)]) == 2
    others = json.loads((coord / "federation/kits/signed/site_b.signature.json").read_text())  # another site's signatures
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(others))
    assert main(["site", "--he-signature", str(forged), *_args(sites["site-a"], "site-a")]) == 2
    stranger = tmp_path / "stranger"
    assert main(["site", "--request", *_args(stranger, "site-a")]) == 0
    zip_ = next((stranger / "federation/kits/site-a.request").glob("*.request.zip"))
    renamed = _rename_request(zip_, tmp_path / "site-x.request.zip", "site-x")
    assert main(["federate", "--approve", str(renamed), *_args(coord)]) == 2
    assert "not a participant" in capsys.readouterr().err


def _rename_request(src: Path, dst: Path, name: str) -> Path:
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "site.yaml":
                doc = yaml.safe_load(data)
                doc["participants"][0]["name"] = name
                data = yaml.safe_dump(doc).encode()
            zout.writestr(item, data)
    return dst
