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
    # the widest gap between codes (times the absmax); with double quantization the
    # absmax itself is off by a relative half step of its group's logarithmic code,
    # (max / min) ** (1 / 508) - 1, max and min over the group (bounded by the whole
    # kernel's), which adds at most that much of the absmax (|code| <= 1).
    half_gap = np.max(np.diff(NF4_PUBLISHED)) / 2
    second = (absmax.max() / absmax.min()) ** (1 / 508) - 1 if double else 0.0
    err = np.abs(dq - np.asarray(w, np.float64))
    bound = (half_gap + second + 1e-6) * absmax
    assert np.all(err <= bound), float(np.max(err - bound))
    rel = np.linalg.norm(dq - np.asarray(w)) / np.linalg.norm(np.asarray(w))
    assert 0.01 < rel < 0.12  # NF4 on Gaussian blocks of 64: about 0.09
    bits = 8 * q.nbytes / w.size
    # codes, one 8-bit absmax per 64, two float32 per 256 absmaxes: 4.129 bits
    assert bits == pytest.approx(4 + 8 / 64 + 64 / (64 * 256) if double else 4.5)


def test_double_quantization_keeps_small_blocks_beside_large_ones():
    # Half the output columns 1e4 times smaller than the others, and one column of
    # zeros: the absmaxes of one group of 256 span four decades. Each column keeps its
    # own relative error (a linear 8-bit code of the absmaxes would round the small
    # columns' to zero), and the zero column stays exactly zero.
    scale = np.where(np.arange(256) < 128, 1e-4, 1.0).astype(np.float32)
    scale[200] = 0.0
    w = normal(4, (512, 256)) * scale
    q = jlora.quantize({"kernel": w}, "nf4")["kernel"]
    assert q.absmax_scale.shape == (8, 1, 2)  # one group per row of absmaxes: (lo, hi)
    dq = np.asarray(q.dequantize(), np.float64)
    w64 = np.asarray(w, np.float64)
    assert np.all(dq[:, 200] == 0)
    for cols in (slice(0, 128), slice(128, 200)):
        rel = np.linalg.norm(dq[:, cols] - w64[:, cols]) / np.linalg.norm(w64[:, cols])
        assert rel < 0.12, (cols, rel)  # NF4's own error on Gaussian blocks: about 0.09


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
    with pytest.raises(
        ValueError,
        match=r"kernels \['(down|up)/kernel', '(down|up)/kernel'\] "
        "are quantized",
    ):
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
        # base_specs: the specs of split's base, a Quantized node of specs for the
        # kernel, from the arrays or (abstractly) from the float base's specs.
        specs = jlora.base_specs(lp)
        assert isinstance(specs["kernel"], jlora.Quantized)
        assert specs["kernel"].codes == spec and specs["kernel"].absmax == spec
        assert specs["kernel"].absmax_scale == jax.P("data", None, None)
        abstract = jax.eval_shape(lambda: lp)
        from_base = jlora.base_specs(abstract, {"kernel": spec})
        assert jax.tree.structure(from_base) == jax.tree.structure(specs)
        assert jax.tree.leaves(from_base) == jax.tree.leaves(specs)
        shard = jax.tree.map(lambda s: jax.NamedSharding(mesh, s), specs)
        g = jax.jit(lambda b: jax.tree.map(lambda t: t, b), in_shardings=(shard,))
        placed = g(base)
        assert placed["kernel"].codes.sharding.spec == spec
        with pytest.raises(ValueError, match=r"base_specs has no spec for \['kernel'\]"):
            jlora.base_specs(lp, {})


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize(
    "spec", [jax.P(None, "model"), jax.P("model", None)], ids=["column", "row"]
)
def test_a_quantized_base_under_explicit_mesh_axes_is_right_and_keeps_shardings(kind, spec):
    # Dequantization must not gather from a table: under Explicit axes a gather of
    # sharded codes from an unsharded codebook is refused by JAX's sharding rules.
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    explicit = (jax.sharding.AxisType.Explicit,) * 2
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=explicit)
    model = nn.Dense(256)
    x = normal(2, (8, 512))
    p = model.init(jax.random.key(0), x)["params"]
    lp = jlora.init(jax.random.key(1), jlora.quantize(p, kind), jlora.LoraConfig(4, 8))
    adapters, base = jlora.split(lp)
    adapters = jax.tree.map(lambda t: t + 0.05, adapters)
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731

    def loss(ad, base, x):
        return jnp.sum(jlora.lora(apply, strict=True)(jlora.combine(ad, base), x) ** 2)

    # The oracle, off the mesh: the dequantized, merged model, and the gradient on
    # the dequantized (float) base.
    ref = apply(jlora.merge(jlora.dequantize(jlora.combine(adapters, base))), x)
    float_base = jlora.dequantize(base)
    want = jax.grad(loss)(adapters, float_base, x)
    with jax.set_mesh(mesh):
        specs = jlora.base_specs(lp, {"kernel": spec, "bias": jax.P()}, mesh=mesh)
        named = jax.tree.map(lambda s: jax.NamedSharding(mesh, s), specs)
        placed = jax.device_put(base, named)
        assert placed["kernel"].codes.sharding.spec == specs["kernel"].codes
        # Quantized on the mesh: the same codes, placed as the kernel.
        on_mesh = jlora.quantize({"kernel": jax.device_put(p["kernel"], spec)}, kind)
        assert on_mesh["kernel"].codes.sharding.spec == spec
        for a, b in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(base["kernel"])):
            assert np.array_equal(a, b)
        xs = jax.device_put(x, jax.P("data", None))
        f = jlora.lora(apply, strict=True)
        for y in (
            f(jlora.combine(adapters, placed), xs),
            jax.jit(f)(jlora.combine(adapters, placed), xs),
        ):
            assert_close(y, ref, chain_bound(512, 2))
            assert y.sharding.spec[0] == "data"
        # (The batch replicated here: JAX 0.9 refuses the weight gradient's contraction
        # over an Explicit-sharded batch axis without an out_sharding, float or not.)
        got = jax.jit(jax.grad(loss))(adapters, placed, jax.device_put(x, jax.P()))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(g, w, chain_bound(512 + 8, 3))


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


def test_summary_counts_a_quantized_kernel_as_its_elements_and_its_bytes():
    base = {"kernel": normal(0, (128, 64)), "bias": jnp.zeros(64)}
    config = jlora.LoraConfig(4, 8)
    plain = jlora.summary(jlora.init(jax.random.key(1), base, config))
    q = jlora.summary(jlora.init(jax.random.key(1), jlora.quantize(base), config))
    assert q.total_params == plain.total_params == 128 * 64 + 64 + 4 * (128 + 64)
    assert q.trainable_params == plain.trainable_params == 4 * (128 + 64)
    # codes (two per byte); one 8-bit absmax per 64 codes along the 128 axis: [2, 64];
    # one group per row of those (64 < 256 absmaxes), two float32 each: [2, 1, 2]
    kernel_bytes = 128 * 64 // 2 + 2 * 64 + 4 * 2 * 2
    factors_and_bias = 4 * (4 * (128 + 64) + 64)
    assert q.total_bytes == kernel_bytes + factors_and_bias


def test_a_kernel_blocked_along_its_stacked_axis_is_refused_at_init():
    # [64, 32, 32]: only the leading (stacked) axis is a multiple of 64, so quantizing
    # before init blocks along it; a scan could not slice a layer out of the codes.
    q = jlora.quantize({"kernel": normal(0, (64, 32, 32))})
    assert q["kernel"].axis % 3 == 0
    config = jlora.LoraConfig(4, 8, layout={"kernel": jlora.Layout((1,), (2,), (0,))})
    with pytest.raises(
        ValueError,
        match=r"kernel: this quantized kernel \[64, 32, 32\] "
        r"is blocked along axis 0, a stacked axis.*quantize after",
    ):
        jlora.init(jax.random.key(1), q, config)
    # after init the stacked axis is skipped: no axis fits, the kernel stays in float
    lp = jlora.init(jax.random.key(1), {"kernel": normal(0, (64, 32, 32))}, config)
    with pytest.warns(UserWarning, match=r"stay in float:\n  kernel: .*stacked axes \[0\]"):
        kept = jlora.quantize(lp)
    assert not isinstance(kept["kernel"].w, jlora.Quantized)


def test_a_quantized_kernel_handed_back_by_the_function_comes_out_dequantized():
    # Linen's apply(..., mutable=True) hands the params back: a quantized kernel without
    # adapters leaves as its float values (an array), not as the interpreter's stand-in.
    base = {"up": {"kernel": normal(0, (64, 64))}, "down": {"kernel": normal(1, (64, 64))}}
    base = jlora.quantize(base)
    lp = jlora.init(jax.random.key(2), base, jlora.LoraConfig(4, 8, targets="up"))
    x = normal(3, (2, 64))
    f = jlora.lora(lambda p, x: (x @ p["up"]["kernel"], p["down"]["kernel"]))
    want = np.asarray(base["down"]["kernel"].dequantize())
    for _, down in (f(lp, x), jax.jit(f)(lp, x)):
        assert isinstance(down, jax.Array) and down.shape == (64, 64)
        # the same codes; each absmax is lo * (hi / lo) ** t, a pow (log and exp, a
        # few ulps each) that XLA may evaluate another way when it fuses differently
        np.testing.assert_allclose(down, want, rtol=16 * 2.0**-24, atol=0)


def test_eager_calls_on_a_quantized_base_without_adapters_compile_once():
    base = jlora.quantize({"kernel": normal(0, (64, 32))})
    traces = []

    def fn(p, x):
        traces.append(1)
        return x @ p["kernel"]

    x = normal(1, (2, 64))
    outs = [jlora.lora(fn)(base, x) for _ in range(3)]
    assert len(traces) == 1
    ref = x @ base["kernel"].dequantize()
    for y in outs:
        assert_close(y, ref, chain_bound(64, 1))


def test_quantized_specs_leave_an_axis_the_mesh_cannot_split_replicated():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.make_mesh(
        (2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    spec = jax.P("model", "data")
    # [128, 256] blocked along the 128 axis: absmaxes [2, 256], whose 2 rows the 4
    # "model" devices cannot split; the codes [64, 256] can.
    w = jax.device_put(normal(0, (128, 256)), jax.NamedSharding(mesh, spec))
    lp = jlora.init(
        jax.random.key(1), jlora.quantize({"kernel": w}), jlora.LoraConfig(4, 8)
    )
    specs = jlora.base_specs(lp)
    assert specs["kernel"].codes == spec
    assert specs["kernel"].absmax == jax.P(None, "data")
    assert specs["kernel"].absmax_scale == jax.P(None, None, None)
    named = jax.tree.map(lambda s: jax.NamedSharding(mesh, s), specs)
    placed = jax.device_put(jlora.split(lp)[1], named)  # (each spec fits its array)
    placed = jax.jit(lambda b: b, in_shardings=(named,))(placed)
    np.testing.assert_array_equal(placed["kernel"].codes, lp["kernel"].w.codes)
    # the adapters' specs from the base's (a node of specs stands for the kernel's)
    from_base = jlora.adapter_specs(lp, {"kernel": specs["kernel"]})
    assert from_base["kernel"].a == jax.P("model", None)
    assert from_base["kernel"].b == jax.P(None, "data")


def test_adapters_trained_on_a_quantized_base_load_onto_its_float_base(tmp_path):
    float_base = {"kernel": normal(0, (128, 64))}
    lp = jlora.init(jax.random.key(1), jlora.quantize(float_base), jlora.LoraConfig(4, 8))
    jlora.save_adapter(tmp_path / "ad", lp)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same base: quantizes to the trained-on one
        back = jlora.load_adapter(tmp_path / "ad", float_base, base_mismatch="error")
        jlora.load_adapter(
            tmp_path / "ad", jlora.quantize(float_base), base_mismatch="error"
        )
    assert not isinstance(back["kernel"].w, jlora.Quantized)
    with pytest.raises(
        ValueError, match=r"trained on different base kernels.*\['kernel'\]"
    ):
        jlora.load_adapter(
            tmp_path / "ad", {"kernel": normal(5, (128, 64))}, base_mismatch="error"
        )
    # trained on float, met with a quantized base: said as such, not as another model
    jlora.save_adapter(
        tmp_path / "fl", jlora.init(jax.random.key(1), float_base, jlora.LoraConfig(4, 8))
    )
    with pytest.warns(UserWarning, match="quantized otherwise than the ones they were"):
        jlora.load_adapter(tmp_path / "fl", jlora.quantize(float_base))


def test_quantize_refuses_bad_block_sizes_and_a_silent_requantization():
    base = {"kernel": normal(0, (128, 64))}
    for bad, err in (
        (0, ValueError),
        (-64, ValueError),
        (63, ValueError),
        (64.0, TypeError),
        (True, TypeError),
    ):
        with pytest.raises(err, match="jlora.quantize: block_size must be a positive int"):
            jlora.quantize(base, block_size=bad)
    q = jlora.quantize(base)
    assert jlora.quantize(q)["kernel"] is q["kernel"]  # the same settings: kept
    with pytest.raises(
        ValueError,
        match=r"kernel: already quantized as nf4 \(block_size"
        r"=64.*not as asked \(block_size=32.*jlora.dequantize it first",
    ):
        jlora.quantize(q, block_size=32)
    with pytest.raises(ValueError, match=r"pattern 'nope' matches no leaf; fix the"):
        jlora.quantize(base, targets="nope")


def test_a_tree_map_that_casts_the_codes_is_refused_by_name():
    q = jlora.quantize({"kernel": normal(0, (128, 64))})
    with pytest.raises(
        TypeError,
        match=r"Quantized\(nf4, \[128, 64\]\): its integer codes "
        "came back as bfloat16",
    ):
        jax.tree.map(lambda x: x.astype(jnp.bfloat16), q)
    # the map the message advises leaves the node as it is
    kept = jax.tree.map(
        lambda x: x if isinstance(x, jlora.Quantized) else x.astype(jnp.bfloat16),
        {**q, "bias": jnp.zeros(64)},
        is_leaf=lambda x: isinstance(x, jlora.Quantized),
    )
    assert kept["kernel"] is q["kernel"] and kept["bias"].dtype == jnp.bfloat16
