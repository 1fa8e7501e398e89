"""bench/memory_plan.py against measured tensors: parameter shapes and bytes of the loaded tiny model, AdamW state after
a step, a real KV cache, FSDP2 shards on 2 processes, saved activations of a real layer and block, image patches from
the real processor; the 7B config against the model built on the meta device."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import memory_plan as mp  # noqa: E402

CONFIG_7B = ROOT / "bench" / "qwen2_5_vl_7b_config.json"


def settings(**kw) -> mp.Settings:
    return mp.Settings(config="unused", **kw)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import common

    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    return cfg, common.load_model(tiny_model_dir, dtype=torch.float32)


def row(rows, name):
    return next(r.bytes for r in rows if r.name.startswith(name))


def test_param_shapes_and_bytes_match_the_loaded_model(tiny):
    cfg, model = tiny
    counted = {name: shape for _, name, shape in mp.param_shapes(cfg)}
    assert counted == {name: tuple(p.shape) for name, p in model.named_parameters()}
    p = mp.plan(cfg, settings(gpus=1))
    assert p["P"] == sum(x.numel() for x in model.parameters())
    assert row(p["resident"], "fp32 master") == sum(x.numel() * x.element_size() for x in model.parameters())


def test_7b_config_matches_the_meta_device_model():
    cfg = json.loads(CONFIG_7B.read_text())
    count, shapes = mp.meta_param_count(str(CONFIG_7B))
    assert {name: shape for _, name, shape in mp.param_shapes(cfg)} == shapes
    assert count == mp.plan(cfg, settings())["P"] == 8_292_166_656  # Qwen2.5-VL-7B: 8.29 B with the vision tower


def test_tied_embeddings_drop_lm_head(tiny):
    cfg = copy.deepcopy(tiny[0])
    cfg["tie_word_embeddings"] = True
    names = [n for _, n, _ in mp.param_shapes(cfg)]
    assert "lm_head.weight" not in names and len(names) == len(mp.param_shapes(tiny[0])) - 1


def test_adamw_state_bytes_after_one_step(tiny):
    cfg, model = tiny
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    measured = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values())
    assert row(mp.plan(cfg, settings(gpus=1))["resident"], "AdamW") == measured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_equal_a_real_dynamic_cache(tiny, dtype):
    cfg, model = tiny
    model = copy.deepcopy(model).to(dtype).eval()
    rows, tokens = 3, 17
    with torch.no_grad():
        cache = model(input_ids=torch.randint(0, 500, (rows, tokens)), use_cache=True).past_key_values
    measured = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert mp.kv_cache_bytes(cfg, rows, tokens, torch.tensor([], dtype=dtype).element_size()) == measured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_estimates_equal_saved_tensors_of_a_real_layer_and_block(tiny, dtype):
    """Saved-for-backward bytes of one decoder layer and one vision block (params in the compute dtype, as under
    FSDP2's mixed precision), counted by storage through saved-tensor hooks, parameters and RoPE tables left out."""
    cfg, model = tiny
    cb = torch.tensor([], dtype=dtype).element_size()

    def saved(module, x, **kwargs):
        storages = {}
        skip = {p.untyped_storage().data_ptr() for p in module.parameters()}
        skip |= {t.untyped_storage().data_ptr() for t in kwargs["position_embeddings"]}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x, **kwargs)
        return sum(n for ptr, n in storages.items() if ptr not in skip)

    B, S, patches = 2, 40, 64
    text = model.model.language_model
    x = torch.randn(B, S, cfg["text_config"]["hidden_size"], dtype=dtype, requires_grad=True)
    positions = torch.arange(S)[None].expand(3, B, S)
    cos_sin = text.rotary_emb(x, positions)
    layer = copy.deepcopy(text.layers[0]).to(dtype)
    measured = saved(layer, x, position_embeddings=cos_sin, attention_mask=None, position_ids=positions[0])
    assert measured == B * S * mp.text_layer_saved_per_token(cfg, cb)

    v = cfg["vision_config"]
    angles = torch.randn(patches, v["hidden_size"] // v["num_heads"])  # the vision tower's RoPE tables are fp32
    block = copy.deepcopy(model.model.visual.blocks[0]).to(dtype)
    measured = saved(block, torch.randn(patches, v["hidden_size"], dtype=dtype, requires_grad=True),
                     cu_seqlens=torch.tensor([0, patches], dtype=torch.int32),
                     position_embeddings=(angles.cos(), angles.sin()))
    assert measured == patches * mp.vision_block_saved_per_patch(cfg, cb)


def test_image_patches_equal_the_real_processor(tiny):
    from PIL import Image

    from fixtures.tiny_models import build_processor, build_tokenizer

    cfg = tiny[0]
    s = settings(image_width=1024, image_height=768)
    processor = build_processor("qwen2_5_vl", build_tokenizer(), max_pixels=s.max_pixels, min_pixels=s.min_pixels)
    grid = processor.image_processor(images=[Image.new("RGB", (1024, 768))], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) == mp.image_patches(cfg, s) == 54 * 74  # 768 x 1024 -> 756 x 1036 pixels


WORKER = """
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import common
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
model = common.load_model({model!r}, dtype=torch.float32)
for block in list(model.model.visual.blocks) + list(model.model.language_model.layers):
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for p in model.parameters():
    p.grad = torch.zeros_like(p)
optimizer.step()
local = lambda t: t.to_local() if hasattr(t, "to_local") else t
nbytes = lambda t: local(t).numel() * local(t).element_size()
out = {{"params": sum(nbytes(p) for p in model.parameters()),
        "moments": sum(nbytes(s[k]) for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))}}
json.dump(out, open(os.path.join({out!r}, f"rank{{dist.get_rank()}}.json"), "w"))
dist.destroy_process_group()
"""


def test_sharded_bytes_on_two_fsdp2_processes(tiny, tiny_model_dir, tmp_path):
    """Rank 0's FSDP2 shard (parameters and AdamW moments) is the plan's per-GPU size exactly; the ranks together hold
    every parameter once, so the per-GPU size is total / N plus at most one row of padding per parameter."""
    cfg = tiny[0]
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), model=tiny_model_dir, out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    p = mp.plan(cfg, settings(gpus=2))
    assert ranks[0]["params"] == row(p["resident"], "fp32 master") == 4 * p["P_shard"]
    assert ranks[0]["moments"] == 8 * p["P_shard"]
    assert ranks[0]["params"] + ranks[1]["params"] == 4 * p["P"]
    one_row = sum(mp.numel(shape[1:]) for _, _, shape in mp.param_shapes(cfg))
    assert p["P"] / 2 <= p["P_shard"] <= p["P"] / 2 + one_row


def test_the_7b_plan_on_8_gpus_and_what_its_flags_change():
    """The report (the CLI itself runs in the gpu_check dry-run test) and the direction of each memory-saving flag."""
    text = mp.report(json.loads(CONFIG_7B.read_text()), settings(), "7B", None)
    assert "8,292,166,656" in text and "=> peak" in text and "assumptions" in text
    cfg = json.loads(CONFIG_7B.read_text())
    base = mp.plan(cfg, settings())
    sharded = mp.plan(cfg, settings(shard_reference=True))
    assert row(sharded["resident"], "reference") == 2 * (base["P_shard"] + base["root"])  # bf16, 1/8 + its root
    assert row(base["resident"], "reference") == 2 * base["P"]
    peak = lambda **kw: mp.phase_peaks(mp.plan(cfg, settings(**kw)))  # noqa: E731
    assert peak(prefill_once=False)["rollout"] > peak()["rollout"]
    assert peak(gradient_checkpointing=False)["policy update"] > peak()["policy update"]


def run_gpu_check(*args, **env):
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_gpu_check_refuses_a_grpo_train_without_fsdp(tmp_path):
    fake = tmp_path / "grpo_train.py"
    fake.write_text("print('usage: grpo_train.py [--bf16 | --no-bf16] [--gradient-checkpointing] [--fsdp-x]')\n")
    run = run_gpu_check(str(tmp_path / "work"), GRPO_TRAIN=str(fake))
    assert run.returncode == 2 and "has no --fsdp flag" in run.stderr


def test_gpu_check_dry_run_builds_inputs_and_plan_and_the_report_reads_a_run(tmp_path):
    """--dry-run on CPU: the wide model on the meta device (its count checked against memory_plan), the processor's
    real prompt length for a 1024 x 768 image, the pseudo-labels, the plan. Then the report on a stand-in train log."""
    work = tmp_path / "work"
    run = run_gpu_check("--dry-run", str(work), TEXT_LAYERS="1", VISION_DEPTH="1", STEPS="1")
    assert run.returncode == 0, run.stderr[-3000:]
    inputs = json.loads((work / "inputs.json").read_text())
    assert inputs["image_tokens"] == 999 and inputs["images"] == 8 and not inputs["weights"]
    cfg = json.loads((work / "model" / "config.json").read_text())
    assert cfg["text_config"]["hidden_size"] == 3584 and cfg["text_config"]["num_hidden_layers"] == 1
    assert f"parameters: {inputs['parameters']:,}" in run.stdout and "=> peak" in run.stdout
    assert len((work / "pseudolabels.jsonl").read_text().splitlines()) == 4

    (work / "run").mkdir()
    steps = [{"step": k, "time/step": 10.0 * k, "time/generation": 6.0, "time/reference": 1.0,
              "time/update": 3.0, "rollout/tokens_per_s": 500.0, "rollout/generated_tokens": 8192} for k in (1, 2)]
    (work / "run" / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    (work / "peak.json").write_text(json.dumps({"rollout": 10 * mp.GiB, "other": 20 * mp.GiB, "rollout_reserved": 0,
                                                "other_reserved": 0, "sampling_calls": 2, "device": "stand-in"}))
    report = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check_report.py"), str(work)],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    s = mp.Settings(config=str(work / "model"), gpus=1, max_new_tokens=256, text_tokens=inputs["text_tokens"])
    peaks = mp.phase_peaks(mp.plan(cfg, s))
    rest = max(peaks["reference log-probs"], peaks["policy update"], peaks["optimizer step"]) - 3 * mp.GiB
    assert f"{20 * mp.GiB / rest:7.2f}" in report.stdout  # measured / planned, outside sampling
    assert "step 20.0 s = generation 6.0 s (30%)" in report.stdout  # the mean leaves out the warm-up step
    assert "voting (shared): no votes_peak_shared.json" in report.stdout
    for engine, name, seconds, kv in (("shared", "shared_prefix", 4.0, 2), ("copies", "copies", 10.0, 16)):
        (work / f"votes_peak_{engine}.json").write_text(json.dumps({
            "engine": name, "seconds": seconds, "generated_tokens": 16384, "sequences": 256, "row_steps": 16128,
            "kv_bytes": kv * mp.GiB, "peak": 30 * mp.GiB}))
    report = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check_report.py"), str(work)],
                            capture_output=True, text=True, timeout=120)
    assert "voting (sample_votes.py, 256 votes" in report.stdout
    assert "  shared_prefix       4.0    16384      4096" in report.stdout
    assert "shared / copies: tokens/s 2.50x, KV 8.0x smaller, peak 1.00x smaller" in report.stdout
    for engine in ("shared", "copies"):
        wrapper = (work / f"vote_wrapper_{engine}.py").read_text()
        assert "sample_votes.py" in wrapper and ("_why_not_shared" in wrapper) == (engine == "copies")
    assert "=> largest voting batch" in run.stdout  # the voting plan of the wide model


def test_sampler_kv_bytes_equal_what_each_decode_path_holds(tiny_model_dir, demo_pool, monkeypatch):
    """sampler_kv_bytes against the most KV bytes sampling.sample held (Samples.decode), for the shared-prefix engine
    and the copies path, with a budget of one buffer-growth step (so every buffer is allocated at once)."""
    import common
    import prompts
    import sampling

    model, processor = common.load_model(tiny_model_dir, dtype=torch.float32).eval(), common.load_processor(
        tiny_model_dir)
    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    images = [common.load_image(p) for p in sorted(demo_pool.glob("*.png"))[:2]]
    prompt = prompts.get_preset("evoquality").prompt("compare", True)
    inputs = common.encode_batch(processor, [prompt] * 2, [images, images[::-1]])
    L, n, T = inputs["input_ids"].shape[1], 5, sampling.KV_ROOM_STEP
    stops = sampling.eos_token_ids(sampling.sampling_config(model, 1)) + sampling.placeholder_token_ids(model)
    never_stop = model.lm_head.register_forward_hook(lambda m, args, out: out.index_fill(-1, torch.tensor(stops),
                                                                                         float("-inf")))
    shared = sampling.sample(model, processor, inputs, n, T, keys=[1, 2])
    assert shared.decode["kv_bytes"] == mp.sampler_kv_bytes(cfg, 2, n, L, T, 4, shared=True)
    monkeypatch.setattr(sampling, "_why_not_shared", lambda model, cache: "the copies path")
    monkeypatch.setattr(sampling, "_warn_once", lambda reason: None)
    copies = sampling.sample(model, processor, inputs, n, T, keys=[1, 2])
    never_stop.remove()
    assert copies.decode["kv_bytes"] == mp.sampler_kv_bytes(cfg, 2, n, L, T, 4, shared=False)
    assert shared.ids.shape == copies.ids.shape == (2 * n, T)


def test_the_voting_plan_fits_more_votes_with_the_shared_prefix():
    cfg = json.loads(CONFIG_7B.read_text())
    p = mp.voting_plan(cfg, settings(gpus=1))
    shared, copies = p["plans"][True], p["plans"][False]
    assert p["prompt"] == 2 * 999 + 130 and p["n"] == 16
    assert shared["prompts"] > 2 * copies["prompts"] > 0
    for plan in (shared, copies):  # the largest that fits, and one more prompt would not
        assert plan["peak"] <= 80 * mp.GiB
    more = mp.voting_plan(cfg, settings(gpus=1, gpu_gib=80 + 0.6))  # 0.6 GiB more: about one shared prompt more
    assert more["plans"][True]["prompts"] >= shared["prompts"]


def test_log_prob_rows_count_the_packed_rows_of_logprobs(tiny):
    """The plan's log-prob micro-batch is what logprobs.shared_prompt builds: whole groups, each one packed row of
    prompt + G x T tokens, with a [S, S] mask and G x T kept logits per row; at least one group per micro-batch."""
    import logprobs

    cfg, model = tiny
    G, T = 4, 5
    s = settings(group_size=G, micro_batch_size=8, max_new_tokens=T, image_width=56, image_height=56, bf16=False,
                 text_tokens=20)
    p = mp.plan(cfg, s)
    groups, L = p["groups"], p["prompt"]
    assert groups == 2 and p["image_tokens"] == 4
    prompts = {"input_ids": torch.randint(50, 500, (groups, L)), "attention_mask": torch.ones(groups, L, dtype=torch.long),
               "mm_token_type_ids": torch.zeros(groups, L, dtype=torch.long)}
    layout = logprobs.packed_layout(model, prompts, G, T)
    assert layout["attention_mask"].shape == (groups, 1, p["packed"], p["packed"])
    assert row(p["phases"]["reference log-probs"], "packed attention mask") == layout["attention_mask"].numel() * 5
    V = cfg["text_config"]["vocab_size"]
    chunk = groups * G * T * V * 4
    assert row(p["phases"]["reference log-probs"], "logits") == groups * layout["logits_to_keep"].numel() * V * 4 \
        + 2 * chunk
    assert p["tokens_shared"] == L + G * T and p["tokens_per_row"] == G * (L + T)
    assert mp.plan(cfg, settings(group_size=32, micro_batch_size=4))["groups"] == 1  # a group larger: one per pass
