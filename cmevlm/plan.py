"""`cmevlm plan`: will every stage fit the GPUs it runs on? Answered before any cluster time.

    cmevlm plan --config configs/cluster.example.yaml [--set sft.num_workers=4] [--json]

Parameters are counted exactly: the model is built from its `config.json` on PyTorch's meta
device (shapes, no memory, no weights). Memory per GPU worker is then the sum of named parts,
each a formula of the config (docs/plan.md derives them and compares them with DeepSpeed's own
estimators and published fine-tuning figures):

- training (sft, dpo): weights, gradients, optimiser states under the ZeRO stage and offload,
  DPO's frozen reference, activations of one micro-batch (image tokens at `data.image_size`
  plus text) with or without gradient checkpointing, the logits;
- inference (sample, evaluate, serve): weights in the stage's dtype, the KV cache of a batch,
  the prefill working set;
- the export task's host memory (it streams, see cmevlm.train.export).

A stage that does not fit names the shortfall and the single changes that would make it fit.
With the chart's values (`--values`) the plan also checks the pods, and whether Ray can place
every stage's requests on them at all (cmevlm.placement, docs/placement.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cmevlm.config import RunConfig
from cmevlm.errors import ConfigError
from cmevlm.train.freeze import COMPONENTS, component, trainable

GiB = 2**30
TRAIN_STAGES = ("sft", "dpo")
INFER_STAGES = ("sample", "evaluate", "serve")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The export task: a Python process with torch imported (~0.5 GiB) plus two 64 MiB chunks.
EXPORT_PROCESS_GIB = 0.6
REPO = Path(__file__).resolve().parent.parent


class PlanError(ConfigError):
    """The model's config cannot be read, or the plan's pools do not name a stage's pool."""


# ---------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class Shape:
    """What memory depends on, from the model's config.json."""

    params: dict[str, int]  # vision, merger, lm (exact, meta device)
    largest: int  # the largest single parameter tensor (ZeRO-3 gathers one at a time)
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # key/value heads x head dim
    vocab: int
    v_hidden: int
    v_intermediate: int
    v_depth: int
    patch: int
    merge: int

    @property
    def total(self) -> int:
        return sum(self.params.values())


def config_path(cfg: RunConfig) -> str:
    """model.config_json, else <model.base>/config.json; a relative path that is not under the
    current directory is looked up in this repository (configs/models/...)."""
    path = cfg.model.config_json or cfg.model.base.rstrip("/") + "/config.json"
    if "://" not in path and not Path(path).exists() and (REPO / path).exists():
        return str(REPO / path)
    return path


def read_model_config(cfg: RunConfig) -> dict:
    from cmevlm.storage import Storage

    path = config_path(cfg)
    try:
        return json.loads(Storage(cfg.storage).read_text(path))
    except (FileNotFoundError, OSError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read the model's config {path}: {e} (set model.config_json)") from e


def model_shape(config: dict) -> Shape:
    """Exact parameter counts per component, from a Qwen2.5-VL config on the meta device."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    c = Qwen2_5_VLConfig.from_dict(config)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(c)
    params = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():
        params[component(name)] += p.numel()
    t, v = c.text_config, c.vision_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return Shape(params=params, largest=max(p.numel() for p in model.parameters()), hidden=t.hidden_size,
                 intermediate=t.intermediate_size, layers=t.num_hidden_layers, kv_dim=t.num_key_value_heads * head_dim,
                 vocab=t.vocab_size, v_hidden=v.hidden_size, v_intermediate=v.intermediate_size, v_depth=v.depth,
                 patch=v.patch_size, merge=v.spatial_merge_size)


# ---------------------------------------------------------------------------------------------
# Activations


def layer_activation_bytes(hidden: int, kv_dim: int, intermediate: int, a: int) -> int:
    """Bytes one token leaves saved for backward in one decoder (or vision) block, `a` bytes per
    element: q, k, v after RoPE and the attention output (SDPA/flash keep no score matrix), the
    o_proj input, the SwiGLU MLP's gate, up, silu(gate) and their product, and two RMSNorms
    that each keep an fp32 copy of their input and their output."""
    attention = 3 * hidden + 2 * kv_dim
    mlp = 4 * intermediate
    norms = 2 * (4 * hidden + a * hidden)
    return a * (attention + mlp) + norms


def activation_bytes(s: Shape, tokens: int, patches: int, a: int, checkpointing: bool, vision_trained: bool) -> dict[str, int]:
    """Activations of one sequence of `tokens` LM tokens and `patches` vision patches."""
    lm_layer = layer_activation_bytes(s.hidden, s.kv_dim, s.intermediate, a) * tokens
    v_layer = layer_activation_bytes(s.v_hidden, s.v_hidden, s.v_intermediate, a) * patches
    if checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        lm = s.layers * a * s.hidden * tokens + lm_layer
        vision = s.v_depth * a * s.v_hidden * patches + v_layer
    else:
        lm, vision = s.layers * lm_layer, s.v_depth * v_layer
    # Logits of every position: the lm_head output, its fp32 copy for the loss, and the
    # fp32 log-softmax the loss keeps (then its gradient).
    logits = tokens * s.vocab * (a + 4 + 4)
    return {"activations": lm + (vision if vision_trained else 0), "logits": logits}


# ---------------------------------------------------------------------------------------------
# Per stage


@dataclass
class StagePlan:
    stage: str
    device: str  # the pool's name, or "cpu"
    workers: int
    parts: dict[str, float]  # GiB per GPU worker
    host: dict[str, float] = field(default_factory=dict)  # GiB on the host per worker (offload)
    capacity: float | None = None  # GiB per GPU of the pool
    fixes: list[str] = field(default_factory=list)

    @property
    def need(self) -> float:
        return round(sum(self.parts.values()), 2)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.need <= self.capacity

    def as_dict(self) -> dict:
        return {"stage": self.stage, "device": self.device, "workers": self.workers, "parts_gib": self.parts,
                "host_gib": self.host, "need_gib": self.need, "capacity_gib": self.capacity, "fits": self.fits,
                "fixes": self.fixes}


def image_sizes(cfg: RunConfig, s: Shape) -> tuple[int, int]:
    """(LM image tokens, vision patches) of one composite at data.image_size."""
    side = cfg.data.image_size // s.patch
    return (side // s.merge) ** 2, side * side


def lora_tensor_sizes(config: dict, settings, policy: str) -> list[int]:
    """Values of every adapter tensor (A = r x in, B = out x r per adapted Linear), on the
    meta device: what a federated round sends, tensor by tensor."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from cmevlm.train.lora import targets

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config))
    modules = dict(model.named_modules())
    return [settings.r * d for n in targets(model, settings.target_modules, policy) for d in (modules[n].in_features, modules[n].out_features)]


def lora_params(config: dict, settings, policy: str) -> int:
    """Exact adapter parameters: r x (in + out) per adapted Linear, on the meta device."""
    return sum(lora_tensor_sizes(config, settings, policy))


def lora_train_memory(t, P: int, L: int, w: int) -> tuple[dict, dict]:
    """A frozen base in the weights' dtype (partitioned at ZeRO-3) and an fp32 adapter (PEFT
    upcasts it) with its fp32 gradients and Adam's two moments; DPO's reference is the same
    base with the adapter off, so no second copy."""
    gpu = {"weights": w * P / (t.num_workers if t.zero_stage == 3 else 1), "adapter": 4 * L}
    (gpu if not t.offload else {}).update(gradients=4 * L, optimizer=8 * L)
    return gpu, ({"gradients": 4 * L, "optimizer": 8 * L} if t.offload else {})


def train_plan(cfg: RunConfig, s: Shape, stage: str) -> StagePlan:
    t = getattr(cfg, stage)
    policy = t.freeze or stage
    trained = sum(n for c, n in s.params.items() if trainable(policy, c))
    P, N = s.total, t.num_workers
    w = 2 if t.bf16 else 4
    gpu, host = {}, {}
    if t.lora is not None:
        gpu, host = lora_train_memory(t, P, lora_params(read_model_config(cfg), t.lora, policy), w)
    elif t.zero_stage == 0:  # plain DDP: fp32 weights and gradients, Adam's two moments
        gpu.update(weights=4 * P, gradients=4 * trained, optimizer=8 * trained)
        if t.bf16:  # torch autocast keeps a bf16 copy of each trainable weight for the step
            gpu["autocast copies"] = 2 * trained
    else:  # DeepSpeed's accounting (estimate_zero2/3_model_states_mem_needs): partitions of the
        # gradients (16-bit) and of the optimiser (fp32 master, fp32 gradients, Adam m and v)
        g = 4 + (2 if t.bf16 and t.zero_stage == 2 else 0)  # fp32 gradient partition (+ the 16-bit one at ZeRO 2)
        o = 12 if t.bf16 else 8  # fp32 master weights (bf16 only) + Adam m, v
        (host if t.offload else gpu).update(gradients=g * trained / N, optimizer=o * trained / N)
        if t.zero_stage == 2:
            gpu["weights"] = w * P
        else:
            (host if t.offload else gpu)["weights"] = w * P / N
            gpu["gather buffer"] = 4 * s.largest
    if stage == "dpo" and t.lora is None:  # the frozen reference: a second copy in the weights' dtype (TRL, ref_model=None)
        (host if t.zero_stage == 3 and t.offload else gpu)["reference"] = w * P / (N if t.zero_stage == 3 else 1)
    image_tokens, patches = image_sizes(cfg, s)
    tokens = t.max_length or image_tokens + 2 + cfg.plan.prompt_tokens + cfg.plan.answer_tokens
    sequences = t.per_device_batch_size * (2 if stage == "dpo" else 1)  # DPO: chosen and rejected
    act = activation_bytes(s, tokens, patches, w, t.gradient_checkpointing, trainable(policy, "vision"))
    gpu.update({k: v * sequences for k, v in act.items()})
    return _finish(cfg, stage, t.use_gpu, N, gpu, host)


def infer_plan(cfg: RunConfig, s: Shape, stage: str) -> StagePlan:
    sc = getattr(cfg, stage)
    on_gpu = (sc.num_gpus_per_replica if stage == "serve" else sc.num_gpus_per_actor) > 0
    dtype = sc.dtype if sc.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    a = DTYPE_BYTES[dtype]
    if stage == "serve":
        batch, new = sc.max_batch_size, sc.max_tokens_cap
    else:
        batch, new = sc.batch_size, sc.max_new_tokens
    image_tokens, patches = image_sizes(cfg, s)
    prompt = image_tokens + 2 + cfg.plan.prompt_tokens
    gpu = {
        "weights": a * s.total,
        "kv cache": 2 * s.layers * s.kv_dim * a * batch * (prompt + new),
        # The prefill's largest transients: the MLP's hidden states, the vision encoder's,
        # and the last position's fp32 logits.
        "prefill": batch * (prompt * a * (s.hidden + 2 * s.intermediate) + patches * a * (3 * s.v_hidden + 2 * s.v_intermediate)
                            + 4 * s.vocab),
    }
    return _finish(cfg, stage, on_gpu, 1, gpu, {})


def _finish(cfg: RunConfig, stage: str, on_gpu: bool, workers: int, gpu: dict, host: dict) -> StagePlan:
    parts = {k: round(v / GiB, 2) for k, v in gpu.items()}
    if not on_gpu:
        return StagePlan(stage, "cpu", workers, parts, {k: round(v / GiB, 2) for k, v in host.items()})
    pool = cfg.plan.stage_pools.get(stage)
    if pool not in cfg.plan.pools:
        raise PlanError(f"plan.stage_pools.{stage} = {pool!r} is not one of plan.pools ({', '.join(cfg.plan.pools)})")
    parts["overhead"] = cfg.plan.overhead_gb
    return StagePlan(stage, pool, workers, parts, {k: round(v / GiB, 2) for k, v in host.items()}, cfg.plan.pools[pool])


def export_plan(cfg: RunConfig, s: Shape | None = None) -> dict:
    """The export task's host memory: constant, whatever the model (it streams), except a
    LoRA export that also writes the merged model: that loads the model in the export dtype."""
    need = EXPORT_PROCESS_GIB + 2 * 64 / 1024
    merging = any(t.lora is not None and t.lora.merge for t in (cfg.sft, cfg.dpo))
    if merging:
        s = s or model_shape(read_model_config(cfg))
        need = EXPORT_PROCESS_GIB + s.total * (4 if cfg.model.export_dtype == "float32" else 2) / 2**30
    return {"need_gib": round(need, 2), "request_gib": cfg.model.export_memory_gb, "fits": need <= cfg.model.export_memory_gb,
            "merges_lora": merging}


# ---------------------------------------------------------------------------------------------
# The plan


def stage_plan(cfg: RunConfig, s: Shape, stage: str) -> StagePlan:
    return (train_plan if stage in TRAIN_STAGES else infer_plan)(cfg, s, stage)


def fixes(cfg: RunConfig, s: Shape, stage: str) -> list[str]:
    """The single `--set` changes, among the usual ones, under which the stage fits."""
    if stage in TRAIN_STAGES:
        t = getattr(cfg, stage)
        tries = [f"num_workers={t.num_workers * 2}", "zero_stage=3", "offload=true", "bf16=true",
                 "gradient_checkpointing=true", "per_device_batch_size=1"]
    elif stage == "serve":
        tries = ["dtype=bfloat16", "max_batch_size=1", "max_tokens_cap=128"]
    else:
        tries = ["dtype=bfloat16", "batch_size=1"]
    good = []
    for change in tries:
        key, value = change.split("=")
        alt = cfg.model_copy(deep=True)
        try:
            setattr(getattr(alt, stage), key, json.loads(value) if value[0].isdigit() or value in ("true", "false") else value)
        except ValueError:
            continue
        if getattr(getattr(cfg, stage), key) != getattr(getattr(alt, stage), key) and stage_plan(alt, s, stage).fits:
            good.append(f"{stage}.{change}")
    return good


def make_plan(cfg: RunConfig, stages: tuple[str, ...] = (*TRAIN_STAGES, *INFER_STAGES), values: dict | None = None) -> dict:
    """The whole plan: the model's parameters, each GPU stage, the export task, and with the
    chart's `values` its pods."""
    config = read_model_config(cfg)
    s = model_shape(config)
    plans = []
    for stage in [x for x in (*TRAIN_STAGES, *INFER_STAGES) if x in stages]:
        p = stage_plan(cfg, s, stage)
        if not p.fits:
            p.fixes = fixes(cfg, s, stage)
        plans.append(p)
    export = export_plan(cfg, s)
    pods = pod_checks(cfg, s, values) if values else []
    placed = placement_checks(cfg, values) if values else []
    image_tokens, patches = image_sizes(cfg, s)
    return {"model": {"config": config_path(cfg), "parameters": s.params, "total": s.total},
            "images": {"side": cfg.data.image_size, "image_tokens": image_tokens, "vision_patches": patches},
            "stages": [p.as_dict() for p in plans], "export": export, "pods": pods, "placement": placed,
            "fits": all(p.fits for p in plans) and export["fits"] and all(c["fits"] for c in (*pods, *placed))}


# ---------------------------------------------------------------------------------------------
# The chart's pods (cmevlm plan --values)

# The head of a RayJob's cluster holds Ray's own processes (GCS, raylet, dashboard, autoscaler
# monitor: ~2 GiB) and the pipeline's driver (torch, transformers and Ray Data imported: ~1.5 GiB).
HEAD_GIB = 4.0
CHART_VALUES = REPO / "helm" / "cmevlm" / "values.yaml"


def quantity_gib(q) -> float:
    """A Kubernetes memory quantity (128Gi, 512Mi, 16G, 1e9) in GiB."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    text = str(q)
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor / GiB
    return float(text) / GiB


def merged_values(*paths: str) -> dict:
    """The chart's defaults with a site's values files on top, in order (as helm merges them)."""
    import yaml

    def merge(base: dict, top: dict) -> dict:
        out = dict(base)
        for k, v in top.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    values = yaml.safe_load(CHART_VALUES.read_text())
    for path in paths:
        values = merge(values, yaml.safe_load(Path(path).read_text()) or {})
    return values


def _check(what: str, need: float, have: float, unit: str, fix: str) -> dict:
    return {"check": what, "need": round(need, 2), "have": round(have, 2), "unit": unit, "fits": need <= have, "fix": fix}


def pod_checks(cfg: RunConfig, s: Shape, values: dict) -> list[dict]:
    """The chart's pod sizes against the run: head memory, the export task on a CPU worker, host
    memory of the H100 group for training, and the serving pool's GPUs. (Whether Ray can place
    each stage's GPUs and CPUs at all: placement_checks.)"""
    w = values["workers"]
    h100 = w["h100"] if w["h100"].get("enabled", True) else None
    gpus_per_pod = h100["gpus"] if h100 else 0
    mem = lambda res: quantity_gib(res["limits"]["memory"])  # noqa: E731
    checks = [_check("head memory", HEAD_GIB, mem(values["head"]["resources"]), "GiB", "head.resources.limits.memory"),
              _check("export task on a cpu worker", cfg.model.export_memory_gb, mem(w["cpu"]["resources"]), "GiB",
                     "workers.cpu.resources.limits.memory")]
    for stage in TRAIN_STAGES:
        t = getattr(cfg, stage)
        if not t.use_gpu:
            continue
        per_pod = min(gpus_per_pod, t.num_workers) or 1
        host = sum(train_plan(cfg, s, stage).host.values())
        loading = (2 if t.bf16 else 4) * (s.largest if t.zero_stage == 3 else s.total) / GiB  # the weights as a worker loads them
        checks.append(_check(f"{stage} host memory per h100 pod", per_pod * (host + loading + 2), mem(h100["resources"]) if h100 else 0,
                             "GiB", "workers.h100.resources.limits.memory, or fewer GPUs per pod"))
    serve = values["serve"]
    if serve.get("enabled") and cfg.serve.num_gpus_per_replica > 0:
        per = float(serve["rtx4090"]["resources"]["limits"].get("nvidia.com/gpu", 0))
        checks.append(_check("serve GPUs", serve["maxReplicas"] * cfg.serve.num_gpus_per_replica, per * serve["rtx4090"]["maxReplicas"],
                             "GPUs", "serve.rtx4090.maxReplicas (a NewCluster upgrade needs twice as many for a while)"))
    return checks


def placement_checks(cfg: RunConfig, values: dict) -> list[dict]:
    """Every stage's Ray requests against the Ray clusters the chart renders with `values`
    (cmevlm.placement: Ray's own autoscaler decides)."""
    from cmevlm import k8s, placement
    from cmevlm.config import public_dict
    from cmevlm.errors import CmevlmError

    try:
        docs = k8s.template("plan", [values, {"runConfig": public_dict(cfg), "pipeline": {"enabled": True}}])
    except CmevlmError as e:
        raise PlanError(f"the placement check renders the chart: {e}") from None
    return placement.checks(cfg, placement.ray_clusters(docs))


def render(plan: dict) -> str:
    """The plan as text: the parameters, one line per stage, what does not fit and why."""
    p = plan["model"]["parameters"]
    lines = [f"model {plan['model']['config']}: {plan['model']['total'] / 1e9:.2f} B parameters "
             f"(vision {p['vision'] / 1e9:.3f} B, merger {p['merger'] / 1e9:.3f} B, language model {p['lm'] / 1e9:.3f} B)",
             *([f"each request's image: {plan['images']['side']} x {plan['images']['side']} px (data.image_size; every stage and "
                f"serve bring images to it) = {plan['images']['image_tokens']} image tokens, {plan['images']['vision_patches']} vision patches"]
               if plan.get("images") else []),
             f"{'stage':<9}{'runs on':<14}{'need/GPU':>10}{'has':>8}  fits  parts (GiB)"]
    for st in plan["stages"]:
        where = f"{st['device']} x{st['workers']}" if st["workers"] > 1 else st["device"]
        has = f"{st['capacity_gib']:.0f}" if st["capacity_gib"] is not None else "-"
        parts = ", ".join(f"{k} {v:.2f}" for k, v in st["parts_gib"].items())
        host = f"; host {', '.join(f'{k} {v:.2f}' for k, v in st['host_gib'].items())}" if st["host_gib"] else ""
        lines.append(f"{st['stage']:<9}{where:<14}{st['need_gib']:>10.2f}{has:>8}  {'yes' if st['fits'] else 'NO ':<4}  {parts}{host}")
    e = plan["export"]
    lines.append(f"{'export':<9}{'host (task)':<14}{e['need_gib']:>10.2f}{e['request_gib']:>8.1f}  {'yes' if e['fits'] else 'NO ':<4}  "
                 + ("loads the model to merge the LoRA adapter (lora.merge; model.export_memory_gb)" if e.get("merges_lora")
                    else "streams tensors in 64 MiB chunks (model.export_memory_gb)"))
    for c in plan.get("pods", []):
        lines.append(f"{'pods':<9}{c['check']:<40} need {c['need']:g} {c['unit']}, has {c['have']:g}: "
                     f"{'yes' if c['fits'] else 'NO (' + c['fix'] + ')'}")
    for c in plan.get("placement", []):
        pods = ", ".join(f"{g} x{n}" for g, n in c["pods"].items()) or "running pods"
        lines.append(f"{'place':<9}{c['stage']:<9}{c['asks']:<34} {c['what']}: " + (f"yes ({pods})" if c["fits"] else "NO"))
    for c in plan.get("placement", []):
        if not c["fits"]:
            lines.append(f"{c['stage']} cannot be placed by Ray: {c['asks']} ({c['what']}); Ray would wait for ever. {c['fix']}")
    for st in plan["stages"]:
        if not st["fits"]:
            short = st["need_gib"] - st["capacity_gib"]
            fix = ", ".join(f"--set {f}" for f in st["fixes"]) or "none of the usual single changes; combine them"
            lines.append(f"{st['stage']} does not fit the {st['capacity_gib']:.0f} GB {st['device']} pool: needs "
                         f"{st['need_gib']:.2f} GiB per GPU, {short:.2f} GiB short. Fits with: {fix}")
    lines.append("plan: every stage fits" if plan["fits"] else "plan: does NOT fit (see above)")
    return "\n".join(lines)
