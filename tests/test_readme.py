"""Every Python block of the README runs as written, in order, in one namespace that
holds only what the README says the user brings (read from README.md itself)."""

import importlib.util
import pathlib
import re
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close, chain_bound

import jlora

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)
HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "peft", "transformers"))


def python_blocks() -> list[str]:
    return [textwrap.dedent(body) for _, body in BLOCK.findall(README)]


def _uses_torch(block: str) -> bool:
    return bool(re.search(r"^\s*(from|import) (peft|transformers|torch)\b", block, re.M))


class Model(nn.Module):
    """What the training section says the user brings: a Flax Linen model with Dense
    layers named `query` and `value`."""

    @nn.compact
    def __call__(self, x):
        q = nn.Dense(64, name="query")(x)
        v = nn.Dense(64, name="value")(x)
        return nn.Dense(4, name="head")(jnp.tanh(q) * v)


def _brought():
    """The names the README's training section lists, and nothing else."""
    model = Model()
    x = jax.random.normal(jax.random.key(1), (8, 64))
    y = jax.random.randint(jax.random.key(2), (8,), 0, 4)
    base_params = model.init(jax.random.key(0), x)["params"]

    def loss(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    keys = iter(jax.random.split(jax.random.key(3), 1000))
    data = [{"x": x, "y": y}] * 20
    return dict(
        model=model, base_params=base_params, loss=loss, data=data,
        next_key=lambda: next(keys), x=x,
    )  # fmt: skip


def _main_job_export(tmp_path):
    """`BASE` and `runs/peft` as the main job leaves them: a Llama checkpoint (tiny and
    random here, written by transformers) and the PEFT export of an adapter trained on
    it (`--export-peft`: `jlora.save_peft` of the adapted Flax Llama)."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "examples"))
    from instruct import base, llama, world

    torch.manual_seed(0)
    tokenizer = base.train_tokenizer(world.corpus(50), 300)
    hf = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=tokenizer.get_vocab_size(),
        max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    tm = transformers.LlamaForCausalLM(hf).eval()
    path = tmp_path / "BASE"
    tm.save_pretrained(str(path))
    tokenizer.save(str(path / "tokenizer.json"))
    cfg, params, _ = llama.load(str(path))
    ids = jnp.arange(6)[None] % cfg.vocab_size
    module = llama.LlamaForCausalLM(cfg)
    config = jlora.LoraConfig(4, 8, targets=r"(q|v)_proj/kernel$")
    lp = jlora.init(jax.random.key(0), params, config)
    adapters, frozen = jlora.split(lp)
    adapters = jax.tree.map(lambda t: t + 0.05, adapters)
    lp = jlora.combine(adapters, frozen)
    jlora.save_peft(tmp_path / "runs" / "peft", lp, config, task_type="CAUSAL_LM")
    ours = jlora.lora(module.apply)({"params": lp}, ids)
    return str(path), tm, ids, np.asarray(ours)


@jax.numpy_dtype_promotion("standard")  # a user's JAX, not the suite's strict setting
def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 4, "the README's Python blocks were not found"
    monkeypatch.chdir(tmp_path)
    ns = _brought()
    linen_model = ns["model"]  # (the NNX section names its own model `model`)
    start_loss = float(
        ns["loss"](
            ns["model"].apply({"params": ns["base_params"]}, ns["x"]), ns["data"][0]["y"]
        )
    )
    ran = []
    for block in blocks:
        if _uses_torch(block):
            if not HAVE_TORCH:
                continue  # (the [torch] extra's block; the JAX blocks still run)
            base_dir, tm, ids, ours = _main_job_export(tmp_path)
            ns_torch = {"BASE": base_dir}
            exec(compile(block, "README.md", "exec"), ns_torch)
            import torch

            with torch.no_grad():
                theirs = ns_torch["model"](torch.tensor(np.asarray(ids))).logits.numpy()
            # The PEFT model runs the export: its logits are jlora's (float32 chains).
            scale = np.max(np.abs(ours))
            assert np.max(np.abs(theirs - ours)) <= 1e-4 * scale
            ran.append("torch")
            continue
        exec(compile(block, "README.md", "exec"), ns)
        ran.append("jax")
    assert ran.count("jax") >= 3
    assert ran.count("torch") == (1 if HAVE_TORCH else 0)

    # Training lowered the loss of the merged serving model (b starts at 0, so the
    # adapted model started at the base's loss).
    served = linen_model.apply({"params": ns["serving_params"]}, ns["x"])
    assert float(ns["loss"](served, ns["data"][0]["y"])) < start_loss
    # The quantized-base block quantized every kernel (blocks of 64 fit them all).
    assert all(
        isinstance(ns["qbase"][name]["kernel"], jlora.Quantized)
        for name in ("query", "value", "head")
    )
    # The NNX block trained its model, served it plain, and loaded the adapter it saved
    # onto a fresh model that computes the same.
    from flax import nnx

    nnx_served, restored = ns["served"], ns["restored"]
    assert type(nnx_served) is ns["MyModel"] and not nnx.state(nnx_served, nnx.LoRAParam)
    restored.eval()
    want = nnx_served(ns["x"])
    # factored vs merged: rounding of chains of 3 sums of at most 16 terms
    assert_close(restored(ns["x"]), want, chain_bound(16, 3))
    fresh = ns["MyModel"](rngs=nnx.Rngs(0))
    assert float(ns["loss"](want, ns["data"][0]["y"])) < float(
        ns["loss"](fresh(ns["x"]), ns["data"][0]["y"])
    )
    # The checkpoint block restored the latest saved step and its extras.
    assert ns["n"] == 0 and ns["extra"] == {"next_batch": 1}
    # The PEFT block read back what it wrote: the same merged model.
    want = jlora.merge(jlora.load_adapter("run/adapter", ns["base_params"]))
    got = jlora.merge(ns["params"])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_readme_names_only_public_api():
    """Every `jlora.<name>` the README's code uses exists."""
    names = set(re.findall(r"jlora\.([A-Za-z_]\w*)", "\n".join(python_blocks())))
    assert names and not [n for n in names if not hasattr(jlora, n)]


@pytest.mark.parametrize("block", range(len(python_blocks())))
def test_each_readme_block_parses(block):
    compile(python_blocks()[block], "README.md", "exec")
