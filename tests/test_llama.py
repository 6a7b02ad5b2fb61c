"""The Llama-family model of the main job: its forward against a NumPy reference that
reads Hugging Face tensors directly and against `transformers` (with the `[torch]`
extra), cached generation, the directory loader's errors, and `examples/alpaca.py` on a
tiny random Llama checkpoint with `--export-peft` and `--init-adapter`."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, chain_bound, randomize_torch

import jlora
from jlora import _safetensors

pytest.importorskip("tokenizers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from instruct import base, llama, world  # noqa: E402
from instruct.model import generate  # noqa: E402

HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "peft", "transformers"))
needs_torch = pytest.mark.skipif(
    not HAVE_TORCH, reason="needs the [torch] extra (torch, peft, transformers)"
)

HF = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 320,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000.0,
    "tie_word_embeddings": False,
    "eos_token_id": 0,
}


def random_tensors(cfg: llama.LlamaConfig, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (
            1.0 + 0.1 * rng.standard_normal(shape)
            if name.endswith("norm.weight")
            else 0.2 * rng.standard_normal(shape)
        ).astype(np.float32)
        for name, (_, shape, _) in llama._table(cfg).items()
    }


def numpy_llama(t: dict, cfg: llama.LlamaConfig, ids: np.ndarray) -> np.ndarray:
    """Llama's forward in float64 NumPy, straight from the Hugging Face tensors
    (biases where the tensors have them, the attention window of each layer)."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    h, kv, hd = cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head
    b, n = ids.shape

    def norm(x, w):
        return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)

    def rope(x):  # [b, n, heads, hd]
        inv = cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)
        ang = np.arange(n)[:, None] * inv[None]  # [n, hd/2]
        cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def linear(x, name):  # an nn.Linear, with its bias where the file has one
        return x @ t[name + ".weight"].T + t.get(name + ".bias", 0.0)

    x = t["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        y = norm(x, t[p + "input_layernorm.weight"])
        q = rope(linear(y, p + "self_attn.q_proj").reshape(b, n, h, hd))
        k = rope(linear(y, p + "self_attn.k_proj").reshape(b, n, kv, hd))
        v = linear(y, p + "self_attn.v_proj").reshape(b, n, kv, hd)
        group = h // kv
        s = np.einsum("bqhd,bkhd->bhqk", q, k[:, :, np.arange(h) // group]) / np.sqrt(hd)
        w = cfg.window(i) or n
        s = np.where(
            np.tril(np.ones((n, n), bool)) & np.triu(np.ones((n, n), bool), 1 - w),
            s,
            -np.inf,
        )
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", s, v[:, :, np.arange(h) // group])
        x = x + linear(o.reshape(b, n, h * hd), p + "self_attn.o_proj")
        y = norm(x, t[p + "post_attention_layernorm.weight"])
        gate = y @ t[p + "mlp.gate_proj.weight"].T
        up = y @ t[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T
    return norm(x, t["model.norm.weight"]) @ t["lm_head.weight"].T


@pytest.fixture(scope="module")
def tokenizer():
    return base.train_tokenizer(world.corpus(200), 300)


def write_llama(path: pathlib.Path, tensors, hf: dict, tokenizer) -> str:
    path.mkdir(parents=True, exist_ok=True)
    _safetensors.save(str(path / "model.safetensors"), tensors, {"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf))
    tokenizer.save(str(path / "tokenizer.json"))
    return str(path)


def test_llama_forward_matches_a_numpy_reference(tmp_path, tokenizer):
    hf = dict(HF, vocab_size=tokenizer.get_vocab_size())
    cfg = llama.LlamaConfig.from_hf(hf)
    tensors = random_tensors(cfg)
    loaded_cfg, params, _ = llama.load(write_llama(tmp_path / "m", tensors, hf, tokenizer))
    assert loaded_cfg == cfg and cfg.kv_heads == 2 and cfg.n_positions == 320
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12))
    ours = llama.LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids))
    # float32 against float64: per layer two norms, q/k/v, rotary, scores, softmax,
    # values, o, gate/up/down (<= 48 terms); then the final norm and the head.
    assert_close(ours, numpy_llama(tensors, cfg, ids), chain_bound(48, 2 * 12 + 3))


SLIDING = {
    # Mistral: every layer slides once sliding_window is set.
    "mistral": dict(HF, model_type="mistral", sliding_window=3),
    # Qwen2: only with use_sliding_window, and only from layer max_window_layers on.
    "qwen2": dict(
        HF, model_type="qwen2", use_sliding_window=True, sliding_window=3,
        max_window_layers=1,
    ),
}  # fmt: skip
WINDOWS = {"mistral": [3, 3], "qwen2": [None, 3]}  # each layer's window, as configured


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_window_matches_a_numpy_reference(tmp_path, tokenizer, family):
    hf = dict(SLIDING[family], vocab_size=tokenizer.get_vocab_size())
    cfg = llama.LlamaConfig.from_hf(hf)
    assert [cfg.window(i) for i in range(cfg.num_hidden_layers)] == WINDOWS[family]
    tensors = random_tensors(cfg)  # with Qwen2's q/k/v biases
    _, params, _ = llama.load(write_llama(tmp_path / family, tensors, hf, tokenizer))
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12))
    ours = llama.LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids))
    assert_close(ours, numpy_llama(tensors, cfg, ids), chain_bound(48, 2 * 12 + 3))
    # The window matters: full attention gives other logits past the window.
    full = numpy_llama(tensors, dataclasses.replace(cfg, sliding_window=None), ids)
    assert np.abs(np.asarray(ours)[:, 3:] - full[:, 3:]).max() > 1e-2
    assert_close(ours[:, :3], full[:, :3], chain_bound(48, 2 * 12 + 3))


def test_sliding_window_config_errors():
    bad = dict(SLIDING["qwen2"], layer_types=["sliding_attention", "local"])
    with pytest.raises(llama.CheckpointError, match="layer_types .* 'local'"):
        llama.LlamaConfig.from_hf(bad)
    # Llama never slides; Qwen2 without use_sliding_window doesn't either.
    assert llama.LlamaConfig.from_hf(dict(HF, sliding_window=3)).window(0) is None
    off = dict(SLIDING["qwen2"], use_sliding_window=False)
    assert llama.LlamaConfig.from_hf(off).sliding_window is None


def test_llama_loader_lists_every_problem(tmp_path, tokenizer):
    hf = dict(HF, vocab_size=tokenizer.get_vocab_size())
    cfg = llama.LlamaConfig.from_hf(hf)
    good = random_tensors(cfg)
    bad = dict(good)
    del bad["model.layers.1.mlp.up_proj.weight"]
    bad["model.norm.weight"] = bad["model.norm.weight"][:5]
    bad["model.layers.9.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(llama.CheckpointError) as e:
        llama.load(write_llama(tmp_path / "bad", bad, hf, tokenizer))
    text = str(e.value)
    assert "missing: model.layers.1.mlp.up_proj.weight" in text
    assert "misshaped: model.norm.weight is [5]" in text
    assert "unexpected: model.layers.9.extra.weight" in text
    path = write_llama(tmp_path / "nofile", good, hf, tokenizer)
    (tmp_path / "nofile" / "tokenizer.json").unlink()
    with pytest.raises(llama.CheckpointError, match="lacks tokenizer.json"):
        llama.load(path)
    scaled = dict(hf, rope_scaling={"rope_type": "yarn", "factor": 8.0})
    with pytest.raises(llama.CheckpointError, match="rope type 'yarn' is not supported"):
        llama.load(write_llama(tmp_path / "yarn", good, scaled, tokenizer))
    scaled = dict(hf, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(llama.CheckpointError, match="needs 'low_freq_factor'"):
        llama.load(write_llama(tmp_path / "l3", good, scaled, tokenizer))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_llama_cached_generation_equals_full_recompute(family):
    cfg = llama.LlamaConfig.from_hf(dict(SLIDING.get(family, HF), vocab_size=40))
    model = llama.LlamaForCausalLM(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x * 8 if x.ndim == 2 else x, params)  # sharper
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    got = generate(model.apply, params, cfg, prompts, max_new_tokens=5)

    @jax.jit
    def last_logits(seq, n):
        return model.apply({"params": params}, seq)[0, n - 1]

    for prompt, new in zip(prompts, got):
        seq = list(prompt)
        for _ in range(5):
            nxt = int(
                jnp.argmax(last_logits(jnp.array([seq + [0] * (16 - len(seq))]), len(seq)))
            )
            if nxt == cfg.eos_token_id:
                break
            seq.append(nxt)
        assert new == seq[len(prompt) :]


@pytest.fixture(scope="module")
def torch_llama_dir(tmp_path_factory, tokenizer):
    if not HAVE_TORCH:
        pytest.skip("needs the [torch] extra (torch, peft, transformers)")
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaConfig(
        **{k: v for k, v in HF.items() if k not in ("model_type", "architectures")},
        vocab_size=tokenizer.get_vocab_size(),
        attn_implementation="eager",
    )
    tm = transformers.LlamaForCausalLM(hf).eval()
    path = tmp_path_factory.mktemp("llama")
    tm.save_pretrained(str(path))
    tokenizer.save(str(path / "tokenizer.json"))
    return str(path), tm


def _alpaca():
    spec = importlib.util.spec_from_file_location("alpaca", ROOT / "examples" / "alpaca.py")
    alpaca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alpaca)
    return alpaca


def _argv(tmp_path, model_dir, name, steps):
    return [
        "--model-path", model_dir, "--output-dir", str(tmp_path / name),
        "--steps", str(steps), "--batch-size", "4", "--val-set-size", "4",
        "--score-records", "2", "--max-new-tokens", "2", "--save-every", "100",
        "--eval-every", "100", "--num-examples", "1",
    ]  # fmt: skip


def _torch_logits(m, ids):
    import torch

    with torch.no_grad():
        return m(torch.tensor(np.asarray(ids))).logits.numpy()


@needs_torch
def test_llama_matches_transformers(torch_llama_dir):
    path, tm = torch_llama_dir
    cfg, params, _ = llama.load(path)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    ours = llama.LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids))
    assert_close(ours, _torch_logits(tm, ids), chain_bound(48, 2 * 12 + 3))


@needs_torch
def test_llama3_rope_scaling_matches_transformers():
    import torch
    import transformers

    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    hf = transformers.LlamaConfig(
        **{k: v for k, v in HF.items() if k not in ("model_type", "architectures")},
        vocab_size=64,
        rope_scaling=rope,
        attn_implementation="eager",
    )
    tm = transformers.LlamaForCausalLM(hf).eval()
    cfg = llama.LlamaConfig.from_hf(hf.to_dict())
    assert cfg.rope_llama3 == (8.0, 1.0, 4.0, 64)
    # head_dim 8, theta 1000: wavelengths 6.3 (kept), 35 (interpolated), 199 and 1117
    # (divided by the factor): every branch of the scaling is used.
    params = llama.hf_to_params({k: v.numpy() for k, v in tm.state_dict().items()}, cfg)
    ids = np.random.default_rng(0).integers(0, 64, (2, 40))
    ours = llama.LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids))
    assert_close(ours, _torch_logits(tm, ids), chain_bound(48, 2 * 12 + 3))


@needs_torch
@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_window_matches_transformers(family):
    import torch
    import transformers

    torch.manual_seed(0)
    kind = {"mistral": "Mistral", "qwen2": "Qwen2"}[family]
    hf = getattr(transformers, f"{kind}Config")(
        **{
            k: v
            for k, v in SLIDING[family].items()
            if k not in ("model_type", "architectures")
        },
        vocab_size=64,
        attn_implementation="eager",
    )
    tm = getattr(transformers, f"{kind}ForCausalLM")(hf).eval()
    randomize_torch(tm, lambda name: "norm" not in name, seed=0, scale=0.2)
    cfg = llama.LlamaConfig.from_hf(hf.to_dict())
    assert [cfg.window(i) for i in range(cfg.num_hidden_layers)] == WINDOWS[family]
    params = llama.hf_to_params({k: v.numpy() for k, v in tm.state_dict().items()}, cfg)
    ids = np.random.default_rng(0).integers(0, 64, (2, 12))
    ours = llama.LlamaForCausalLM(cfg).apply({"params": params}, jnp.asarray(ids))
    assert_close(ours, _torch_logits(tm, ids), chain_bound(48, 2 * 12 + 3))


@needs_torch
def test_main_job_on_llama_exports_and_imports_peft(tmp_path, torch_llama_dir):
    import peft

    path, tm = torch_llama_dir
    alpaca = _alpaca()
    lines: list[str] = []
    peft_dir = str(tmp_path / "peft")
    with jax.numpy_dtype_promotion("standard"):
        out = alpaca.main(
            [*_argv(tmp_path, path, "run", 3), "--export-peft", peft_dir], log=lines.append
        )
    text = "\n".join(lines)
    assert "model: Llama-family, 2 layers x 32, 4 heads (2 key/value)" in text
    assert f"PEFT adapter written to {peft_dir}" in text
    assert "kernels at learning rate 0.001;" in text  # a checkpoint's default rate
    cfg = llama.LlamaConfig.from_hf(tm.config.to_dict())
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12))
    model = llama.LlamaForCausalLM(cfg)
    ours = jlora.lora(model.apply)({"params": out["params"]}, jnp.asarray(ids))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tm), peft_dir).eval()
    assert_close(ours, _torch_logits(pm, ids), chain_bound(48, 2 * 14 + 3))

    # A PEFT-made adapter (random lora_B) to start from: training continues from it.
    made = peft.get_peft_model(
        copy.deepcopy(tm),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    randomize_torch(made, lambda n: "lora_B" in n, seed=1)
    made.save_pretrained(str(tmp_path / "made"))
    _, params, _ = llama.load(path)
    start = jlora.load_peft(
        tmp_path / "made", params, probe=lambda p: model.apply({"params": p}, ids)
    )
    lines.clear()
    with jax.numpy_dtype_promotion("standard"):
        out = alpaca.main(
            [*_argv(tmp_path, path, "cont", 2), "--init-adapter", str(tmp_path / "made")],
            log=lines.append,
        )
    assert any("started from the PEFT adapter" in line for line in lines)
    assert any("LoRA: r=4, scale 2 on" in line for line in lines)  # the file's, not 8
    # The saved adapter does not claim --lora-r's settings (r=8) it was not trained with.
    assert jlora.read_adapter_metadata(out["adapter_dir"])["config"] is None
    q0 = start["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    q = out["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.rank == 4 and q.scale == 2.0
    moved = float(jnp.max(jnp.abs(q.b - q0.b)))
    # Two AdamW steps at lr <= 1e-3 (warming up) move each entry by well under 0.01; a
    # fresh start (b = 0) would be ~0.1 away from the file's b.
    assert 0.0 < moved < 0.01 < float(jnp.max(jnp.abs(q0.b)))


@needs_torch
def test_a_mixed_batch_matches_peft_adapter_names(tmp_path, torch_llama_dir):
    # Three PEFT adapters of different ranks and targets-in-common on one transformers
    # Llama; PEFT serves a mixed batch with adapter_names= (its loop over sub-batches),
    # jlora loads each file, stacks them and serves the same batch in one call.
    import peft

    path, tm = torch_llama_dir
    targets = ["q_proj", "v_proj", "down_proj"]
    pm = peft.get_peft_model(
        copy.deepcopy(tm), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets)
    )
    pm.add_adapter("two", peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    pm.add_adapter("three", peft.LoraConfig(r=3, lora_alpha=9, target_modules=targets))
    randomize_torch(pm, lambda n: "lora_" in n, seed=3)
    pm.eval()
    cfg, params, _ = llama.load(path)
    model = llama.LlamaForCausalLM(cfg)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (5, 10))
    loaded = {}
    for name in ("default", "two", "three"):
        pm.save_pretrained(str(tmp_path / name), selected_adapters=[name])
        where = tmp_path / name / (name if name != "default" else "")
        lp = jlora.load_peft(where, params, probe=lambda p: model.apply({"params": p}, ids))
        loaded[name] = jlora.split(lp)[0]
    stacked = jlora.stack_adapters(loaded)
    rows = ["two", "__base__", "default", "three", "two"]
    import torch

    with torch.no_grad():
        theirs = pm(torch.tensor(ids), adapter_names=rows).logits.numpy()
    names = [None if r == "__base__" else r for r in rows]
    served = {"params": jlora.combine(stacked, params)}
    ours = jlora.lora(model.apply, adapter_ids=names)(served, jnp.asarray(ids))
    assert_close(ours, theirs, chain_bound(48, 2 * 14 + 3))
