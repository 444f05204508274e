"""What the SFT and DPO recipes share: the DeepSpeed seam, datasets, Ray Train wiring, export.

DeepSpeed is configured in one place (`deepspeed_config`) and handed to the HF Trainer inside
each Ray Train worker. On CPU it trains with gloo; the HF Trainer's torch AdamW is used rather
than a DeepSpeed `optimizer` entry (which would compile fused_adam for 78 s on CPU).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from cmevlm.config import RunConfig, _Training
from cmevlm.model import layout
from cmevlm.storage import Storage, is_s3, join

log = logging.getLogger(__name__)

FINAL_MARKER = "final.json"
TRAINABLE = "trainable.safetensors"


# ---------------------------------------------------------------------------------------------
# Hyperparameters


def grad_accumulation(t: _Training) -> int:
    """Accumulation steps that bring per-device batch x workers to the effective batch."""
    return max(1, round(t.effective_batch_size / (t.per_device_batch_size * t.num_workers)))


def train_dtype(t: _Training) -> str:
    """The dtype a worker loads weights in. Under DeepSpeed with bf16, bf16 weights (the real
    checkpoints are bf16, so nothing is lost) and DeepSpeed keeps fp32 master copies in the
    optimiser: half the host memory per worker. Otherwise fp32: plain DDP and CPU runs update
    the loaded weights themselves. With LoRA the base is frozen: bf16 whenever bf16 is on
    (PEFT keeps the adapter itself in fp32)."""
    return "bfloat16" if t.bf16 and (t.zero_stage > 0 or t.lora is not None) else "float32"


def deepspeed_config(t: _Training) -> dict | None:
    """The ZeRO config both recipes use; 'auto' values are filled by the HF Trainer from its args."""
    if t.zero_stage == 0:
        return None
    zero: dict = {"stage": t.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if t.zero_stage == 3:
        # Gather the full weights on save so save_model writes a loadable model.
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold="auto")
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
        if t.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": t.use_gpu}
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
        "wall_clock_breakdown": False,
    }


def trainer_kwargs(t: _Training, output_dir: str) -> dict:
    """Arguments shared by SFTConfig and DPOConfig."""
    return dict(
        output_dir=output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a value below 1 is a ratio of the steps
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=grad_accumulation(t),
        bf16=t.bf16,
        use_cpu=not t.use_gpu,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        deepspeed=deepspeed_config(t),
        optim="adamw_torch",
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.checkpoint_every,
        save_total_limit=t.keep_checkpoints,
        report_to=[],
        seed=t.seed,
        data_seed=t.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def effective_values(t: _Training) -> dict:
    acc = grad_accumulation(t)
    return {**t.model_dump(mode="json"), "gradient_accumulation_steps": acc,
            "effective_batch_size_actual": acc * t.per_device_batch_size * t.num_workers}


# ---------------------------------------------------------------------------------------------
# Data


def load_dataset(storage: Storage, uri: str, image_columns=("images",)):
    """Parquet rows in TRL's format -> a `datasets.Dataset` whose images decode to PIL, in
    item_id order: Ray Data writes its shards in whatever order its actors finish, and the
    same seed must see the same batches (measured: two runs of the consortium demo's public
    pretraining on the same data in two orders reached 0.97 and 0.38 held-out accuracy)."""
    import datasets

    table = storage.read_parquet(uri)
    if "item_id" in table.column_names:
        table = table.sort_by("item_id")
    ds = datasets.Dataset(table)
    for c in image_columns:
        ds = ds.cast_column(c, datasets.List(datasets.Image()))
    return ds


# ---------------------------------------------------------------------------------------------
# Inside a worker


def init_distributed(t: _Training) -> None:
    """ZeRO-3 partitions weights as they load (zero.Init): the process group must exist first."""
    if t.zero_stage == 3:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if t.use_gpu else "gloo")


def load_trainable(cfg: RunConfig, t: _Training, uri: str, policy: str, init: str | None = None):
    """(model, processor, parameter counts) for training: the one loading helper in the
    training dtype, right padding, the freeze policy applied, a LoRA adapter with `t.lora`;
    `init` = a safetensors file of trainable tensors to start from (a federated round)."""
    from cmevlm.model.loading import load
    from cmevlm.train.freeze import apply_freeze

    model, processor = load(cfg, uri, dtype=train_dtype(t), device="cpu")
    processor.tokenizer.padding_side = "right"  # training pads right; generation pads left
    counts = apply_freeze(model, policy)
    if t.lora is None:
        start_from(cfg, model, init)
        return model, processor, counts
    from cmevlm.train import lora

    if t.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad input
    model, counts = lora.wrap(model, t.lora, policy)
    start_from(cfg, model, init)
    return model, processor, counts


def start_from(cfg: RunConfig, model, init: str | None) -> None:
    """Load a federated round's global trainable tensors (a safetensors file in the run's
    storage, so workers on any node read it) into the model; a no-op without."""
    if init:
        from safetensors.torch import load

        from cmevlm.train.lora import load_trainable_state

        load_trainable_state(model, load(Storage(cfg.storage).read_bytes(init)))


def train_and_report(trainer, t: _Training, what: str, counts: dict, scratch: str, keep_trainable: bool = False) -> None:
    """Inside a worker: per-step metrics, Ray Train's reporting, resume from the last
    checkpoint, train, and report the final model (with `keep_trainable` also the trained
    tensors alone, as `trainable.safetensors`: what a federated round sends)."""
    import ray.train
    from ray.train.huggingface.transformers import prepare_trainer

    from cmevlm.train.callbacks import MetricsCallback

    metrics = MetricsCallback(t.per_device_batch_size * grad_accumulation(t) * t.num_workers)
    attach_callbacks(trainer, metrics)
    trainer = prepare_trainer(trainer)
    if ray.train.get_context().get_world_rank() == 0:
        log.info("%s: %d rows, trainable parameters %s", what, len(trainer.train_dataset), json.dumps(counts))
    try:
        trainer.train(resume_from_checkpoint=resume_dir(scratch))
        if keep_trainable and ray.train.get_context().get_world_rank() == 0:
            save_trainable(trainer.model, Path(scratch, "final"))
        report_final(trainer, metrics.rows, {"parameters": counts, "stage": what}, scratch)
    finally:  # every checkpoint is in Ray Train's storage once reported: the worker's copy goes
        shutil.rmtree(scratch, ignore_errors=True)


def save_trainable(model, folder: Path) -> None:
    from safetensors.torch import save_file

    from cmevlm.train.lora import trainable_state

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in trainable_state(model).items()}, str(folder / TRAINABLE))


def local_round(cfg: RunConfig, t: _Training, name: str, loop, loop_config: dict) -> tuple[bytes, dict]:
    """One federated round of a stage (`loop_config["init"]` = the round's global tensors):
    (the trained tensors as safetensors bytes, the final marker with the round's last loss)."""
    result = fit(cfg, t, name, loop, loop_config)
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        trained = Path(d, TRAINABLE).read_bytes()
        final = json.loads(Path(d, FINAL_MARKER).read_text())
        losses = [r["loss"] for r in map(json.loads, Path(d, "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return trained, {**final, "loss": losses[-1] if losses else None}


def attach_callbacks(trainer, metrics) -> None:
    """Report checkpoints to Ray Train, keep per-step metrics, and drop the HF printer (with
    tqdm off it prints every log line; metrics.jsonl has them)."""
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers.trainer_callback import PrinterCallback

    trainer.add_callback(RayTrainReportCallback())
    trainer.add_callback(metrics)
    trainer.remove_callback(PrinterCallback)


def resume_dir(scratch: str) -> str | None:
    """The HF checkpoint to resume from, copied out of Ray Train's latest checkpoint."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    dest = Path(scratch, "resume")
    shutil.rmtree(dest, ignore_errors=True)
    with ckpt.as_directory() as d:
        shutil.copytree(d, dest)
    hf = dest / "checkpoint"
    log.info("resuming from %s", hf)
    return str(hf) if hf.exists() else None


def report_final(trainer, metrics: list[dict], extra: dict, scratch: str) -> None:
    """Every rank saves (ZeRO-3 gathers on all ranks); rank 0 reports the final model."""
    import ray.train

    final = Path(scratch, "final")
    trainer.save_model(str(final))
    ctx = ray.train.get_context()
    if ctx.get_world_rank() == 0:
        (final / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        (final / "log_history.json").write_text(json.dumps(trainer.state.log_history))
        (final / FINAL_MARKER).write_text(json.dumps({"global_step": trainer.state.global_step, **extra}))
        ray.train.report({"final": 1, "step": trainer.state.global_step}, checkpoint=ray.train.Checkpoint.from_directory(str(final)))
    else:
        ray.train.report({"final": 1, "step": trainer.state.global_step})


def scratch_dir(stage: str) -> str:
    return tempfile.mkdtemp(prefix=f"cmevlm-{stage}-")


# ---------------------------------------------------------------------------------------------
# On the driver


def fit(cfg: RunConfig, t: _Training, stage: str, loop, loop_config: dict):
    """Run `loop` on a Ray Train TorchTrainer; returns the Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cmevlm.cluster import connect

    connect(cfg.ray)
    storage = Storage(cfg.storage)
    fs, path = storage.resolve(join(cfg.workdir, "checkpoints"))
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=t.resources_per_worker,
                                     placement_strategy=t.placement_strategy),
        run_config=RayRunConfig(
            name=stage, storage_path=path, storage_filesystem=fs if is_s3(cfg.workdir) else None,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints + 1),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
    )
    return trainer.fit()


def export_model(cfg: RunConfig, result, base_uri: str, out_uri: str, frozen: set[str], extra: dict) -> dict:
    """Final Ray checkpoint -> a Hugging Face model directory at `out_uri`, built by a Ray task
    with its own memory request (`model.export_memory_gb`), never on the driver: the head pod
    of a cluster is small, and the export streams tensors (cmevlm.train.export) so its memory
    does not grow with the model. Returns the final marker plus the export's figures."""
    import ray

    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError(f"training ended without a checkpoint: {result.error}")
    task = ray.remote(num_cpus=1, memory=int(cfg.model.export_memory_gb * 2**30), max_calls=1)(_export_task)
    return ray.get(task.remote(cfg.model_dump_json(), ckpt, base_uri, out_uri, sorted(frozen), extra, str(result.error)))


def _export_task(cfg_json: str, ckpt, base_uri: str, out_uri: str, frozen: list[str], extra: dict, error: str) -> dict:
    """Inside the Ray task: stream the export into a temporary folder, add the training record
    (training_args.json, metrics.jsonl, loss.png), upload. Its peak RSS goes into the result."""
    from cmevlm.train.export import peak_rss_bytes

    cfg = RunConfig.model_validate_json(cfg_json)
    storage = Storage(cfg.storage)
    t0 = time.time()
    with ckpt.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
        d = Path(d)
        if not (d / FINAL_MARKER).exists():
            raise RuntimeError(f"training did not finish (its last checkpoint is not final): {error}")
        figures = _export_weights(cfg, d, Path(tmp), base_uri, frozen)
        layout.write_training_images(Path(tmp), cfg.data.image_size, cfg.data.resize)
        for name in ("metrics.jsonl", "log_history.json"):
            if (d / name).exists():
                shutil.copy(d / name, Path(tmp, name))
        final = json.loads((d / FINAL_MARKER).read_text())
        Path(tmp, "training_args.json").write_text(json.dumps({**extra, **final}, indent=2, sort_keys=True))
        _loss_plot(Path(tmp, "metrics.jsonl"), Path(tmp, "loss.png"), extra.get("stage", ""))
        storage.delete(out_uri)
        storage.upload_dir(tmp, out_uri)
    figures.update(seconds=round(time.time() - t0, 1), peak_rss_gb=round(peak_rss_bytes() / 2**30, 3))
    log.info("export: %s", json.dumps(figures))
    return {**final, "export": figures}


def _export_weights(cfg: RunConfig, checkpoint: Path, out: Path, base_uri: str, frozen: list[str]) -> dict:
    """An adapter checkpoint -> adapter directory (+ merged model); a full one -> the streamed
    model directory."""
    from cmevlm.model.adapters import is_adapter_dir
    from cmevlm.model.loading import local_model_dir
    from cmevlm.train import lora
    from cmevlm.train.export import export_dir

    m = cfg.model
    if is_adapter_dir(checkpoint):
        t = cfg.sft if json.loads((checkpoint / FINAL_MARKER).read_text()).get("stage") != "dpo" else cfg.dpo
        return lora.export_adapter(checkpoint, out, base_uri, cfg.storage, m.export_dtype, merge=bool(t.lora and t.lora.merge))
    return export_dir(local_model_dir(base_uri, cfg.storage), checkpoint, out, set(frozen), dtype=m.export_dtype,
                      shard_bytes=int(m.export_shard_gb * 2**30))


def _loss_plot(metrics: Path, out: Path, title: str) -> None:
    if not metrics.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".", lw=1)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title} loss".strip())
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
