"""The `cmevlm` command: one subcommand per stage or tool, each a thin call into the library.

    cmevlm --help
    cmevlm synth --out data/synth --procedures 12
    cmevlm tiny-model --out runs/demo/models/base
    cmevlm config --set data.image_size=224          # print the resolved run config
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from cmevlm import stages
from cmevlm.cluster import apply_env_defaults
from cmevlm.errors import MissingInput
from cmevlm.pipeline import STAGES, StageFailed

log = logging.getLogger("cmevlm")

PLAN_DOES_NOT_FIT = 3


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", default=None, help="run config YAML (default: configs/demo.yaml)")
    p.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
        help="override a config key; VALUE is YAML (repeatable), e.g. --set data.image_size=224",
    )


def _load(args):
    from cmevlm.config import load_config

    return load_config(args.config, args.overrides)


# ---------------------------------------------------------------------------------------------
# Subcommands


def cmd_config(args) -> int:
    from cmevlm.config import dump_config

    print(dump_config(_load(args)), end="")
    return 0


def cmd_plan(args) -> int:
    """Exit 0 when every stage fits its pool, 3 when one does not."""
    from cmevlm import plan
    from cmevlm.config import RunConfig, absolute_paths

    values = plan.merged_values(args.values) if args.values else None
    if values and not args.config:  # the run config the chart would mount, with --set on top
        from cmevlm.config import ConfigError, apply_override, parse_override

        data = values["runConfig"]
        for text in args.overrides:
            apply_override(data, *parse_override(text))
        try:
            cfg = absolute_paths(RunConfig.model_validate(data))
        except ValueError as e:
            raise ConfigError(f"runConfig of {args.values}: {e}") from None
    else:
        cfg = _load(args)
    result = plan.make_plan(cfg, values=values)
    print(json.dumps(result, indent=2) if args.json else plan.render(result))
    return 0 if result["fits"] else PLAN_DOES_NOT_FIT


def _check_plan(cfg, args, stages) -> int:
    """Before cluster time is spent: 0 when the plan fits (or --no-plan, or no model config
    to plan from yet, which is said), else PLAN_DOES_NOT_FIT after printing why."""
    from cmevlm import plan

    if args.no_plan:
        return 0
    values = plan.merged_values(*args.values) if getattr(args, "values", None) else None
    try:
        result = plan.make_plan(cfg, stages, values=values)
    except plan.PlanError as e:
        print(f"cmevlm {args.command}: plan skipped: {e}", file=sys.stderr)
        return 0
    if result["fits"]:
        return 0
    print(plan.render(result), file=sys.stderr)
    print(f"cmevlm {args.command}: refused: the plan does not fit (fix it, or --no-plan to run anyway)", file=sys.stderr)
    return PLAN_DOES_NOT_FIT


def cmd_synth(args) -> int:
    from tqdm import tqdm

    from cmevlm.data.synth import write_dataset

    total = args.procedures * args.frames_per_procedure
    with tqdm(total=total, desc="synth", unit="frame", disable=args.quiet) as bar:
        counts = write_dataset(
            args.out, procedures=args.procedures, frames_per_procedure=args.frames_per_procedure,
            sites=args.sites, seed=args.seed, progress=lambda: bar.update(1),
        )
    log.info("wrote %(procedures)d procedures, %(frames)d frames, %(masks)d masks", counts)
    print(f"{args.out}: {counts['procedures']} procedures, {counts['frames']} frames, {counts['masks']} masks")
    return 0


def cmd_tiny_model(args) -> int:
    from cmevlm.model.tiny import build_tiny_model

    corpus = Path(args.corpus).read_text().splitlines() if args.corpus else None
    like = json.loads(Path(args.like).read_text()) if args.like else None
    cap = args.max_image_tokens * 28 * 28 if args.max_image_tokens else None
    out = build_tiny_model(args.out, seed=args.seed, corpus=corpus, max_pixels=cap, like=like,
                           **({"layers": args.layers, "vision_depth": args.vision_depth} if like else {}))
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    what = f"random Qwen2.5-VL with the widths of {args.like}, {args.layers} + {args.vision_depth} layers" if like else "tiny Qwen2.5-VL"
    tokens = f"at most {args.max_image_tokens} image tokens" if cap else "image tokens from the image size, as the real model"
    print(f"{out}: {what}, laid out as Qwen2.5-VL-7B-Instruct, {tokens}, {size / 1e6:.1f} MB")
    return 0


def cmd_stage(args) -> int:
    """Any pipeline stage: run it (or skip it when complete) and say what it produced."""
    st = stages.get(args.command)
    if getattr(args, "estimate", False):
        return _estimate(args.command, _load(args))
    m = st.run(_load(args), force=args.force)
    print(f"{args.command}: {st.summary(m)}{' (skipped: already complete)' if m.get('skipped') else ''}")
    if getattr(args, "strict", False) and m.get("quarantined"):
        print(f"{args.command}: --strict and items were quarantined: see the workdir's quarantine/", file=sys.stderr)
        return 1
    return 0


def _estimate(stage: str, cfg) -> int:
    """`--estimate`: what the stage's LLM requests would cost; nothing is sent."""
    import importlib

    from cmevlm.teacher.pool import estimate_text

    print(estimate_text(importlib.import_module(stages.get(stage).module).estimate(cfg)))
    return 0


def cmd_evaluate(args) -> int:
    from cmevlm.evaluate import evaluation, expert, report

    cfg = _load(args)
    if args.estimate:
        return _estimate("evaluate", cfg)
    if args.import_expert_sheet:
        result = expert.import_sheet(cfg, args.import_expert_sheet)
        for m, v in result.items():
            print(f"expert: {m}: score {v['score']['mean']} ± {v['score']['std']} (n={v['n']}), preferred {v['preferred']}")
        return 0
    if args.allow_missing:
        cfg.evaluate.allow_missing = True
    m = evaluation.run(cfg, force=args.force)
    print(report.summary_text(m))
    print(report.tests_text(m))
    if report.sampled_text(m):
        print(report.sampled_text(m))
    if report.left_out_text(m):
        print(report.left_out_text(m))
    print(f"report: {cfg.workdir}/eval/report.html")
    if args.export_expert_sheet:
        s = expert.export_sheet(cfg)
        print(f"expert sheet: {s['items']} items -> {cfg.workdir}/{expert.SHEET} (key kept in eval/expert_key.json)")
    return 0


def cmd_serve(args) -> int:
    from cmevlm.serve import app
    from cmevlm.serve.requests import check_bind
    from cmevlm.storage import Storage, stage_uri

    cfg = _load(args)
    check_bind(cfg)  # a non-loopback bind without keys: a message, exit 2
    model = stage_uri(cfg, cfg.serve.model)
    st = Storage(cfg.storage)
    if not any(st.exists(model.rstrip("/") + "/" + f) for f in ("config.json", "adapter_config.json")):
        raise MissingInput(f"no model to serve at {model} (set serve.model)")
    print(f"serving {model} on http://{cfg.serve.host}:{args.port or cfg.serve.port} (Ctrl-C stops)", flush=True)
    app.run(cfg, port=args.port)
    return 0


def cmd_review(args) -> int:
    from cmevlm.review import app

    cfg = _load(args)
    token = app.resolve_token(args.host, args.token)
    app.answered_hosts(args.host, tuple(args.allowed_host))  # refuses 0.0.0.0 without names before anything starts
    print(f"reviewing {cfg.workdir} on http://{args.host}:{args.port}/{' (token required)' if token else ''} (Ctrl-C stops)", flush=True)
    app.run(cfg, host=args.host, port=args.port, token=token, config_args=f" --config {args.config}" if args.config else "",
            idle_minutes=args.idle_minutes, https=args.https, allowed_hosts=tuple(args.allowed_host),
            trusted_proxies=tuple(args.trusted_proxy))
    return 0


def cmd_submit(args) -> int:
    import yaml

    from cmevlm import k8s

    cfg = _load(args)
    if refused := _check_plan(cfg, args, STAGES if args.target == "pipeline" else (args.target,)):
        return refused
    try:
        if args.dry_run:
            print(yaml.safe_dump_all(k8s.render(args.target, cfg, args.namespace, tuple(args.values)), sort_keys=False), end="")
            return 0
        job = k8s.submit(args.target, cfg, args.namespace, host=args.api_server, values_files=tuple(args.values))
        name = job["metadata"]["name"]
        print(f"created RayJob {name} in {args.namespace} (kubectl get rayjob {name} -n {args.namespace})")
        if args.wait:
            final = k8s.wait(name, args.namespace, host=args.api_server, poll_s=args.poll)
            return 0 if final == "SUCCEEDED" else 1
    except k8s.SubmitError as e:
        print(f"cmevlm submit: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    from cmevlm import demo

    cfg = _load(args)
    if args.consortium:
        return consortium_demo(cfg, args.workdir or "runs/consortium")
    if args.workdir:
        from cmevlm.config import absolute_uri

        cfg = demo.rebase(cfg, absolute_uri(args.workdir))
    t0 = time.time()
    try:
        summary = demo.run(cfg, procedures=args.procedures, frames_per_procedure=args.frames_per_procedure)
    except StageFailed as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    print(f"\nTable 1 ({summary['metrics']['n_test']} held-out test items from unseen procedures), greedy:\n{summary['table']}")
    if summary.get("sampled"):
        print(f"\n{summary['sampled']}")
    print(f"\ndemo: done in {time.time() - t0:.0f} s; report: {cfg.workdir}/eval/report.html")
    r = summary["review"]
    where = f" --set workdir={cfg.workdir}" if args.workdir else ""
    print(f"expert review: {r['answers']} flagged answers, {r['preferences']} flagged preference pairs and {r['expert']} "
          f"blinded expert items wait in `cmevlm review{where}` (http://127.0.0.1:8090/)")
    return 0


def consortium_demo(cfg, workdir: str) -> int:
    from cmevlm.federation import demo, report

    summary = demo.run(cfg, workdir)
    print(f"\n{report.table_text(summary)}\n\nconsortium demo: done in {summary['timings_s']['total']:.0f} s; "
          f"report: {workdir}/consortium/report.html")
    for name, ok in summary["targets"].items():
        print(f"  {'met' if ok else 'NOT met'}: {name}")
    return 0 if all(summary["targets"].values()) else 4


def cmd_federate(args) -> int:
    from cmevlm.config import absolute_paths
    from cmevlm.federation import coordinator, kits

    cfg = absolute_paths(_load(args))
    if args.provision or args.approve or args.he_public or args.sign or args.secrets:
        print("\n".join(kits.coordinator_steps(cfg, args.provision, args.approve, args.he_public, args.sign, args.secrets)))
        return 0
    if args.server:  # the coordinator's Deployment: FLARE's server in the foreground
        server = coordinator.serve(cfg, coordinator.server_kit(cfg))  # no model loaded: the server only needs its kit
        print(f"federation server listening on {cfg.federation.server_host}:{cfg.federation.port} (mutual TLS)", flush=True)
        return server.wait()
    from cmevlm.federation.state import OUTPUT

    if args.submit:  # the jobs to a running server (a Kubernetes Job, or an admin's machine)
        summary = coordinator.submit_all(cfg)
    else:
        summary = coordinator.run(cfg)
    for phase in summary["phases"]:
        n = len({r["round"] for r in summary["rounds"] if r["phase"] == phase})
        print(f"federate {phase}: {n} rounds; consortium model: {cfg.workdir}/{OUTPUT[phase]}")
    print(f"federate: {summary['seconds']:.0f} s")
    return 0


def cmd_site(args) -> int:
    from cmevlm.config import absolute_paths
    from cmevlm.federation import kits, site

    cfg = absolute_paths(_load(args))
    if args.request or args.package or args.he_keys is not None or args.he_signature or args.secrets:
        print("\n".join(kits.site_steps(cfg, args.request, args.package, args.fingerprint, args.he_keys, args.he_signature, args.secrets)))
        return 0
    return site.run(cfg, once=args.once)


def cmd_pipeline(args) -> int:
    from cmevlm import pipeline

    cfg = _load(args)
    chosen = STAGES[STAGES.index(args.start): STAGES.index(args.stop) + 1]
    if refused := _check_plan(cfg, args, tuple(chosen)):
        return refused
    t0 = time.time()
    try:
        results = pipeline.run(cfg, start=args.start, stop=args.stop)
    except StageFailed as e:
        print(f"pipeline: {e}", file=sys.stderr)
        return 1
    ran = [r.stage for r in results if not r.skipped]
    print(f"pipeline: {len(results)} stages ({', '.join(ran) or 'all skipped'} ran) in {time.time() - t0:.0f} s; workdir {cfg.workdir}")
    return 0


# ---------------------------------------------------------------------------------------------


def _stage(sub, name: str, func, help: str, description: str, force: str | None = None) -> argparse.ArgumentParser:
    """A stage subcommand: --config/--set, and --force when the stage can be rebuilt."""
    p = sub.add_parser(name, help=help, description=description)
    _config_args(p)
    if force:
        p.add_argument("--force", action="store_true", help=force)
    p.set_defaults(func=func)
    return p


def _no_plan_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-plan", action="store_true",
                   help="skip the memory plan that otherwise refuses a config whose stages do not fit their GPUs (exit 3)")


def _tool_commands(sub) -> None:
    """config, plan, synth, tiny-model: tools that run no stage."""
    p = sub.add_parser("config", help="print the resolved run config (YAML) after --set overrides",
                       description="Load a run config, apply --set overrides, validate, and print it.")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("plan", help="will each stage fit its GPUs? parameters and memory per worker, before any cluster time",
                       description="Count the model's parameters exactly from its config.json on the meta device (model.config_json, "
                       "default <model.base>/config.json; no weights needed) and estimate the memory of every GPU stage per worker: "
                       "weights, gradients, optimiser states under ZeRO and offload, DPO's reference, activations with or without "
                       "gradient checkpointing, KV cache; and the export task's host memory. Each is checked against its pool "
                       "(plan.pools, plan.stage_pools). Exit 0 when everything fits, 3 when a stage does not (with the fixes). "
                       "cmevlm pipeline and cmevlm submit run the same plan first. Formulas: docs/plan.md.")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--values", metavar="FILE", default=None,
                   help="a site's Helm values: also check the chart's pods (head memory, the export task, GPUs and host "
                   "memory of the pools); its runConfig is the run config unless --config is given")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("synth", help="write a synthetic CME dataset (frames, masks, procedures.csv)",
                       description="Write synthetic laparoscopic CME frames with masks of the five structures, "
                       "in the cmevlm source layout. Deterministic per seed.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--procedures", type=int, default=12, help="number of procedures (default 12)")
    p.add_argument("--frames-per-procedure", type=int, default=30, help="frames per procedure (default 30)")
    p.add_argument("--sites", type=int, default=2, help="number of sites the procedures are spread over (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same bytes (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("tiny-model", help="build a tiny random Qwen2.5-VL with a locally trained tokenizer",
                       description="Build a few-MB random-weight Qwen2.5-VL (same architecture as the real one), "
                       "a byte-level BPE tokenizer trained on CME text, saved with every file of the real "
                       "Qwen2.5-VL-7B-Instruct repository split the same way (chat templates, generation and preprocessor "
                       "settings, sharded weights). For tests and the offline demo.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    p.add_argument("--corpus", default=None, help="extra text file (one line each) to train the tokenizer on")
    p.add_argument("--max-image-tokens", type=int, default=None,
                   help="cap image tokens per image (max_pixels; default: the real model's cap, so data.image_size decides: "
                   "168 px -> 36)")
    p.add_argument("--like", metavar="CONFIG_JSON", default=None,
                   help="a real config.json (e.g. configs/models/qwen2.5-vl-7b-instruct.json): its widths and vocabulary, "
                   "random bf16 weights, fewer layers (real size on CPU)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers with --like (default 2)")
    p.add_argument("--vision-depth", type=int, default=2, help="vision blocks with --like (default 2)")
    p.set_defaults(func=cmd_tiny_model)



def _stage_commands(sub) -> None:
    """One subcommand per stage of the registry, with the extra flags of ingest and evaluate."""
    for stage in STAGES:
        st = stages.get(stage)
        p = _stage(sub, stage, cmd_evaluate if stage == "evaluate" else cmd_stage, st.help, st.description, force=st.force)
        if stage == "ingest":
            p.add_argument("--strict", action="store_true", help="exit 1 when anything was quarantined")
        if st.calls_teacher:
            p.add_argument("--estimate", action="store_true",
                           help="print the requests, input/output/thinking tokens and cost this stage would send; send nothing")
        if stage == "evaluate":
            p.add_argument("--export-expert-sheet", action="store_true", help="also write eval/expert_sheet.{csv,html} for a surgeon")
            p.add_argument("--import-expert-sheet", metavar="FILE", help="validate a filled expert sheet and merge it into the report")
            p.add_argument("--allow-missing", action="store_true",
                           help="write the report even when a model of the previous report is missing now (the report names it)")



def _service_commands(sub) -> None:
    """serve and review: the long-running apps."""
    p = sub.add_parser("serve", help="serve a model with Ray Serve: OpenAI-compatible chat, /v1/explain, metrics",
                       description="Deploy serve.model (default <workdir>/models/dpo) on Ray Serve with dynamic batching and "
                       "autoscaling: POST /v1/chat/completions (OpenAI format, base64 images only, stream), POST /v1/explain "
                       "(frame + mask -> composite -> answer), GET /v1/models, /healthz, /metrics. Binds 127.0.0.1 by default.")
    _config_args(p)
    p.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port, 8000)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("review", help="the expert review web app: answers, preference pairs, blinded expert scores",
                       description="A local web app for the surgeon: the answers flagged by teach (accept / edit / reject), "
                       "the pairs flagged by prefer (accept / swap / reject) and the blinded expert sheet (1-5 scores, "
                       "preferred answers). Each click is appended to teacher/reviews.jsonl, preferences/reviews.jsonl or "
                       "eval/expert_reviews.jsonl at once; rerun teach / prefer to apply them. Binds 127.0.0.1 by default; "
                       "any other address needs a token (--token or CMEVLM_REVIEW_TOKEN).")
    _config_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8090, help="HTTP port (default 8090)")
    p.add_argument("--token", default=None, help="access token asked at sign-in (default $CMEVLM_REVIEW_TOKEN); required off "
                   "127.0.0.1, at least 16 characters")
    p.add_argument("--idle-minutes", type=float, default=30, help="a session unused this long ends (default 30)")
    p.add_argument("--https", action="store_true", help="the app is reached over HTTPS (e.g. behind the hospital's proxy): Secure cookies")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name the app answers to besides the bound address (the proxy's or DNS name; repeatable); "
                   "any other Host gets 421 (no DNS rebinding)")
    p.add_argument("--trusted-proxy", action="append", default=[], metavar="IP",
                   help="the proxy whose X-Forwarded-For is believed (repeatable); from anyone else it is ignored")
    p.set_defaults(func=cmd_review)


def _federation_commands(sub) -> None:
    """federate, site: the consortium on NVIDIA FLARE."""
    p = sub.add_parser("federate", help="the consortium's coordinator: FedAvg rounds of the sites' SFT, then DPO, on NVIDIA FLARE",
                       description="Start NVIDIA FLARE's server from the coordinator's startup kit (gRPC, mutual TLS), submit a "
                       "FedAvg job over federation.sites (federation.rounds rounds of federation.local_steps local SFT steps, "
                       "weighted by example counts, then a distribution round in which each site evaluates and keeps the model), "
                       "then, with federation.dpo_rounds, a DPO job from that model (each site samples and prefers on its own "
                       "data first), and write <workdir>/models/federated, models/federated-dpo and consortium/federation.json. The "
                       "coordinator's own kits are provisioned under federation.kits when missing (unless federation.kit points at "
                       "a mounted one); sites make their own keys (`cmevlm site --request`).")
    _config_args(p)
    p.add_argument("--provision", action="store_true", help="only make the root CA and the coordinator's own server and admin kits, "
                   "print the CA's fingerprint, and exit")
    p.add_argument("--approve", nargs="+", default=[], metavar="REQUEST_ZIP", help="sign sites' certificate requests "
                   "(`cmevlm site --request`): signed zips under federation.kits/signed, to return to each site")
    p.add_argument("--he-public", metavar="FILE", default=None, help="install the consortium's public CKKS context (secure "
                   "aggregation; one with a secret key is refused), signed by the root CA")
    p.add_argument("--sign", nargs="+", default=[], metavar="DIGESTS", help="secure aggregation: sign sites' kits from their "
                   "digests (`cmevlm site --he-keys` writes them; the coordinator never sees the files)")
    p.add_argument("--secrets", metavar="DIR", default=None, help="write the coordinator's own kits as Kubernetes Secret manifests into DIR")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--server", action="store_true", help="only run FLARE's server in the foreground (the chart's coordinator Deployment)")
    mode.add_argument("--submit", action="store_true", help="only submit the jobs (SFT, then DPO) to a running server with the admin kit, wait, and write the outputs")
    p.set_defaults(func=cmd_federate)

    p = sub.add_parser("site", help="one hospital of the consortium: its ingest and teach, then NVIDIA FLARE's client",
                       description="Run this site's ingest and teach (skipped when complete), then NVIDIA FLARE's client from "
                       "federation.kit (default <federation.kits>/<federation.site>), which trains the consortium's rounds on "
                       "this site's data through its own Ray cluster and sends only trainable parameters and counts, each "
                       "recorded in <workdir>/federation/audit.jsonl before it leaves.")
    _config_args(p)
    p.add_argument("--once", action="store_true", help="stop after this site has kept the consortium's last model (after DPO with federation.dpo_rounds)")
    p.add_argument("--request", action="store_true", help="make this site's private key (kept here, 0600) and a certificate "
                   "request zip for the coordinator, and exit")
    p.add_argument("--package", metavar="SIGNED_ZIP", default=None, help="build this site's kit from the coordinator's signed zip "
                   "and its own key (with --fingerprint), and exit")
    p.add_argument("--fingerprint", default=None, help="the root CA's SHA-256 fingerprint, as the coordinator gave it out of band")
    p.add_argument("--he-keys", nargs="?", const="", default=None, metavar="SECRET_CONTEXT", help="secure aggregation: make the "
                   "consortium's CKKS keys here (no FILE; one site does), or install the secret context another site made (FILE)")
    p.add_argument("--he-signature", metavar="FILE", default=None, help="install the root CA's signatures of this site's kit "
                   "(the coordinator's <site>.signature.json; each checked against this site's files)")
    p.add_argument("--secrets", metavar="DIR", default=None, help="write this site's own kit as a Kubernetes Secret manifest into DIR")
    p.set_defaults(func=cmd_site)


def _run_commands(sub) -> None:
    """submit, demo, pipeline: the whole method, here or on a cluster."""
    p = sub.add_parser("submit", help="submit the pipeline (or one stage) as a KubeRay RayJob, rendered by the chart",
                       description="Render helm/cmevlm for this run (the run config, the pipeline or one stage enabled) and "
                       "create what it renders through the Kubernetes API (kubeconfig or in-cluster): ConfigMap, the "
                       "autoscaler's ServiceAccount and Role, NetworkPolicies, RayJob. --wait follows status.jobStatus until "
                       "the job ends. The memory plan runs first and refuses a run that does not fit (exit 3).")
    p.add_argument("target", choices=("pipeline", *STAGES), help="pipeline (every stage in order) or one stage")
    _config_args(p)
    p.add_argument("--values", "-f", action="append", default=[], metavar="FILE",
                   help="the site's chart values (image, pools, network), as for helm install (repeatable)")
    p.add_argument("--namespace", "-n", default="default", help="Kubernetes namespace (default: default)")
    p.add_argument("--dry-run", action="store_true", help="print the objects as YAML; create nothing")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends; exit 1 unless it SUCCEEDED")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between status polls with --wait")
    p.add_argument("--api-server", default=None, help="API server URL instead of kubeconfig (e.g. through kubectl proxy)")
    _no_plan_arg(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("demo", help="run the whole method offline on a laptop (what `make demo` runs)",
                       description="Synthetic data, a tiny Qwen2.5-VL, then every pipeline stage with the demo "
                       "config: local Ray, local disk, offline teacher. Completed steps are skipped.")
    _config_args(p)
    p.add_argument("--workdir", default=None, help="where the demo writes (default: the config's workdir, runs/demo)")
    p.add_argument("--procedures", type=int, default=24, help="synthetic procedures (default 24)")
    p.add_argument("--frames-per-procedure", type=int, default=30, help="synthetic frames per procedure (default 30)")
    p.add_argument("--consortium", action="store_true",
                   help="three synthetic hospitals that see different data: a local-only model each and the federated one "
                   "(NVIDIA FLARE, separate processes, mutual TLS), all evaluated on every site's test set; writes "
                   "<workdir>/consortium/report.json and report.html (default workdir runs/consortium); exit 4 when a target is missed")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pipeline", help="run the stages in order (ingest ... evaluate), skipping completed ones",
                       description="Run ingest, teach, sft, sample, prefer, dpo and evaluate in order on the Ray given by "
                       "ray.address (a local Ray when empty). Completed stages are skipped, an interrupted one resumes; "
                       "one line per stage, and a failing stage is named (exit 1).")
    _config_args(p)
    p.add_argument("--from", dest="start", choices=STAGES, default=STAGES[0], help="first stage to run (default ingest)")
    p.add_argument("--to", dest="stop", choices=STAGES, default=STAGES[-1], help="last stage to run (default evaluate)")
    _no_plan_arg(p)
    p.set_defaults(func=cmd_pipeline)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmevlm",
        description="Train a local surgical vision-language model for Complete Mesocolic Excision: "
        "a cloud teacher that sees only text and binary masks, SFT and DPO of Qwen2.5-VL on Ray, "
        "evaluation, and serving inside the hospital.",
        epilog="Every stage takes --config FILE and repeatable --set KEY=VALUE. `cmevlm SUBCOMMAND --help` for details.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    for add in (_tool_commands, _stage_commands, _service_commands, _run_commands, _federation_commands):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_env_defaults()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    from cmevlm.errors import CmevlmError

    try:
        return args.func(args) or 0
    except CmevlmError as e:  # the user's to fix: a message; anything else is a bug and shows as one
        if args.verbose:
            raise
        print(f"cmevlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
