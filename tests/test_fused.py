"""Chosen parts of a fused kernel adapted alone (`LoraConfig(fused=...)`): q and v of a
GPT-2-style `c_attn [d, 3d]` and of a gemma-style `qkv_einsum [3, N, D, H]`, checked
against a NumPy update written per part, the merged model, unmerge, and shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from foreign_models import gemma_forward, gemma_params
from helpers import chain_bound, gamma
from jax.sharding import NamedSharding, PartitionSpec

import jlora

D, R = 8, 2


def _gpt2(key=0):
    return {"c_attn": {"kernel": jax.random.normal(jax.random.key(key), (D, 3 * D))}}


def _random_factors(lp, key=5):
    """Random `a` and `b` (a fresh `b` is 0, which would hide a wrong part)."""
    adapters, base = jlora.split(lp)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jlora.combine(jax.tree.unflatten(treedef, leaves), base)


def _attn(p, x):
    q, k, v = jnp.split(x @ p["c_attn"]["kernel"], 3, axis=-1)
    return jnp.tanh(q) * jax.nn.sigmoid(k) + v


CFG = jlora.LoraConfig(
    R, 4, fused={"c_attn/kernel$": jlora.Fused(axis=1, parts=3, adapt=(0, 2))}
)


def test_only_the_chosen_parts_of_a_fused_kernel_change_each_with_its_own_pair():
    p = _gpt2()
    lp = _random_factors(jlora.init(jax.random.key(1), p, CFG))
    lw = lp["c_attn"]["kernel"]
    assert lw.a.shape == (D, 2 * R) and lw.b.shape == (2 * R, D)  # one pair per part
    w = np.asarray(p["c_attn"]["kernel"], np.float64)
    a, b = np.asarray(lw.a, np.float64), np.asarray(lw.b, np.float64)
    want = w.copy()  # the reference MergedLinear: q and v updated, k untouched
    want[:, :D] += lw.scale * a[:, :R] @ b[:R]
    want[:, 2 * D :] += lw.scale * a[:, R:] @ b[R:]
    merged = np.asarray(jlora.merge(lp)["c_attn"]["kernel"], np.float64)
    np.testing.assert_array_equal(merged[:, D : 2 * D], w[:, D : 2 * D])
    bound = (gamma(R + 1) + 2.0**-24) * (
        np.abs(w).max() + lw.scale * (np.abs(a) @ np.abs(b)).max()
    )
    assert np.max(np.abs(merged - want)) <= 2 * bound
    back = jlora.unmerge(jlora.merge(lp), jlora.split(lp)[0])["c_attn"]["kernel"].w
    assert np.max(np.abs(np.asarray(back, np.float64) - w)) <= 4 * bound


def test_fused_parts_run_factored_and_train_like_the_merged_model():
    lp = _random_factors(jlora.init(jax.random.key(1), _gpt2(), CFG))
    x = jax.random.normal(jax.random.key(2), (4, D))
    got = jax.jit(jlora.lora(_attn, strict=True))(lp, x)
    want = _attn(jlora.merge(lp), x)
    assert np.max(np.abs(got - want)) <= chain_bound(D + 2 * R, 3) * np.max(np.abs(want))
    eager = jlora.lora(_attn, strict=True)(lp, x)
    assert np.max(np.abs(eager - want)) <= chain_bound(D + 2 * R, 3) * np.max(np.abs(want))
    adapters, base = jlora.split(lp)

    def loss(ad, f):
        return jnp.sum(jnp.sin(f(jlora.combine(ad, base), x)))

    g = jax.grad(loss)(adapters, jlora.lora(_attn, strict=True))
    g_ref = jax.grad(loss)(adapters, lambda p, x: _attn(jlora.merge(p), x))
    for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        scale = max(float(jnp.max(jnp.abs(v))), 1e-30)
        assert float(jnp.max(jnp.abs(u - v))) <= chain_bound(3 * D, 6) * scale


def test_gemma_fused_qkv_adapts_q_and_v_on_its_own_part_axis():
    params = gemma_params(jax.random.key(0))
    ids = jnp.array([[1, 4, 2, 7]])
    config = jlora.LoraConfig(
        R,
        4,
        targets="qkv_einsum/w$",
        fused={"qkv_einsum": jlora.Fused(axis=0, parts=3, adapt=(0, 2))},
    )
    lp = jlora.init(
        jax.random.key(1), params, config, probe=lambda p: gemma_forward(p, ids)
    )
    lw = lp["layer_0"]["attn"]["qkv_einsum"]["w"]
    assert lw.layout == jlora.Layout((2,), (0, 1, 3), fused=jlora.Fused(0, 3, (0, 2)))
    assert lw.b.shape == (2 * R, 1, 2, 4)
    lp = _random_factors(lp)
    lw = lp["layer_0"]["attn"]["qkv_einsum"]["w"]
    w = np.asarray(lw.w, np.float64)
    a, b = np.asarray(lw.a, np.float64), np.asarray(lw.b, np.float64)
    merged = np.asarray(jlora.merge(lp)["layer_0"]["attn"]["qkv_einsum"]["w"], np.float64)
    np.testing.assert_array_equal(merged[1], w[1])  # k untouched
    for part, j in ((0, 0), (2, 1)):
        delta = lw.scale * np.einsum(
            "dr,rnh->ndh", a[:, j * R : (j + 1) * R], b[j * R : (j + 1) * R, 0]
        )
        np.testing.assert_allclose(
            merged[part],
            w[part] + delta,
            rtol=0,
            atol=1e-5 * (np.abs(w).max() + np.abs(delta).max()),
        )
    got = jlora.lora(gemma_forward, strict=True)(lp, ids)
    want = gemma_forward(jlora.merge(lp), ids)
    assert np.max(np.abs(got - want)) <= chain_bound(16, 8) * np.max(np.abs(want))


def test_fused_factors_shard_like_the_kernel_under_a_mesh():
    mesh = jax.make_mesh((2,), ("tp",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        p = jax.tree.map(
            lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "tp"))),
            _gpt2(),
        )
        lp = _random_factors(jlora.init(jax.random.key(1), p, CFG))
        specs = jlora.adapter_specs(lp)["c_attn"]["kernel"]
        assert specs.a == PartitionSpec(None, None)
        assert specs.b == PartitionSpec(None, "tp")
        x = jnp.ones((4, D))
        got = jax.jit(jlora.lora(_attn, strict=True))(lp, x)
        want = _attn(jlora.merge(lp), x)
        assert np.max(np.abs(got - want)) <= chain_bound(D + 2 * R, 3) * np.max(
            np.abs(want)
        )


@pytest.mark.parametrize(
    "fused, match",
    [
        (jlora.Fused(axis=0, parts=3, adapt=(0,)), "fused axis 0 must be one of the out"),
        (jlora.Fused(axis=1, parts=5, adapt=(0,)), "24 is not a multiple"),
    ],
)
def test_fused_parts_that_do_not_fit_the_kernel_are_refused_by_path(fused, match):
    with pytest.raises(ValueError, match=f"c_attn/kernel: .*{match}"):
        jlora.init(
            jax.random.key(1), _gpt2(), jlora.LoraConfig(R, 4, fused={"c_attn": fused})
        )


def test_fused_arguments_are_checked():
    with pytest.raises(ValueError, match="distinct parts in increasing order"):
        jlora.Fused(1, 3, (2, 0))
    with pytest.raises(ValueError, match="parts must be at least 2"):
        jlora.Fused(1, 1, (0,))
    with pytest.raises(TypeError, match="LoraConfig: fused"):
        jlora.LoraConfig(2, 4, fused={"c_attn": (1, 3, (0, 2))})


def test_fused_parts_survive_an_adapter_checkpoint_and_export_to_peft_exactly(tmp_path):
    import json
    import os

    from jlora import _safetensors

    p = _gpt2()
    lp = _random_factors(jlora.init(jax.random.key(1), p, CFG))
    jlora.save_adapter(tmp_path / "ad", lp, CFG)
    back = jlora.load_adapter(tmp_path / "ad", p)["c_attn"]["kernel"]
    lw = lp["c_attn"]["kernel"]
    assert back.layout == lw.layout and back.layout.fused == jlora.Fused(1, 3, (0, 2))
    np.testing.assert_array_equal(back.b, lw.b)

    # PEFT has no per-part LoRA: the export is the equivalent rank-2r LoRA of the whole
    # module, with zeros where k is not adapted. PEFT computes scale * B @ A from it.
    jlora.save_peft(tmp_path / "peft", lp, CFG)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    t, _ = _safetensors.load(os.path.join(tmp_path / "peft", "adapter_model.safetensors"))
    a = t["base_model.model.c_attn.lora_A.weight"].astype(np.float64)
    b = t["base_model.model.c_attn.lora_B.weight"].astype(np.float64)
    r = cfg["rank_pattern"].get("c_attn", cfg["r"])
    alpha = cfg["alpha_pattern"].get("c_attn", cfg["lora_alpha"])
    assert r == 2 * R
    delta = (alpha / r) * b @ a  # PyTorch's [out, in]
    want = np.asarray(jlora.merge(lp)["c_attn"]["kernel"], np.float64) - np.asarray(
        p["c_attn"]["kernel"], np.float64
    )
    np.testing.assert_array_equal(delta[D : 2 * D], 0)
    scale = np.abs(want).max()
    assert np.max(np.abs(delta.T - want)) <= 4 * (gamma(2 * R + 1) + 2.0**-24) * (
        scale + np.abs(np.asarray(p["c_attn"]["kernel"])).max()
    )
