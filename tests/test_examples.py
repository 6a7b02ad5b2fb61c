"""Smoke tests: each example runs end to end and reaches its stated result."""

import importlib.util
import pathlib

import jax
import numpy as np
from helpers import chain_bound

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name, folder="examples"):
    """A script of `examples/` (or `benchmarks/`, whose scripts import each other) as a
    module, registered under its name (Flax's modules look their module up)."""
    import sys

    if folder == "benchmarks":
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_quickstart_lora_fixes_the_shifted_task_and_merge_agrees():
    with jax.numpy_dtype_promotion("standard"):  # optax's adam is not strict-clean
        base_loss, lora_loss, gap, scale = _load("quickstart").main([])
    assert lora_loss < 0.5 * base_loss
    # Merged vs factored: 3 layers of at most 128 inputs, two reductions each.
    assert gap <= chain_bound(k=128, depth=6) * scale


def test_benchmark_quick_mode_runs_every_candidate():
    bench = _load("run", "benchmarks")
    # The larger model runs the same code on other sizes: left out of the smoke run.
    out = bench.main(["--quick", "--no-write", "--no-torch", "--no-large", "--rounds", "2"])
    cands, inf_rows, (sizes, _), merge_row = (
        out["cands"],
        out["inference"],
        out["checkpoint"],
        out["merge"],
    )
    expected = {
        "full",
        "jlora",
        "jlora whole-tree",
        "nnx.LoRALinear",
        "hand-written",
        "materialized",
        "floor",
    }
    if importlib.util.find_spec("qwix") is not None:  # qwix is in the [bench] extra
        expected.add("qwix")
    assert set(cands) == expected
    assert out["large"] is None
    for c in cands.values():
        assert len(c["times"]) == 2 and min(c["times"]) > 0
    # LoRA trains far fewer parameters, and jlora's optimizer state is the hand-written's.
    assert cands["jlora"]["n_train"] == cands["hand-written"]["n_train"]
    assert cands["jlora"]["opt_bytes"] < cands["full"]["opt_bytes"] / 10
    assert all(row[-1] for row in inf_rows)  # merged params hit the base's jit cache
    assert 0 < sizes["adapter"] < sizes["full"] / 5  # the adapter checkpoint is small
    # A donated merge needs at most one kernel's product of extra memory.
    assert merge_row["extra"]["donated"] <= 1.1 * merge_row["largest_product"]


def test_checkpointing_example_round_trips(tmp_path):
    with jax.numpy_dtype_promotion("standard"):
        summary = _load("checkpointing").main(["--dir", str(tmp_path), "--steps", "3"])
    assert len(summary["losses"]) == 3


def test_sharded_training_example_matches_replicated_and_saves_memory():
    if len(jax.devices()) < 8:
        import pytest

        pytest.skip("needs 8 devices")
    rep, fsdp, mem = _load("sharded_training").main(
        ["--steps", "2", "--d", "64", "--layers", "1"]
    )
    assert len(rep) == len(fsdp) == 2
    assert (
        mem["fsdp over 8"].argument_size_in_bytes
        < mem["replicated"].argument_size_in_bytes / 3
    )


def test_pytorch_peft_candidate_trains_the_same_adapter_size():
    import sys

    import pytest

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch_peft
    from gpt import GPTConfig

    if not torch_peft.available():  # torch and peft are in the [torch] extra
        pytest.skip("needs torch and peft")
    cfg = GPTConfig(vocab=64, d=32, heads=2, layers=2, seq=16)
    ids = np.random.default_rng(0).integers(0, 64, (2, 16))
    c = torch_peft.make_candidate(cfg, 4, ids)
    # LoRA r=4 on query and value of 2 layers: a [32, 4] and b [4, 32] each.
    assert c["n_train"] == 2 * 2 * (32 * 4 + 4 * 32)
    # AdamW: two float32 moments per parameter and a float32 step count per tensor (8).
    assert c["opt_bytes"] == 2 * 4 * c["n_train"] + 8 * 4
    first = c["run"](1)
    assert c["run"](5) < first  # it trains


def test_nnx_finetune_example_learns_the_new_task_and_serves_it_merged():
    with jax.numpy_dtype_promotion("standard"):  # optax's adam is not strict-clean
        out = _load("nnx_finetune").main(["--pretrain-steps", "150", "--lora-steps", "100"])
    assert out["base_acc"] < 0.5 <= out["lora_acc"]  # counting by 3: learned by LoRA only
    assert out["same"] == 1.0  # loaded onto a fresh base and merged: the same tokens


def test_nnx_benchmark_quick_mode_times_every_candidate():
    bench = _load("nnx", "benchmarks")
    with jax.numpy_dtype_promotion("standard"):  # optax's adam is not strict-clean
        out = bench.main(["--quick", "--no-write", "--rounds", "2"])
    expected = {
        "jlora.nnx",
        "nnx.LoRALinear",
        "jlora functional",
        "nnx.LoRALinear, jax.jit",
    }
    if importlib.util.find_spec("qwix") is not None:  # qwix is in the [bench] extra
        expected.add("qwix")
    assert set(out["times"]) == expected
    assert all(len(t) == 2 and min(t) > 0 for t in out["times"].values())
    # Every candidate trains the same factors: rank 8 on query and value of each layer.
    assert len(set(out["n_train"].values())) == 1


def test_quant_memory_benchmark_plans_the_three_bases():
    bench = _load("quant_memory", "benchmarks")
    rows = {
        (n, base): (b, t) for n, base, b, t in bench.main(["--d", "128", "--layers", "4"])
    }
    kernel = 128 * 128 * 4
    assert rows[(4, "nf4")][0] <= 0.13 * rows[(4, "float32")][0]  # 4.129 bits of 32
    assert rows[(4, "nf4")][1] <= rows[(4, "float32")][1] + kernel
    assert rows[(4, "nf4, plain")][1] > rows[(4, "nf4")][1] + 2 * kernel


def test_quant_benchmark_quick_mode_runs_every_base():
    bench = _load("quant", "benchmarks")
    with jax.numpy_dtype_promotion("standard"):  # optax's adam is not strict-clean
        cands = bench.main(["--quick", "--no-write"])
    bases = {"float32", "bfloat16", "int8", "nf4"}
    if importlib.util.find_spec("qwix") is not None:  # qwix is in the [bench] extra
        bases.add("qwix nf4")
    assert set(cands) == bases
    assert all(len(c["times"]) == 2 for c in cands.values())
    nf4, int8 = cands["nf4"]["kernels"], cands["int8"]["kernels"]
    assert nf4[0] <= 0.13 * nf4[1] and int8[0] <= 0.27 * int8[1]  # kernel bytes / float32
    assert (
        cands["nf4"]["base_bytes"]
        < cands["int8"]["base_bytes"]
        < cands["bfloat16"]["base_bytes"]
    )


def test_qlora_loss_benchmark_runs_the_main_job_on_each_base_with_the_same_seed():
    import math

    bench = _load("qlora_loss", "benchmarks")
    results, stats = bench.main(["--quick", "--no-write"])
    assert list(results) == ["float", "nf4"]
    (f_seed, f_loss, _), (q_seed, q_loss, _) = results["float"][0], results["nf4"][0]
    assert f_seed == q_seed == 0 and math.isfinite(f_loss) and math.isfinite(q_loss)
    assert f_loss != q_loss  # the NF4 run trained on the quantized base
    assert stats["float"]["ratio"] == 1.0
    assert math.isclose(stats["nf4"]["ratio"], q_loss / f_loss, rel_tol=1e-12)


def test_dora_benchmark_quick_mode_times_lora_and_dora_of_each_library():
    bench = _load("dora", "benchmarks")
    with jax.numpy_dtype_promotion("standard"):  # optax's adam is not strict-clean
        cands, med = bench.main(["--quick", "--no-write", "--batch", "2"])
    names = {"jlora lora", "jlora dora"}
    if importlib.util.find_spec("peft") is not None:  # PEFT is in the [torch] extra
        names |= {"peft lora", "peft dora"}
    assert set(cands) == names
    assert all(len(c["times"]) == 2 and med[n] > 0 for n, c in cands.items())
    # What DoRA adds to the step's temporaries: per adapted kernel (q and v of the one
    # 256-wide layer) a few [tokens, out] activations (the magnitude's gradient reads
    # the kernel's output; 2 x 8 tokens x 256 x 4 bytes = 16 KiB each), per-output
    # vectors and [r, out] products: far less than one float32 kernel (256 KiB), which
    # forming W + s*A@B would add per kernel.
    extra = cands["jlora dora"]["temp"] - cands["jlora lora"]["temp"]
    assert 0 <= extra < 256 * 256 * 4


def test_memory_plan_of_a_small_config_with_a_plot(tmp_path):
    import json

    plan = _load("memory_plan", "benchmarks")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    }))  # fmt: skip
    svg = tmp_path / "plan.svg"
    with jax.numpy_dtype_promotion("standard"):  # optax's adam is not strict-clean
        rows = plan.main(["--config", str(config), "--seq", "128", "--plot", str(svg)])
    by_base = {base: args for _, base, args, *_ in rows}
    # The frozen base dominates the arguments: NF4 < int8 < bfloat16 < float32 < full.
    order = ["nf4", "int8", "bfloat16", "float32", "full fine-tuning"]
    assert [by_base[b] for b in order] == sorted(by_base[b] for b in order)
    assert svg.read_text().count("<rect") == 3 * len(rows) + 3


def test_serve_adapters_answers_a_mixed_batch_as_each_adapter_alone(tmp_path):
    serve = _load("serve_adapters")
    lines = []
    argv = [
        *("--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run")),
        *("--base-steps", "3", "--base-width", "64", "--base-layers", "1"),
        *("--base-docs", "300", "--steps", "3", "--batch-size", "4", "--records", "40"),
        *("--prompts", "5", "--max-new-tokens", "3"),
    ]
    with jax.numpy_dtype_promotion("standard"):
        out = serve.main(argv, log=lines.append)
    # rows cycle through the base and the three adapters; every row's tokens are those
    # of its adapter alone, merged (greedy decoding of the same function)
    assert list(out["ids"]) == [-1, 0, 1, 2, -1]
    assert out["same"] == 5 and all(row[3] for row in out["rows"])
    assert [row[0] for row in out["rows"]] == ["base", "answer", "is", "see", "base"]
    # the three adapters were saved, loaded back and stacked in order
    assert serve.stacked_names(out["stacked"]) == ("answer", "is", "see")
    assert list(out["loaded"]) == ["answer", "is", "see"]
    assert any(line.startswith("one generate call, 5 prompts") for line in lines)


def test_the_serving_benchmark_runs_every_candidate_and_mixed_rows_match():
    bench = _load("serve", "benchmarks")
    out = bench.main(["--quick", "--no-write"])
    expected = {"merged", "single"} | {f"mixed {n}" for n in out["counts"]}
    if importlib.util.find_spec("peft") is not None:  # PEFT is in the [torch] extra
        expected |= {"peft single"} | {f"peft mixed {n}" for n in out["counts"]}
    assert set(out["per_token"]) == expected
    assert all(t > 0 for t in out["per_token"].values())
    assert out["same_as_single"]  # one adapter stacked: the tokens of that adapter
