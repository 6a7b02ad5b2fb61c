"""A quantized frozen base (QLoRA's NF4 with double quantization, int8): the format
against its definition and its error bound, the transform on it against the merged
dequantized model, memory of a scanned training step, and the Linen and NNX routes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close, chain_bound

import jlora
from jlora import _quant

# The NF4 values as published with the QLoRA paper (bitsandbytes' table, Appendix E).
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def test_nf4_codebook_is_the_papers():
    book = _quant.nf4_codebook()
    assert book.shape == (16,) and np.all(np.diff(book) > 0)
    assert book[0] == -1 and book[-1] == 1 and book[7] == 0  # ends and an exact zero
    assert (book < 0).sum() == 7 and (book > 0).sum() == 8  # the asymmetric halves
    np.testing.assert_allclose(book, NF4_PUBLISHED, atol=2e-7)


def _block_absmax(w, axis, block):
    x = np.moveaxis(np.asarray(w, np.float64), axis, -1)
    x = x.reshape(*x.shape[:-1], -1, block)
    a = np.abs(x).max(-1, keepdims=True)
    return np.moveaxis(
        np.broadcast_to(a, x.shape).reshape(np.moveaxis(w, axis, -1).shape), -1, axis
    )


@pytest.mark.parametrize("double", [True, False])
def test_nf4_error_is_within_the_formats_bound(double):
    w = normal(0, (512, 256))
    q = jlora.quantize({"kernel": w}, "nf4", double_quant=double)["kernel"]
    assert q.kind == "nf4" and q.codes.dtype == jnp.uint8 and q.codes.shape == (256, 256)
    dq = np.asarray(q.dequantize(), np.float64)
    absmax = _block_absmax(w, q.axis % 2, 64)
    # Each element is its block's absmax times the nearest code: off by at most half
    # the widest gap between codes; with double quantization the absmax itself is off
    # by at most half a step of 255 over its block of 256 absmaxes.
    half_gap = np.max(np.diff(NF4_PUBLISHED)) / 2
    second = np.max(absmax) / 510 if double else 0.0
    err = np.abs(dq - np.asarray(w, np.float64))
    bound = half_gap * absmax + second + 1e-6 * absmax
    assert np.all(err <= bound), float(np.max(err - bound))
    rel = np.linalg.norm(dq - np.asarray(w)) / np.linalg.norm(np.asarray(w))
    assert 0.01 < rel < 0.12  # NF4 on Gaussian blocks of 64: about 0.09
    bits = 8 * q.nbytes / w.size
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) if double else 4.5)


def test_int8_error_is_within_half_a_step():
    w = normal(1, (128, 192))
    q = jlora.quantize({"kernel": w}, "int8")["kernel"]
    dq = np.asarray(q.dequantize(), np.float64)
    absmax = _block_absmax(w, q.axis % 2, 64)
    err = np.abs(dq - np.asarray(w, np.float64))
    assert np.all(err <= absmax / 254 + 1e-6 * absmax)
    assert 8 * q.nbytes / w.size == pytest.approx(8 + 32 / 64)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(128, name="up")(x))
        return nn.Dense(64, name="down")(h) + nn.Dense(64, name="skip")(x)


def _setup(kind="nf4"):
    m = MLP()
    x = normal(0, (4, 64))
    params = m.init(jax.random.key(0), x)["params"]
    cfg = jlora.LoraConfig(4, 8, targets=r"(up|down)/kernel$")  # skip: quantized, plain
    lp = jlora.init(jax.random.key(1), jlora.quantize(params, kind), cfg)
    adapters, base = jlora.split(lp)
    adapters = jax.tree.map(lambda t: t + 0.05 * normal(2, t.shape), adapters)
    return m, x, adapters, base


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_on_a_quantized_base_equals_the_dequantized_merged_model(kind):
    m, x, adapters, base = _setup(kind)
    assert isinstance(base["skip"]["kernel"], jlora.Quantized)  # quantized, not adapted
    assert isinstance(base["up"]["kernel"], jlora.Quantized)  # split's base: the kernel
    apply = jlora.lora(m.apply, strict=True)

    def loss(ad):
        return jnp.sum(apply({"params": jlora.combine(ad, base)}, x) ** 2)

    def loss_ref(ad):
        p = jlora.merge(jlora.dequantize(jlora.combine(ad, base)))
        return jnp.sum(m.apply({"params": p}, x) ** 2)

    out = apply({"params": jlora.combine(adapters, base)}, x)
    ref = m.apply(
        {"params": jlora.merge(jlora.dequantize(jlora.combine(adapters, base)))}, x
    )
    assert_close(out, ref, chain_bound(128, 3))
    assert_close(
        jax.jit(apply)({"params": jlora.combine(adapters, base)}, x),
        ref,
        chain_bound(128, 3),
    )
    g, g_ref = jax.grad(loss)(adapters), jax.grad(loss_ref)(adapters)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert_close(a, b, chain_bound(128, 7))
    used = jlora.explain(m.apply, {"params": jlora.combine(adapters, base)}, x)
    assert all(r and not any(u.startswith("materialize") for u in r) for r in used.values())


def test_merge_refuses_a_quantized_base_and_save_merged_writes_float(tmp_path):
    m, x, adapters, base = _setup()
    lp = jlora.combine(adapters, base)
    with pytest.raises(ValueError, match="quantized.*jlora.dequantize"):
        jlora.merge(lp)
    jlora.save_merged(tmp_path / "merged", lp)
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        restored = ck.restore(tmp_path / "merged")
    want = jlora.merge(jlora.dequantize(lp))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and jnp.issubdtype(a.dtype, jnp.floating)
        np.testing.assert_array_equal(a, b)


def test_bad_input_names_the_path():
    p = {"ok": {"kernel": normal(0, (128, 64))}, "odd": {"kernel": normal(1, (30, 50))}}
    with pytest.warns(UserWarning, match="odd/kernel.*block_size=64"):
        q = jlora.quantize(p)  # the default selection: stays float, said so
    assert not isinstance(q["odd"]["kernel"], jlora.Quantized)
    with pytest.raises(ValueError, match="odd/kernel.*block_size=64"):
        jlora.quantize(p, targets="odd")
    with pytest.raises(ValueError, match="kind must be one of"):
        jlora.quantize(p, "fp8")
    with pytest.raises(ValueError, match="ids.*not a floating kernel"):
        jlora.quantize({"ids": jnp.zeros((64, 64), jnp.int32)}, targets="ids")
    q = jlora.quantize(p, targets="ok")
    assert isinstance(q["ok"]["kernel"], jlora.Quantized) and not isinstance(
        q["odd"]["kernel"], jlora.Quantized
    )


def _stack_step(layers, quantized, d=256):
    """The compiled LoRA training step of a scanned stack of `layers` d x d kernels."""
    w = normal(0, (layers, d, d)) / np.sqrt(d)
    cfg = jlora.LoraConfig(4, 8, layout={"w": jlora.Layout((1,), (2,), (0,))})
    base = {"w": jlora.quantize({"w": w}, targets="w")["w"] if quantized else w}
    lp = jlora.init(jax.random.key(1), base, cfg)
    adapters, frozen = jlora.split(lp)
    x = normal(2, (16, d))

    def fwd(p, x):
        return jax.lax.scan(lambda h, k: (jnp.tanh(h @ k), None), x, p["w"])[0]

    def loss(ad, frozen):
        return jnp.sum(jlora.lora(fwd)(jlora.combine(ad, frozen), x) ** 2)

    return jax.jit(jax.grad(loss)).lower(adapters, frozen).compile()


def test_a_scanned_step_holds_one_dequantized_kernel_at_a_time():
    d = 256
    kernel = d * d * 4
    for layers in (2, 8):
        float_temp = _stack_step(layers, False, d).memory_analysis().temp_size_in_bytes
        quant_temp = _stack_step(layers, True, d).memory_analysis().temp_size_in_bytes
        # The backward pass dequantizes again instead of keeping each layer's kernel.
        assert quant_temp <= float_temp + kernel * 1.1, (layers, quant_temp, float_temp)


# NNX -------------------------------------------------------------------------------------


class Net(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(64, 128, rngs=rngs)
        self.down = nnx.Linear(128, 64, rngs=rngs)

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


def test_nnx_model_quantized_then_adapted():
    x = normal(0, (4, 64))
    model = jlora.quantize(Net(nnx.Rngs(0)))
    assert isinstance(model.up.kernel.get_raw_value(), jlora.Quantized)
    plain = jlora.dequantize(nnx.clone(model))  # the same model with float kernels
    assert_close(model(x), plain(x), chain_bound(128, 2))  # runs dequantized at use
    jlora.nnx.apply(model, jlora.LoraConfig(4, 8), rngs=nnx.Rngs(1), strict=True)
    for layer in (model.up, model.down):
        v = layer.kernel_lora_b
        v.set_raw_value(0.05 * normal(3, v.shape))
    ref = jlora.nnx.merge_and_unload(jlora.dequantize(nnx.clone(model)))
    assert_close(model(x), ref(x), chain_bound(128, 3))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(
        model
    )
    assert np.asarray(grads["up"]["kernel_lora_a"][...]).any()
    with pytest.raises(ValueError, match="quantized"):
        jlora.nnx.merge(model)


def test_sharded_quantized_kernels_keep_their_shardings_under_the_mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.make_mesh(
        (2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    with jax.set_mesh(mesh):
        spec = jax.P("data", "model")
        w = jax.device_put(normal(0, (128, 256)), spec)
        q = jlora.quantize({"kernel": w})["kernel"]
        assert q.codes.sharding.spec == spec and q.absmax.sharding.spec == spec
        lp = jlora.init(jax.random.key(1), {"kernel": q}, jlora.LoraConfig(4, 8))
        assert lp["kernel"].a.sharding.spec == jax.P("data", None)  # the kernel's axes
        assert lp["kernel"].b.sharding.spec == jax.P(None, "model")
        adapters, base = jlora.split(lp)
        adapters = jax.tree.map(lambda t: t + 0.05, adapters)
        lp = jlora.combine(adapters, base)
        x = jax.device_put(normal(2, (8, 128)), jax.P("data", None))
        f = jlora.lora(lambda p, x: x @ p["kernel"], strict=True)
        ref = x @ jlora.merge(jlora.dequantize(lp))["kernel"]
        for y in (f(lp, x), jax.jit(f)(lp, x)):
            assert_close(y, ref, chain_bound(128, 1))
            assert y.sharding.spec == spec


def test_a_quantized_base_checkpoints_exactly_and_adapters_load_onto_it(tmp_path):
    import orbax.checkpoint as ocp

    base = jlora.quantize({"kernel": normal(0, (128, 64)), "bias": jnp.zeros(64)})
    lp = jlora.init(jax.random.key(1), base, jlora.LoraConfig(4, 8))
    jlora.save_adapter(tmp_path / "ad", lp)
    back = jlora.load_adapter(tmp_path / "ad", base, base_mismatch="error")
    assert isinstance(back["kernel"].w, jlora.Quantized)
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "base", base)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
    with ocp.StandardCheckpointer() as ck:
        restored = ck.restore(tmp_path / "base", abstract)
    assert isinstance(restored["kernel"], jlora.Quantized)
    assert restored["kernel"].kind == "nf4" and restored["kernel"].shape == (128, 64)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(base)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
