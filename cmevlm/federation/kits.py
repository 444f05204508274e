"""Startup kits by NVIDIA FLARE's distributed provisioning: every key stays where it is used.

The coordinator (the consortium's project admin) holds the root CA (`nvflare cert init`) and
signs; it never sees a site's private key:

    site         `cmevlm site --request`        nvflare cert request: its key and a CSR, a request zip
    coordinator  `cmevlm federate --approve Z`  nvflare cert approve: the signed certificate (public)
    site         `cmevlm site --package S --fingerprint F`   nvflare package: its kit, from its own key

The coordinator makes its own server and admin kits the same way (`cmevlm federate
--provision`). Every connection is gRPC with mutual TLS against that CA. Under secure
aggregation one site makes the consortium's CKKS context (`cmevlm site --he-keys`): the secret
one goes to the other sites (their `--he-keys FILE`), only its public part to the coordinator
(`cmevlm federate --he-public FILE`). Every folder here is 0700 and every file holding a
private key or a secret context 0600. On Kubernetes each party turns its own kit into a Secret
(`--secrets DIR`), mounted where `federation.kit` points.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from cmevlm.config import RunConfig
from cmevlm.errors import ConfigError, MissingInput
from cmevlm.storage import join

ADMIN_ORG = "consortium"
ADMIN_ROLE = "lead"  # distributed provisioning's role that may submit jobs (sites' authorization lets only it)
# Secure aggregation's keys: one CKKS context for the consortium (FLARE's HEBuilder's defaults);
# each site's kit holds it with the secret key (client_context.tenseal), the coordinator's
# without (server_context.tenseal): it can add ciphertexts, never read them.
HE_PARAMS = {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40}
HE_CONTEXT = {"server": "server_context.tenseal", "client": "client_context.tenseal"}
SECRET_FILES = ("*.key", HE_CONTEXT["client"])


def admin_name(cfg: RunConfig) -> str:
    return f"admin@{cfg.federation.name}.local"


def org_of(site: str) -> str:
    """A site's organisation in its certificate (FLARE allows letters, digits and _ there)."""
    return "".join(ch if ch.isalnum() else "_" for ch in site)


def kits_dir(cfg: RunConfig) -> Path:
    f = cfg.federation
    return Path(f.kits if Path(f.kits).is_absolute() else join(cfg.workdir, f.kits))


def kit_of(cfg: RunConfig, participant: str) -> Path:
    """A participant's kit: federation.kit for this participant, else <kits>/<participant>."""
    f = cfg.federation
    if f.kit and participant in (f.site, f.server_host):
        return Path(f.kit)
    return kits_dir(cfg) / participant


def private_dir(path: Path) -> Path:
    """A folder only its owner can enter (0700, made so if it exists)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def lock_down(root: Path) -> None:
    """Every folder under `root` 0700, every private key and secret context 0600."""
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        d.chmod(0o700)
    for pattern in SECRET_FILES:
        for f in root.rglob(pattern):
            f.chmod(0o600)


def _nvflare(*args: str, cwd: Path) -> dict:
    """One `nvflare` command, its JSON answer's data (raises ConfigError with its message)."""
    run = subprocess.run([sys.executable, "-m", "nvflare.cli", "--format", "json", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "HOME": str(cwd)})  # its request/approval audit stays with the party
    lock_down(cwd)  # what it wrote (its audit folder too) stays the party's own
    try:
        out = json.loads(run.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        out = {}
    if run.returncode != 0 or out.get("status") != "ok":
        raise ConfigError(f"nvflare {args[0]} {args[1] if len(args) > 1 else ''} failed: {out.get('message') or run.stdout[-1500:]}"
                          f"{out.get('detail') or ''}{run.stderr[-1500:]}")
    return out.get("data") or {}


def profile(cfg: RunConfig) -> dict:
    """The consortium's project profile: its name, gRPC with mutual TLS, where the server listens."""
    f = cfg.federation
    return {"name": f.name, "scheme": "grpc", "connection_security": "mtls", "server": {"host": f.server_host, "fed_learn_port": f.port}}


def participant(cfg: RunConfig, name: str) -> dict:
    """The participant definition `nvflare cert request` takes: the server, a site or the admin."""
    f = cfg.federation
    if name == f.server_host:
        p = {"name": name, "type": "server", "org": ADMIN_ORG, "fed_learn_port": f.port}
    elif name == admin_name(cfg):
        p = {"name": name, "type": "admin", "org": ADMIN_ORG, "role": ADMIN_ROLE}
    elif name in f.sites:
        p = {"name": name, "type": "client", "org": org_of(name)}
    else:
        raise ConfigError(f"{name!r} is not a participant of {f.name} (federation.sites: {f.sites})")
    return {"name": f.name, "participants": [p]}


def init_ca(cfg: RunConfig) -> str:
    """The coordinator's root CA under <kits>/ca (kept when there); returns its fingerprint."""
    root = private_dir(kits_dir(cfg))
    (root / "profile.yaml").write_text(yaml.safe_dump(profile(cfg), sort_keys=False))
    if not (root / "ca" / "ca.json").exists():
        _nvflare("cert", "init", "--profile", str(root / "profile.yaml"), "-o", str(root / "ca"), cwd=root)
    lock_down(root / "ca")
    return fingerprint(cfg)


def fingerprint(cfg: RunConfig) -> str:
    """The root CA's SHA-256 fingerprint, which each site checks out of band before it packages."""
    return json.loads((kits_dir(cfg) / "ca" / "ca.json").read_text())["rootCA_fingerprint"]


def request(cfg: RunConfig, name: str) -> Path:
    """At the participant: its private key and CSR under <kits>/<name>.request (0700); returns
    the request zip to hand the coordinator (it holds no private key)."""
    root = private_dir(kits_dir(cfg))
    folder = root / f"{name}.request"
    zips = sorted(folder.glob("*.request.zip"))
    if not zips:
        (root / f"{name}.yaml").write_text(yaml.safe_dump(participant(cfg, name), sort_keys=False))
        _nvflare("cert", "request", "-p", str(root / f"{name}.yaml"), "--out", str(folder), cwd=root)
        zips = sorted(folder.glob("*.request.zip"))
    lock_down(folder)
    return zips[-1]


def approve(cfg: RunConfig, request_zip: Path) -> Path:
    """At the coordinator: sign a participant's request (only the consortium's own participants,
    by the names the request carries); returns the signed zip under <kits>/signed."""
    import zipfile

    with zipfile.ZipFile(request_zip) as z:
        site = yaml.safe_load(z.read("site.yaml"))
    name = site["participants"][0]["name"]
    if participant(cfg, name)["participants"][0]["type"] != site["participants"][0].get("type"):
        raise ConfigError(f"the request for {name!r} asks for type {site['participants'][0].get('type')!r}: refused")
    root = kits_dir(cfg)
    out = private_dir(root / "signed") / f"{name}.signed.zip"
    out.unlink(missing_ok=True)
    _nvflare("cert", "approve", str(Path(request_zip).resolve()), "-c", str(root / "ca"), "--profile", str(root / "profile.yaml"),
             "--out", str(out), cwd=root)
    return out


def package(cfg: RunConfig, name: str, signed_zip: Path, expected_fingerprint: str) -> Path:
    """At the participant: its kit from the signed zip and its own key (the root CA checked
    against the fingerprint it got out of band); returns the kit folder (kit_of)."""
    root = kits_dir(cfg)
    work = private_dir(root / f"{name}.package")
    _nvflare("package", str(Path(signed_zip).resolve()), "-w", str(work), "--request-dir", str(root / f"{name}.request"),
             "--fingerprint", expected_fingerprint, "--force", cwd=root)
    built = next(work.glob(f"*/prod_*/{name}"))
    kit = kit_of(cfg, name)
    if kit.exists():
        shutil.rmtree(kit)
    private_dir(kit.parent)
    shutil.move(str(built), str(kit))
    shutil.rmtree(work)
    lock_down(kit)
    return kit


def provision(cfg: RunConfig) -> Path:
    """The coordinator's part: the root CA and its own server and admin kits (each kept when
    there); returns the kits folder. Sites request, and package, their own."""
    fp = init_ca(cfg)
    for name in (cfg.federation.server_host, admin_name(cfg)):
        if not (kit_of(cfg, name) / "startup").is_dir():
            package(cfg, name, approve(cfg, request(cfg, name)), fp)
    return kits_dir(cfg)


def enroll(coord: RunConfig, site_cfgs: list[RunConfig]) -> None:
    """Every party's steps in order, each in its own folders (one machine: the demo and the
    tests): the coordinator's kits, then each site requests, the coordinator approves, the site
    packages; under secure aggregation the first site makes the CKKS keys and hands the secret
    one to the other sites and the public one to the coordinator."""
    provision(coord)
    fp = fingerprint(coord)
    for c in site_cfgs:
        if not (kit_of(c, c.federation.site) / "startup").is_dir():
            package(c, c.federation.site, approve(coord, request(c, c.federation.site)), fp)
    if coord.federation.secure_aggregation and not (kit_of(coord, coord.federation.server_host) / "startup" / HE_CONTEXT["server"]).exists():
        secret, public = he_keys(site_cfgs[0])
        for c in site_cfgs[1:]:
            he_keys(c, secret)
        he_public(coord, public)
        for c in site_cfgs:
            he_signature(c, sign_site(coord, digests_file(c)))


def he_keys(cfg: RunConfig, shared: Path | None = None) -> tuple[Path, Path]:
    """At a site: the consortium's CKKS context into its kit, made here (`shared` None) or the
    secret one another site made, and the digests of its kit for the root CA to sign
    (digests_file); returns (the secret context, for the other sites only; the public one, for
    the coordinator)."""
    import tenseal as ts

    startup = kit_of(cfg, cfg.federation.site) / "startup"
    if not startup.is_dir():
        raise MissingInput(f"site {cfg.federation.site}: package its kit before its encryption keys")
    if shared is not None:
        context = ts.context_from(Path(shared).read_bytes())
        if not context.is_private():
            raise ConfigError(f"{shared} holds no secret key: a site needs the consortium's secret context")
    else:
        context = new_context()
    secret, public = startup / HE_CONTEXT["client"], kits_dir(cfg) / HE_CONTEXT["server"]
    secret.write_bytes(context.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=True))
    public.write_bytes(context.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=True))
    digests_file(cfg).write_text(json.dumps({"site": cfg.federation.site, "files": startup_digests(startup)}))
    lock_down(kits_dir(cfg))
    return secret, public


def new_context():
    """The consortium's CKKS context, as FLARE's HEBuilder makes it (its defaults, HE_PARAMS)."""
    import tenseal as ts

    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=HE_PARAMS["poly_modulus_degree"],
                         coeff_mod_bit_sizes=HE_PARAMS["coeff_mod_bit_sizes"], encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    context.generate_relin_keys()
    context.global_scale = 2 ** HE_PARAMS["scale_bits"]
    return context


def digests_file(cfg: RunConfig) -> Path:
    """Where a site keeps its kit's digests for the coordinator to sign."""
    return kits_dir(cfg) / f"{cfg.federation.site}.digests.json"


def he_public(cfg: RunConfig, public: Path) -> Path:
    """At the coordinator: the consortium's public CKKS context into its server kit (one with
    a secret key in it is refused: the coordinator must not be able to decrypt), and its kit
    signed by the root CA (FLARE loads a context only from a signed kit)."""
    import tenseal as ts

    data = Path(public).read_bytes()
    if ts.context_from(data).is_private():
        raise ConfigError(f"{public} holds a secret key: the coordinator takes only the public context")
    startup = kit_of(cfg, cfg.federation.server_host) / "startup"
    (startup / HE_CONTEXT["server"]).write_bytes(data)
    signed = {f: sign_digest(cfg, sha) for f, sha in startup_digests(startup).items()}
    (startup / "signature.json").write_text(json.dumps(signed))
    return startup / HE_CONTEXT["server"]


def startup_digests(startup: Path) -> dict:
    """{file: SHA-256} of a kit's startup files: what the root CA signs for FLARE's signed-kit
    check (a digest says nothing of a key or a context it is taken of)."""
    import hashlib

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(startup.iterdir())
            if f.is_file() and f.name != "signature.json"}


def sign_digest(cfg: RunConfig, sha256_hex: str) -> str:
    """The root CA's signature (RSA-PSS over SHA-256, as FLARE verifies a kit's files) of a
    file known only by its SHA-256, base64."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    digest = bytes.fromhex(sha256_hex)
    if len(digest) != 32:
        raise ConfigError(f"{sha256_hex!r} is not a SHA-256")
    key = serialization.load_pem_private_key((kits_dir(cfg) / "ca" / "rootCA.key").read_bytes(), password=None)
    sig = key.sign(digest, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH), utils.Prehashed(hashes.SHA256()))
    return base64.b64encode(sig).decode()


def sign_site(cfg: RunConfig, digests_file: Path) -> Path:
    """At the coordinator: sign a site's kit from its digests (`cmevlm site --he-keys` writes
    them); returns the signature file to return to that site."""
    doc = json.loads(Path(digests_file).read_text())
    name = doc["site"]
    if name not in cfg.federation.sites:
        raise ConfigError(f"{name!r} is not a site of {cfg.federation.name}: not signed")
    out = private_dir(kits_dir(cfg) / "signed") / f"{name}.signature.json"
    out.write_text(json.dumps({f: sign_digest(cfg, sha) for f, sha in doc["files"].items()}))
    return out


def he_signature(cfg: RunConfig, signature_file: Path) -> Path:
    """At a site: install the root CA's signatures of its kit, each verified first against this
    site's own file and its kit's root CA."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    startup = kit_of(cfg, cfg.federation.site) / "startup"
    signed = json.loads(Path(signature_file).read_text())
    ca = x509.load_pem_x509_certificate((startup / "rootCA.pem").read_bytes()).public_key()
    if set(signed) != set(startup_digests(startup)):
        raise ConfigError(f"{signature_file} signs other files than this site's kit holds: refused")
    for name, sig in signed.items():
        try:
            ca.verify(base64.b64decode(sig), (startup / name).read_bytes(),
                      padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256())
        except (InvalidSignature, ValueError):
            raise ConfigError(f"{signature_file}: the signature of {name} does not verify: refused") from None
    (startup / "signature.json").write_text(json.dumps(signed))
    lock_down(startup)
    return startup / "signature.json"


def require_kit(path: Path, what: str) -> Path:
    if not (path / "startup").is_dir():
        raise MissingInput(f"{what}: no startup kit at {path} (the coordinator: `cmevlm federate --provision`; a site: `cmevlm "
                           "site --request`, then `--package` with the coordinator's signed zip; or mount its Secret there)")
    return path


def secret_manifest(kit: Path, name: str, namespace: str | None = None) -> dict:
    """A Kubernetes Secret holding a kit's startup/ files (the chart mounts it as the kit)."""
    files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in sorted((kit / "startup").iterdir()) if p.is_file()}
    meta = {"name": name, "labels": {"app.kubernetes.io/part-of": "cmevlm", "cmevlm/federation-kit": kit.name}}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta, "data": files}


def own_kits(cfg: RunConfig) -> list[str]:
    """The participants whose kits this party holds: a site its own, the coordinator its server and admin."""
    f = cfg.federation
    return [f.site] if f.site else [f.server_host, admin_name(cfg)]


def write_secrets(cfg: RunConfig, out: str) -> str:
    """One Secret manifest (cmevlm-kit-<participant>) per kit this party holds, into `out`
    (0700, each file 0600); returns the folder."""
    folder = private_dir(Path(out))
    for participant_name in own_kits(cfg):
        kit = require_kit(kit_of(cfg, participant_name), participant_name)
        name = "cmevlm-kit-" + participant_name.replace("@", "-at-").replace(".", "-").replace("_", "-").lower()
        path = folder / f"{name}.yaml"
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(yaml.safe_dump(secret_manifest(kit, name), sort_keys=False))
    return str(folder)


def coordinator_steps(cfg: RunConfig, provision_kits: bool, approve_zips: list[str], public_context: str | None,
                      sign_digests: list[str], secrets: str | None) -> list[str]:
    """`cmevlm federate --provision / --approve / --he-public / --secrets`: the coordinator's
    enrolment steps asked for, in order; returns what to tell the operator."""
    said = []
    if provision_kits:
        provision(cfg)
        said.append(f"coordinator kits in {kits_dir(cfg)}; root CA fingerprint (give it to every site, out of band): {fingerprint(cfg)}")
    for z in approve_zips:
        said.append(f"signed: {approve(cfg, Path(z))} (return it to the site)")
    if public_context:
        said.append(f"public encryption context: {he_public(cfg, Path(public_context))} (the kit signed)")
    for d in sign_digests:
        said.append(f"signed: {sign_site(cfg, Path(d))} (return it to the site)")
    if secrets:
        said.append(f"Kubernetes Secrets: {write_secrets(cfg, secrets)}")
    return said


def site_steps(cfg: RunConfig, make_request: bool, signed: str | None, expected_fingerprint: str | None,
               he: str | None, he_sig: str | None, secrets: str | None) -> list[str]:
    """`cmevlm site --request / --package / --he-keys / --secrets`: this site's enrolment steps
    asked for, in order; returns what to tell the operator."""
    site, said = cfg.federation.site, []
    if not site:
        raise ConfigError("federation.site is not set: name this site (one of the consortium's federation.sites)")
    if make_request:
        said.append(f"request: {request(cfg, site)} (send it to the coordinator; the private key stays in {kits_dir(cfg)})")
    if signed:
        if not expected_fingerprint:
            raise ConfigError("--package needs --fingerprint: the root CA's fingerprint the coordinator gave out of band")
        said.append(f"kit: {package(cfg, site, Path(signed), expected_fingerprint)}")
    if he is not None:
        secret, public = he_keys(cfg, Path(he) if he else None)
        said.append(f"encryption keys in {secret}; for the coordinator: {public} and {digests_file(cfg)} (digests to sign)"
                    + ("" if he else f"; give {secret} to the other sites only, never to the coordinator"))
    if he_sig:
        said.append(f"encryption context signature installed: {he_signature(cfg, Path(he_sig))}")
    if secrets:
        said.append(f"Kubernetes Secret: {write_secrets(cfg, secrets)}")
    return said
