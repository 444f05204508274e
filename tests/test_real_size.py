"""Real size on CPU: the 7B plan, and a random model with Qwen2.5-VL-7B's real widths (hidden
3584, vocabulary 152064, vision 1280 -> merger 3584) but 2 + 2 layers (~1.6 B parameters),
loaded in bf16 through the one loading helper, sampled, served, exported by streaming with
its peak RSS measured, and its activations measured against the plan's formula."""

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from cmevlm import plan
from cmevlm.cli import main
from cmevlm.config import load_config
from cmevlm.model.loading import load
from cmevlm.model.tiny import build_tiny_model
from cmevlm.train.export import ExportError, export_dir, read_tensors, write_shard
from conftest import free_port, weights

REPO = Path(__file__).resolve().parent.parent
CLUSTER = str(REPO / "configs" / "cluster.example.yaml")
SEVEN_B = REPO / "configs" / "models" / "qwen2.5-vl-7b-instruct.json"


@pytest.fixture(scope="module")
def real_width_dir(tmp_path_factory):
    """7B widths, 2 decoder layers, 2 vision blocks, 4 image tokens (56 x 56 px), bf16; its
    3 GB are deleted after the module (pytest keeps its last runs' temp folders)."""
    root = tmp_path_factory.mktemp("real-width")
    yield build_tiny_model(root / "m", like=json.loads(SEVEN_B.read_text()), layers=2, vision_depth=2, max_pixels=56 * 56)
    shutil.rmtree(root, ignore_errors=True)


def _legacy(key: str) -> str:
    """The original Qwen2.5-VL checkpoint names (model.layers.*, visual.*)."""
    return key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")


# ---------------------------------------------------------------------------------------------
# The plan


def test_plan_counts_the_7b_exactly_and_the_cluster_example_fits(capsys):
    assert main(["plan", "--config", CLUSTER]) == 0
    out = capsys.readouterr().out
    assert "8.29 B parameters (vision 0.632 B, merger 0.045 B, language model 7.616 B)" in out
    assert "plan: every stage fits" in out
    params = {m: plan.model_shape(json.loads((REPO / "configs" / "models" / f"qwen2.5-vl-{m}-instruct.json").read_text())).total
              for m in ("3b", "32b", "72b")}
    # The model cards' sizes: 3.75 B, 33.5 B, 73.4 B.
    assert [round(params[m] / 1e9, 1) for m in ("3b", "32b", "72b")] == [3.8, 33.5, 73.4]


def test_plan_refuses_fp32_serving_on_the_4090_and_one_gpu_zero2_sft(capsys):
    assert main(["plan", "--config", CLUSTER, "--set", "serve.dtype=float32"]) == 3
    out = capsys.readouterr().out
    assert "serve does not fit the 24 GB rtx4090 pool" in out and "--set serve.dtype=bfloat16" in out
    assert main(["plan", "--config", CLUSTER, "--set", "sft.num_workers=1", "--set", "sft.zero_stage=2", "--set", "sft.offload=false"]) == 3
    out = capsys.readouterr().out
    assert "sft does not fit the 80 GB h100 pool" in out and "dpo does not fit" not in out
    assert main(["plan", "--config", CLUSTER, "--json", "--set", "serve.dtype=float32"]) == 3
    data = json.loads(capsys.readouterr().out)
    serve = next(s for s in data["stages"] if s["stage"] == "serve")
    assert data["fits"] is False and serve["fits"] is False and serve["capacity_gib"] == 24
    assert serve["parts_gib"]["weights"] == pytest.approx(30.89, abs=0.01)  # 8.29 B x 4 bytes


def test_pipeline_and_submit_refuse_a_plan_that_does_not_fit(capsys, tmp_path):
    bad = ["--config", CLUSTER, "--set", "sft.num_workers=1", "--set", "sft.zero_stage=2"]
    assert main(["submit", "sft", *bad, "--dry-run"]) == 3
    err = capsys.readouterr().err
    assert "sft does not fit" in err and "refused: the plan does not fit" in err
    assert main(["submit", "teach", *bad, "--dry-run"]) == 0  # teach needs no GPU; sft is not what is submitted
    assert main(["submit", "sft", *bad, "--dry-run", "--no-plan"]) == 0
    capsys.readouterr()
    assert main(["pipeline", *bad, "--set", f"workdir={tmp_path}"]) == 3
    assert "refused" in capsys.readouterr().err and not list(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("stage", [2, 3])
def test_plan_model_states_equal_deepspeeds_own_estimators(stage):
    """Full fine-tuning (every component) of the 7B on 8 GPUs: the plan's weights, gradients,
    optimiser states and gather buffer are DeepSpeed's estimate, to the byte."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = load_config(CLUSTER, [f"sft.zero_stage={stage}", "sft.freeze=none"])
    s = plan.model_shape(json.loads(SEVEN_B.read_text()))
    parts = plan.train_plan(cfg, s, "sft").parts
    states = sum(parts[k] for k in ("weights", "gradients", "optimizer", "gather buffer") if k in parts)
    if stage == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(s.total, num_gpus_per_node=8, num_nodes=1, cpu_offload=False)
    else:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(s.total, s.largest, num_gpus_per_node=8, num_nodes=1, cpu_offload=False)
    assert states == pytest.approx(gpu / 2**30, abs=0.03)


# ---------------------------------------------------------------------------------------------
# The real-width model


def test_plan_counts_what_the_real_width_model_has_and_bf16_weights_are_its_bytes(real_width_dir):
    cfg = load_config(CLUSTER, [f"model.config_json={real_width_dir}/config.json", "model.attn_implementation=sdpa"])
    model, _ = load(cfg, str(real_width_dir), dtype="bfloat16", device="cpu")
    counted = sum(p.numel() for p in model.parameters())
    p = plan.make_plan(cfg)
    assert p["model"]["total"] == counted and 1.5e9 < counted < 1.7e9
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    serve = next(s for s in p["stages"] if s["stage"] == "serve")
    assert serve["parts_gib"]["weights"] == pytest.approx(sum(x.numel() * x.element_size() for x in model.parameters()) / 2**30, abs=0.01)


def test_real_width_model_loads_in_bf16_through_the_one_helper_and_samples_a_batch(real_width_dir):
    from cmevlm.config import SampleConfig
    from cmevlm.data.composite import encode_png
    from cmevlm.model.generate import Setting
    from cmevlm.sample import sample_items

    cfg = load_config(overrides=["sample.dtype=bfloat16"])
    model, proc = load(cfg, str(real_width_dir), dtype=cfg.sample.dtype, num_gpus=cfg.sample.num_gpus_per_actor)
    assert model.dtype == torch.bfloat16
    image = encode_png(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    items = [{"item_id": f"i{i}", "image": image, "prompt": "Identify the highlighted anatomical structure."} for i in range(2)]
    settings = [Setting.of(s) for s in SampleConfig().settings]
    rows = sample_items(model, proc, items, settings, max_new_tokens=4)
    assert [len(r["answers"]) for r in rows] == [5, 5]
    assert all(1 <= a["n_tokens"] <= 4 for r in rows for a in r["answers"])


def test_flash_attention_is_refused_clearly_where_the_package_is_missing(real_width_dir):
    pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    cfg = load_config(overrides=["model.attn_implementation=flash_attention_2"])
    with pytest.raises(ValueError, match="flash-attn"):
        load(cfg, str(real_width_dir), dtype="bfloat16")


def test_real_width_model_serves_a_request_in_bf16(ray_local, real_width_dir, tmp_path):
    from ray import serve

    from cmevlm.serve import app

    port = free_port()
    cfg = load_config(overrides=[f"workdir={tmp_path}", f"serve.model={real_width_dir}", f"serve.port={port}", "serve.dtype=bfloat16",
                                 "serve.num_cpus_per_replica=0.5", "data.image_size=56"])
    app.run(cfg, block=False)
    try:
        import base64

        from cmevlm.data.composite import encode_png

        png = encode_png(np.random.default_rng(1).integers(0, 255, (56, 56, 3), dtype=np.uint8))
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
        body = {"model": "cmevlm", "max_tokens": 3,
                "messages": [{"role": "user", "content": [image, {"type": "text", "text": "Name the structure."}]}]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            reply = json.loads(r.read())
        assert r.status == 200 and reply["usage"]["completion_tokens"] >= 1
    finally:
        serve.shutdown()


EXPORT_SCRIPT = """
import json, sys
from pathlib import Path
from cmevlm.train.export import export_dir, peak_rss_bytes
figures = export_dir(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), {"vision"}, "bfloat16", shard_bytes=2**30)
figures["peak_rss_bytes"] = peak_rss_bytes()
print(json.dumps(figures))
"""


def test_streaming_export_of_the_real_width_model_stays_far_below_its_size(real_width_dir, tmp_path):
    """The trained checkpoint in fp32 with the original Qwen names, the export in bf16: peak
    RSS of the exporting process below 1.5 x the model's bf16 size (it is a fraction of it)."""
    try:
        _streaming_export(real_width_dir, tmp_path)
    finally:  # 9 GB of checkpoint and export
        shutil.rmtree(tmp_path, ignore_errors=True)


def _streaming_export(real_width_dir: Path, tmp_path: Path) -> None:
    trained = tmp_path / "trained"
    trained.mkdir()
    base = read_tensors(real_width_dir)
    write_shard(trained / "model.safetensors", [(_legacy(k), r) for k, r in base.items()], "float32")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(real_width_dir), str(trained), str(out)],
                         capture_output=True, text=True, check=True)
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    bf16_size = sum(r.numel * 2 for r in base.values())
    print(f"export: {figures['bytes'] / 2**30:.2f} GiB in {figures['shards']} shards, "
          f"peak RSS {figures['peak_rss_bytes'] / 2**30:.2f} GiB = {figures['peak_rss_bytes'] / bf16_size:.2f} x the bf16 size")
    assert figures["bytes"] == bf16_size and figures["shards"] == 4
    assert figures["peak_rss_bytes"] < 1.5 * bf16_size
    assert figures["peak_rss_bytes"] / 2**30 <= plan.export_plan(load_config())["need_gib"]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    got, ref = read_tensors(out), base
    assert set(got) == set(ref) and {r.dtype for r in got.values()} == {"BF16"}


def test_activations_the_plan_counts_are_what_autograd_saves(real_width_dir):
    """Bytes autograd keeps for backward (parameters excluded) in the real-width language model
    for a 256-token sequence, with and without gradient checkpointing, against the plan."""
    model, _ = load(load_config(), str(real_width_dir), dtype="bfloat16", device="cpu")
    s = plan.model_shape(json.loads((real_width_dir / "config.json").read_text()))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.train().requires_grad_(True)
    ids = torch.randint(0, 2000, (1, 256))

    def saved_bytes() -> int:
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model.language_model(input_ids=ids)
        return sum(seen.values())

    plain = saved_bytes()
    estimate = plan.activation_bytes(s, 256, 0, 2, checkpointing=False, vision_trained=False)["activations"]
    assert 0.85 < plain / estimate < 1.2, (plain, estimate)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = saved_bytes()
    estimate_ckpt = plan.activation_bytes(s, 256, 0, 2, checkpointing=True, vision_trained=False)["activations"]
    assert s.layers * 2 * s.hidden * 256 <= checkpointed <= estimate_ckpt
    assert checkpointed < plain / 5


# ---------------------------------------------------------------------------------------------
# Export rules on the tiny model


def test_export_takes_frozen_tensors_from_the_base_and_trained_ones_from_the_checkpoint(tiny_model_dir, tmp_path):
    other = build_tiny_model(tmp_path / "other", seed=1)
    trained = tmp_path / "trained"
    trained.mkdir()
    refs = read_tensors(other)
    write_shard(trained / "model.safetensors", [(_legacy(k), r) for k, r in refs.items()], "float32")
    out = tmp_path / "out"
    figures = export_dir(tiny_model_dir, trained, out, {"vision"}, "float32")
    from safetensors.torch import load_file

    got, base, new = load_file(out / "model.safetensors"), weights(tiny_model_dir), weights(other)
    vision = [k for k in got if "visual" in k and "merger" not in k]
    lm = [k for k in got if "visual" not in k]
    assert vision and lm and figures["from_base"] == len(vision)
    assert all(torch.equal(got[k], base[k]) for k in vision)
    assert all(torch.equal(got[k], new[k]) for k in lm)
    assert not all(torch.equal(got[k], base[k]) for k in lm)


def test_export_refuses_missing_unexpected_and_reshaped_tensors(tiny_model_dir, tmp_path):
    refs = read_tensors(tiny_model_dir)
    lm_key = next(k for k in refs if "layers.0.mlp.down_proj" in k)
    cases = {
        "missing": [(k, r) for k, r in refs.items() if k != lm_key],
        "unexpected": [*refs.items(), ("model.layers.99.mlp.down_proj.weight", refs[lm_key])],
        "shapes": [(k, refs[next(x for x in refs if "layers.0.mlp.up_proj" in x)] if k == lm_key else r) for k, r in refs.items()],
    }
    for word, items in cases.items():
        d = tmp_path / word
        d.mkdir()
        write_shard(d / "model.safetensors", items, "float32")
        with pytest.raises(ExportError, match=word):
            export_dir(tiny_model_dir, d, tmp_path / f"out-{word}", {"vision"}, "float32")


def test_the_gpu_scripts_inputs_are_laid_out_as_the_processor_lays_them_out(tiny_model_dir):
    """bench/gpu/real_size.py builds inputs without a tokenizer: the same image-token count,
    patch shape and grid as the real processor gives for a 448 px image."""
    import importlib.util

    from PIL import Image
    from transformers import Qwen2_5_VLConfig

    from cmevlm.model.loading import make_processor

    spec = importlib.util.spec_from_file_location("real_size", REPO / "bench" / "gpu" / "real_size.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = Qwen2_5_VLConfig.from_dict(json.loads(SEVEN_B.read_text()))
    made = script.batch_inputs(config, 2, 96, device="cpu")
    proc = make_processor(load(load_config(), str(tiny_model_dir))[1].tokenizer, max_pixels=448 * 448)
    real = proc(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[Image.new("RGB", (448, 448))], return_tensors="pt")
    image_pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (made["input_ids"][0] == config.image_token_id).sum() == (real["input_ids"][0] == image_pad).sum() == 256
    assert made["pixel_values"].shape == (2 * real["pixel_values"].shape[0], real["pixel_values"].shape[1])
    assert made["image_grid_thw"][0].tolist() == real["image_grid_thw"][0].tolist()


def test_plan_with_the_charts_values_checks_its_pods(tmp_path, capsys):
    """cmevlm plan --values: the site's values (merged over the chart's defaults) size the head,
    the export task's CPU worker, the H100 group's GPUs and host memory, and the serving pool."""
    import yaml

    site = {"runConfig": {"workdir": "s3://x/run", "model": {"base": "s3://m/7b", "config_json": str(SEVEN_B)},
                          "sft": {"num_workers": 8, "use_gpu": True, "zero_stage": 3, "bf16": True, "gradient_checkpointing": True},
                          "serve": {"num_gpus_per_replica": 1}}}
    values = tmp_path / "site.yaml"
    values.write_text(yaml.safe_dump(site))
    assert main(["plan", "--values", str(values)]) == 0
    out = capsys.readouterr().out
    assert "8 x {CPU: 1, GPU: 1}" in out and "Ray Train workers (PACK): yes (h100 x1)" in out and "serve GPUs" in out
    assert main(["plan", "--values", str(values), "--set", "sft.num_workers=16"]) == 3
    assert "sft cannot be placed by Ray" in capsys.readouterr().out
    site["head"] = {"resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "2Gi"}}}
    site["runConfig"]["sft"]["zero_stage"] = 2  # every worker loads the whole bf16 model on the host
    site["workers"] = {"h100": {"resources": {"requests": {"cpu": "64", "memory": "128Gi"}, "limits": {"cpu": "64", "memory": "128Gi"}}}}
    values.write_text(yaml.safe_dump(site))
    assert main(["plan", "--values", str(values)]) == 3
    out = capsys.readouterr().out
    assert "head memory" in out and "need 4 GiB, has 2: NO" in out
    assert "sft host memory per h100 pod" in out and "has 128: NO" in out


def test_7b_lora_fits_one_4090_and_the_plan_counts_the_adapter_peft_builds(real_width_dir, capsys):
    one_4090 = ["--set", "sft.num_workers=1", "--set", "sft.zero_stage=0", "--set", "sft.lora={r: 16}", "--set",
                "sft.gradient_checkpointing=true", "--set", "sft.per_device_batch_size=1", "--set", "plan.stage_pools.sft=rtx4090"]
    assert main(["plan", "--config", CLUSTER, *one_4090]) == 3  # merging the adapter at export loads the model
    assert "16.05" in capsys.readouterr().out
    one_4090 += ["--set", "model.export_memory_gb=20"]
    assert main(["plan", "--config", CLUSTER, "--json", *one_4090]) == 0
    sft_plan = next(s for s in json.loads(capsys.readouterr().out)["stages"] if s["stage"] == "sft")
    assert sft_plan["fits"] and sft_plan["capacity_gib"] == 24 and "reference" not in sft_plan["parts_gib"]
    assert sft_plan["parts_gib"]["weights"] == pytest.approx(15.45, abs=0.01)  # the frozen base in bf16
    full = [x for x in one_4090 if x not in ("sft.lora={r: 16}", "--set", "model.export_memory_gb=20")]
    assert main(["plan", "--config", CLUSTER, *[a for x in full for a in ("--set", x)]]) == 3  # full fine-tuning does not
    capsys.readouterr()
    # Real widths: the adapter the plan counts is the one PEFT builds.
    from cmevlm.config import LoraSettings
    from cmevlm.model.loading import load_model
    from cmevlm.train import lora
    from cmevlm.train.freeze import apply_freeze

    model = load_model(str(real_width_dir), dtype="bfloat16")
    apply_freeze(model, "sft")
    wrapped, counts = lora.wrap(model, LoraSettings(r=16), "sft")
    built = sum(v["trainable"] for v in counts.values())
    assert built == plan.lora_params(json.loads((real_width_dir / "config.json").read_text()), LoraSettings(r=16), "sft")
    assert {p.dtype for p in wrapped.parameters() if p.requires_grad} == {torch.float32}  # PEFT keeps the adapter in fp32
