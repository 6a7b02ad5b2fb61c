"""jlora.lora against the oracle fn(jlora.merge(params)), rule by rule, in strict mode."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_close, chain_bound, perturb, rel_err, to_f32

import jlora

BF16_ULP = 2.0**-8


def _cast(args, dtype):
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, args
    )


def check(fn, params, args, rules, dtype=jnp.float32, *, k, depth):
    """Forward and adapter gradients of lora(fn) match the merged oracle.

    float32: the factored and the merged evaluation differ only by rounding: for a
    function whose longest reduction has `k` terms and whose forward pass chains
    `depth` reductions (each adapted layer counts two: the factored path adds `x @ a`
    and `(x a) @ b` beside `x @ w`), outputs agree to `chain_bound(k, depth)` and
    gradients (forward, then backward) to `chain_bound(k, 2 * depth + 1)`, relative to
    the values' scale (helpers.py).
    bfloat16: the oracle is computed in float32; the factored path must be about as
    accurate as the merged bfloat16 path: err <= 2 * err(merged bf16) + 2 * 2^-8.
    Every adapted leaf must be handled by the named rules, never materialized.
    """
    lfn = jlora.lora(fn, strict=True)
    out = jax.jit(lfn)(params, *args)
    explained = jlora.explain(fn, params, *args)
    for path, used in explained.items():
        assert used, f"{path} never used"
        assert not any(r.startswith("materialize") for r in used), (path, used)
        plumbing = {"jit", "convert_element_type", "copy", "transpose"}
        assert set(used) <= set(rules) | plumbing, (
            path,
            used,
        )
    assert set(rules) <= {r for used in explained.values() for r in used}, explained

    adapters, base = jlora.split(params)
    ct = jax.random.normal(jax.random.key(7), jnp.shape(out), jnp.float32)

    def loss_lora(ad):
        return (lfn(jlora.combine(ad, base), *args).astype(jnp.float32) * ct).sum()

    @jax.jit
    def loss_ref(ad, base, args):
        return (
            fn(jlora.merge(jlora.combine(ad, base)), *args).astype(jnp.float32) * ct
        ).sum()

    merged_fn = jax.jit(lambda p, a: fn(jlora.merge(p), *a))
    grad_ref = jax.jit(jax.grad(loss_ref))
    g = jax.jit(jax.grad(loss_lora))(adapters)
    if dtype == jnp.float32:
        assert_close(out, merged_fn(params, args), chain_bound(k, depth))
        gr = grad_ref(adapters, base, args)
        for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
            assert_close(x, y, chain_bound(k, 2 * depth + 1))
        return
    ref32 = merged_fn(to_f32(params), _cast(args, jnp.float32))
    merged16 = merged_fn(params, args)
    budget = 2 * rel_err(merged16, ref32) + 2 * BF16_ULP
    assert rel_err(out, ref32) <= budget, (rel_err(out, ref32), budget)
    gr32 = grad_ref(to_f32(adapters), to_f32(base), _cast(args, jnp.float32))
    gm16 = grad_ref(adapters, base, args)
    for x, y, z in zip(jax.tree.leaves(g), jax.tree.leaves(gr32), jax.tree.leaves(gm16)):
        assert rel_err(x, y) <= 2 * rel_err(z, y) + 4 * BF16_ULP


def adapt(params, cfg, probe=None, seed=1):
    lp = jlora.init(jax.random.key(seed), params, cfg, probe=probe)
    return perturb(lp, jax.random.key(seed + 1))


DTYPES = [jnp.float32, jnp.bfloat16]


class MLP(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = dict(param_dtype=self.dtype)
        x = nn.gelu(nn.Dense(24, **d)(x))
        x = jax.nn.relu(nn.Dense(16, **d)(x))
        return jax.nn.softmax(nn.Dense(8, **d)(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_mlp(dtype):
    m = MLP(dtype)
    x = jax.random.normal(jax.random.key(0), (4, 12), dtype)
    params = m.init(jax.random.key(0), x)["params"]
    lp = adapt(params, jlora.LoraConfig(4, 8))
    check(
        lambda p, x: m.apply({"params": p}, x),
        lp,
        (x,),
        ["dot_general"],
        dtype,
        k=24,
        depth=7,
    )


class Attention(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = dict(param_dtype=self.dtype)
        y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, **d)(x)
        q = nn.DenseGeneral((2, 8), name="q2", **d)(y)
        return nn.DenseGeneral(16, axis=(-2, -1), name="o2", **d)(q)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_and_dense_general_with_probe(dtype):
    m = Attention(dtype)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16), dtype)
    params = m.init(jax.random.key(0), x)["params"]

    def fn(p, x):
        return m.apply({"params": p}, x)

    lp = adapt(params, jlora.LoraConfig(4, 8), probe=lambda p: fn(p, x))
    layouts = {s.path: s.layout for s in jlora.summary(lp).adapted}
    assert layouts["MultiHeadDotProductAttention_0/query/kernel"] == jlora.Layout(
        (0,), (1, 2)
    )
    assert layouts["MultiHeadDotProductAttention_0/out/kernel"] == jlora.Layout(
        (0, 1), (2,)
    )
    assert layouts["o2/kernel"] == jlora.Layout((0, 1), (2,))
    # q/k/v, scores, softmax, values, out, q2, o2: five adapted projections.
    check(fn, lp, (x,), ["dot_general"], dtype, k=16, depth=13)


def test_einsum_module_and_raw_einsum():
    class E(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Einsum((3, 8, 6), "btd,kdh->bkth")(x)
            w = self.param("w_raw", nn.initializers.normal(), (6, 10))
            return jnp.einsum("bkth,hj->bkjt", y, w)

    m = E()
    x = jax.random.normal(jax.random.key(0), (2, 4, 8))
    params = m.init(jax.random.key(0), x)["params"]

    def fn(p, x):
        return m.apply({"params": p}, x)

    lp = adapt(
        params,
        jlora.LoraConfig(2, 4, targets=["kernel", "w_raw"]),
        probe=lambda p: fn(p, x),
    )
    assert jlora.summary(lp).adapted[0].layout == jlora.Layout((1,), (0, 2))
    check(fn, lp, (x,), ["dot_general"], k=8, depth=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_on_the_left_and_transposed_tied_embedding(dtype):
    params = {
        "emb": jax.random.normal(jax.random.key(0), (12, 6), dtype),
        "proj": jax.random.normal(jax.random.key(1), (6, 5), dtype),
    }
    cfg = jlora.LoraConfig(2, 2, targets=["emb", "proj"])
    lp = adapt(params, cfg)

    def fn(p, ids):
        h = jnp.take(p["emb"], ids, axis=0)  # gather
        logits = h @ p["emb"].T  # tied output: the kernel used transposed
        left = jnp.einsum("io,bti->bto", p["proj"], h)  # kernel as the lhs of dot_general
        return jnp.concatenate([logits, left], -1)

    ids = jnp.array([[1, 3, 5], [0, 11, 2]])
    check(fn, lp, (ids,), ["gather", "dot_general"], dtype, k=12, depth=5)


def test_embed_module_init_and_lookup():
    class M(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(3)(nn.Embed(20, 8)(ids))

    m = M()
    ids = jnp.array([[1, 2, 19]])
    params = m.init(jax.random.key(0), ids)["params"]
    lp = jlora.init(jax.random.key(1), params, jlora.LoraConfig(2, 2, targets="embedding"))
    emb = lp["Embed_0"]["embedding"]
    assert not np.asarray(emb.a).any()  # reference embedding init: a = 0, b ~ N(0, 1)
    assert 0.5 < float(jnp.std(emb.b)) < 1.5
    lp = perturb(lp, jax.random.key(3))
    check(lambda p, i: m.apply({"params": p}, i), lp, (ids,), ["gather"], k=8, depth=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv(dtype):
    m = nn.Conv(6, (3, 3), param_dtype=dtype)
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4), dtype)
    params = m.init(jax.random.key(0), x)["params"]
    cfg = jlora.LoraConfig(2, 4, layout={"kernel": jlora.Layout((0, 1, 2), (3,))})
    lp = adapt(params, cfg)
    check(
        lambda p, x: m.apply({"params": p}, x),
        lp,
        (x,),
        ["conv_general_dilated"],
        dtype,
        k=36,
        depth=2,
    )


class Block(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(8, name="fc", param_dtype=self.dtype)(h)), None


class Scanned(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return stack(self.dtype, name="layers")(x, None)[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nn_scan_stacked_kernels_each_layer_own_factors(dtype):
    m = Scanned(dtype)
    x = jax.random.normal(jax.random.key(0), (2, 8), dtype)
    params = m.init(jax.random.key(0), x)["params"]

    def fn(p, x):
        return m.apply({"params": p}, x)

    lp = adapt(params, jlora.LoraConfig(2, 4), probe=lambda p: fn(p, x))
    lw = lp["layers"]["fc"]["kernel"]
    assert lw.layout == jlora.Layout((1,), (2,), (0,))
    assert lw.a.shape == (3, 8, 2) and lw.b.shape == (3, 2, 8)
    check(fn, lp, (x,), ["scan", "dot_general"], dtype, k=8, depth=6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fori_loop_over_stacked_layers_and_cond_remat(dtype):
    ws = (jax.random.normal(jax.random.key(0), (3, 6, 6)) * 0.3).astype(dtype)
    params = {"ws": ws, "head": jax.random.normal(jax.random.key(1), (6, 4), dtype)}

    def fn(p, x):
        def layer(i, h):
            return jnp.tanh(h @ p["ws"][i])

        h = jax.lax.fori_loop(0, 3, layer, x)
        head = jax.checkpoint(
            lambda h: h @ p["head"], policy=jax.checkpoint_policies.nothing_saveable
        )
        y = jax.lax.cond(h.sum() > 0, head, lambda h: -head(h), h)

        h2 = h
        h3 = h2 @ p["ws"][1:2].reshape(6, 6)  # static slice + reshape off a size-1 stack
        return y + (h3 @ p["head"])

    cfg = jlora.LoraConfig(
        2, 4, targets=["ws", "head"], layout={"ws": jlora.Layout((1,), (2,), (0,))}
    )
    lp = adapt(params, cfg)
    x = jax.random.normal(jax.random.key(2), (2, 6), dtype)
    check(
        fn,
        lp,
        (x,),
        [
            "scan",
            "dynamic_slice",
            "squeeze",
            "dot_general",
            "remat",
            "cond",
            "slice",
            "reshape",
        ],
        dtype,
        k=6,
        depth=12,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_and_inserted_axes_become_stacked(dtype):
    params = {"kernel": jax.random.normal(jax.random.key(0), (6, 5), dtype)}
    lp = adapt(params, jlora.LoraConfig(2, 4))

    def fn(p, xs):
        w = p["kernel"]
        batched = jnp.einsum("lbi,lio->lbo", xs, jnp.broadcast_to(w, (3, 6, 5)))
        single = jnp.einsum("lbi,lio->lbo", xs[:1], w[None])
        reshaped = jnp.einsum("lbi,lio->lbo", xs[:1], jnp.reshape(w, (1, 6, 5)))
        return jnp.concatenate([batched, single, reshaped], 0)

    xs = jax.random.normal(jax.random.key(1), (3, 2, 6), dtype)
    check(
        fn, lp, (xs,), ["broadcast_in_dim", "reshape", "dot_general"], dtype, k=6, depth=2
    )


def test_while_loop_over_stacked_layers_forward():
    # JAX has no reverse mode through while_loop, so this one checks values only.
    ws = jax.random.normal(jax.random.key(0), (3, 6, 6)) * 0.3
    cfg = jlora.LoraConfig(
        2, 4, targets="ws", layout={"ws": jlora.Layout((1,), (2,), (0,))}
    )
    lp = adapt({"ws": ws}, cfg)

    def fn(p, x, n):
        def body(c):
            w = jax.lax.dynamic_index_in_dim(p["ws"], c[0], keepdims=False)
            return c[0] + 1, jnp.tanh(c[1] @ w)

        return jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]

    x = jax.random.normal(jax.random.key(2), (2, 6))
    out = jax.jit(jlora.lora(fn, strict=True))(lp, x, 3)
    assert_close(out, fn(jlora.merge(lp), x, 3), chain_bound(k=6, depth=6))
    used = set(jlora.explain(fn, lp, x, 3)["ws"])
    # (Some JAX releases wrap dynamic_index_in_dim in a jit, some don't.)
    assert used - {"jit"} == {"while", "dynamic_slice", "squeeze", "dot_general"}


def test_nnx_modules_through_a_closure():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(8, 12, rngs=rngs)
            self.gen = nnx.LinearGeneral(12, (2, 4), rngs=rngs)
            self.ein = nnx.Einsum("bhd,hdo->bo", (2, 4, 5), rngs=rngs)

        def __call__(self, x):
            return self.ein(self.gen(nnx.relu(self.lin(x))))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (3, 8))

    def fn(s, x):
        return nnx.merge(graphdef, s)(x)

    lp = adapt(state, jlora.LoraConfig(2, 4), probe=lambda s: fn(s, x))
    check(fn, lp, (x,), ["dot_general"], k=12, depth=6)


def test_vmap_over_adapters_and_over_batch():
    params = {"kernel": jax.random.normal(jax.random.key(0), (6, 5))}
    lp = adapt(params, jlora.LoraConfig(2, 4))
    lw = lp["kernel"]
    many = lw.replace(a=jnp.stack([lw.a, 2 * lw.a, -lw.a]), b=jnp.stack([lw.b] * 3))
    x = jax.random.normal(jax.random.key(1), (4, 6))

    def fn(p, x):
        return jnp.tanh(x @ p["kernel"])

    lfn = jlora.lora(fn, strict=True)
    got = jax.vmap(lfn, in_axes=({"kernel": jlora.LoraWeight(None, 0, 0)}, None))(
        {"kernel": many}, x
    )
    for i, s in enumerate([1.0, 2.0, -1.0]):
        one = {"kernel": lw.replace(a=s * lw.a)}
        assert_close(got[i], fn(jlora.merge(one), x), chain_bound(k=6, depth=2))
    per_row = jax.vmap(lfn, in_axes=(None, 0))(lp, x)
    assert_close(per_row, fn(jlora.merge(lp), x), chain_bound(k=6, depth=2))


def test_identity_on_plain_params_and_trainable_leaves_unwrapped():
    params = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
    fn = lambda p, x: x @ p["kernel"] + p["bias"]  # noqa: E731
    x = jnp.ones((1, 3))
    assert jlora.lora(fn)(params, x) is not None
    np.testing.assert_array_equal(jlora.lora(fn)(params, x), fn(params, x))
    lp = jlora.init(jax.random.key(0), params, jlora.LoraConfig(1, 1, train_bias="all"))
    np.testing.assert_array_equal(jlora.lora(fn)(lp, x), fn(params, x))


def test_strict_mode_and_fallback_warning():
    params = {"kernel": jax.random.normal(jax.random.key(0), (4, 4))}
    lp = adapt(params, jlora.LoraConfig(2, 2))

    def fn(p, x):
        return x @ jnp.sin(p["kernel"])  # sin has no low-rank rule

    x = jnp.ones((2, 4))
    for _ in range(2):  # on every call, the eager cache's second call too
        with pytest.raises(jlora.RuleError, match="kernel flows into 'sin'"):
            jlora.lora(fn, strict=True)(lp, x)
    with pytest.warns(UserWarning, match="'sin'"):
        out = jlora.lora(fn)(lp, x)
    assert_close(out, fn(jlora.merge(lp), x), chain_bound(k=4, depth=2))
    assert jlora.explain(fn, lp, x) == {"kernel": ("materialize:sin",)}


def test_traced_once_per_compilation_not_on_cache_hit():
    calls = []
    params = {"kernel": jnp.ones((4, 3))}
    lp = jlora.init(jax.random.key(0), params, jlora.LoraConfig(2, 2))

    def fn(p, x):
        calls.append(1)
        return x @ p["kernel"]

    step = jax.jit(jlora.lora(fn))
    step(lp, jnp.ones((2, 4)))
    assert len(calls) == 1
    step(lp, jnp.ones((2, 4)))
    step(perturb(lp, jax.random.key(1)), jnp.zeros((2, 4)))
    assert len(calls) == 1
    step(lp, jnp.ones((5, 4)))  # new shape: one new compilation
    assert len(calls) == 2


def test_dropout_determinism_sites_and_rate():
    d = 64
    params = {"k1": jnp.zeros((d, d)), "k2": jnp.zeros((d, d))}
    cfg = jlora.LoraConfig(d, d, targets=["k1", "k2"], dropout=0.25)
    lp = jlora.init(jax.random.key(0), params, cfg)
    eye = jnp.eye(d)
    lp = {k: v.replace(a=eye, b=eye) for k, v in lp.items()}  # delta = scale * I = I
    x = jnp.ones((8, d))

    def fn(p, x):
        return jnp.stack([x @ p["k1"], x @ p["k2"], x @ p["k1"]])

    def run(key):
        return jax.jit(jlora.lora(fn, rng=key))(lp, x)

    y1, y2, y3 = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(y1, y3)
    # Each output element is x * mask / 0.75: values are 0 or 4/3.
    vals = np.unique(np.round(np.asarray(y1), 5))
    np.testing.assert_allclose(vals, [0.0, 4 / 3], rtol=1e-5)
    dropped = float((np.asarray(y1) == 0).mean())
    assert 0.2 < dropped < 0.3  # 3 * 8 * 64 draws at p = 0.25
    assert not np.array_equal(y1[0], y1[1])  # different kernels: independent masks
    assert not np.array_equal(y1[0], y1[2])  # two uses of one kernel: independent masks
    no_key = jlora.lora(fn)(lp, x)
    np.testing.assert_allclose(no_key, np.ones((3, 8, d)), rtol=1e-6)


def test_dropout_differs_per_scan_iteration():
    d = 32
    params = {"ws": jnp.zeros((4, d, d))}
    cfg = jlora.LoraConfig(
        d, d, targets="ws", dropout=0.5, layout={"ws": jlora.Layout((1,), (2,), (0,))}
    )
    lp = jlora.init(jax.random.key(0), params, cfg)
    eye = jnp.broadcast_to(jnp.eye(d), (4, d, d))
    lp = {"ws": lp["ws"].replace(a=eye, b=eye)}

    def fn(p, x):
        return jax.lax.scan(lambda c, w: (c, x @ w), 0.0, p["ws"])[1]

    ys = jlora.lora(fn, rng=jax.random.key(0), strict=True)(lp, jnp.ones((1, d)))
    masks = [np.asarray(ys[i]) != 0 for i in range(4)]
    assert not any(np.array_equal(masks[0], m) for m in masks[1:])


def test_remat_policy_can_save_the_named_intermediate():
    params = {"kernel": jax.random.normal(jax.random.key(0), (16, 16))}
    lp = adapt(params, jlora.LoraConfig(4, 4))
    x = jnp.ones((2, 16))
    policy = jax.checkpoint_policies.save_only_these_names("lora_xa")

    def fn(p, x):
        return jnp.tanh(x @ p["kernel"]).sum()

    lfn = jax.checkpoint(jlora.lora(fn, strict=True), policy=policy)
    adapters, base = jlora.split(lp)
    g = jax.grad(lambda ad: lfn(jlora.combine(ad, base), x))(adapters)
    gr = jax.grad(lambda ad: fn(jlora.merge(jlora.combine(ad, base)), x))(adapters)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
        assert_close(a, b, chain_bound(k=16, depth=5))
    # The saved residual is visible to the remat machinery by its name.
    text = str(
        jax.make_jaxpr(jax.grad(lambda ad: lfn(jlora.combine(ad, base), x)))(adapters)
    )
    assert "lora_xa" in text


def test_probe_errors_name_the_path():
    params = {"used": jnp.ones((4, 3, 2)), "unused": jnp.ones((4, 3, 2))}

    def probe(p):
        return jnp.einsum("bi,ijk->bjk", jnp.ones((1, 4)), p["used"])

    cfg = jlora.LoraConfig(1, 1, targets=["used", "unused"])
    with pytest.raises(ValueError, match="unused: the probe never"):
        jlora.init(jax.random.key(0), params, cfg, probe=probe)

    def disagree(p):
        a = jnp.einsum("bi,ijk->bjk", jnp.ones((1, 4)), p["used"])
        b = jnp.einsum("bij,ijk->bk", jnp.ones((1, 4, 3)), p["used"])
        return a.sum() + b.sum() + p["unused"].sum()

    cfg = jlora.LoraConfig(1, 1, targets=["used"])
    with pytest.raises(ValueError, match="used: the probe uses it in ways that disagree"):
        jlora.init(jax.random.key(0), params, cfg, probe=disagree)


# The interpreter keeps what JAX's own evaluation keeps ---------------------------------


class Named(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="head")(nn.relu(nn.Dense(8, name="up")(x)))


def test_name_stack_and_source_info_reach_the_compiled_program():
    m = Named()
    x = jnp.ones((2, 6))
    params = m.init(jax.random.key(0), x)
    lp = jlora.init(jax.random.key(1), params, jlora.LoraConfig(2, 2))

    def op_names(text):
        return set(re.findall(r'"[^"]*?((?:up|head)/[a-z_]+)', text))

    plain = jax.jit(m.apply).lower(params, x).as_text(debug_info=True)
    adapted = jax.jit(jlora.lora(m.apply)).lower(lp, x).as_text(debug_info=True)
    assert {"up/dot_general", "head/dot_general"} <= op_names(plain)
    # Every name of the plain model's ops is kept, and the factored branch is named too.
    assert op_names(plain) <= op_names(adapted)
    assert {"up/mul", "head/mul"} <= op_names(adapted)
    # Source locations point at the model's code, as in the plain program.
    here = pathlib.Path(__file__).name
    assert here in plain and here in adapted


def test_nested_jit_keeps_its_name_shardings_and_donation():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    col = NamedSharding(mesh, P(None, "model"))
    w = jax.device_put(jax.random.normal(jax.random.key(0), (16, 32)), col)
    lp = adapt({"kernel": w}, jlora.LoraConfig(2, 4))
    x = jax.random.normal(jax.random.key(1), (4, 16))

    def project(x, kernel):
        return jnp.tanh(x @ kernel)

    inner = jax.jit(project, in_shardings=(None, col), out_shardings=col, keep_unused=True)

    def fn(p, x):
        return inner(x, p["kernel"]) * 2.0

    jaxpr = jax.make_jaxpr(jlora.lora(fn, strict=True))(lp, x).jaxpr
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name in ("jit", "pjit")]
    assert eqn.params["name"] == "project"
    shardings = eqn.params["in_shardings"]
    assert len(shardings) == 4  # x, and the kernel as w, a, b
    assert shardings[1] == col
    assert shardings[2].spec == P(None, None) and shardings[3].spec == P(None, "model")
    assert eqn.params["out_shardings"] == (col,) and eqn.params["keep_unused"]
    out = jax.jit(jlora.lora(fn, strict=True))(lp, x)
    assert_close(out, fn(jlora.merge(lp), x), chain_bound(k=16, depth=3))
    assert out.sharding.is_equivalent_to(col, 2)


def test_dropout_differs_per_while_iteration_with_a_traced_bound():
    d = 32
    params = {"ws": jnp.zeros((4, d, d))}
    cfg = jlora.LoraConfig(
        d, d, targets="ws", dropout=0.5, layout={"ws": jlora.Layout((1,), (2,), (0,))}
    )
    lp = jlora.init(jax.random.key(0), params, cfg)
    eye = jnp.broadcast_to(jnp.eye(d), (4, d, d))
    lp = {"ws": lp["ws"].replace(a=eye, b=eye)}

    def fn(p, x, n):
        def body(c):
            i, ys = c
            w = jax.lax.dynamic_index_in_dim(p["ws"], i, keepdims=False)
            return i + 1, ys.at[i].set(x @ w)

        ys = jnp.zeros((4, 1, d))
        return jax.lax.while_loop(lambda c: c[0] < n, body, (0, ys))[1]

    run = jax.jit(jlora.lora(fn, rng=jax.random.key(0), strict=True))
    ys = run(lp, jnp.ones((1, d)), jnp.asarray(4))  # the trip count is traced
    masks = [np.asarray(ys[i]) != 0 for i in range(4)]
    assert all(0.2 < m.mean() < 0.8 for m in masks)
    assert not any(np.array_equal(masks[0], m) for m in masks[1:])


def test_frozen_kernel_gets_no_gradient_even_through_the_whole_tree():
    """Differentiating the whole adapted tree (a logged gradient norm, an eager step):
    the kernel's gradient is a structural zero, so no `dW = x^T g` is ever formed."""
    m = MLP()
    x = jax.random.normal(jax.random.key(0), (4, 12))
    lp = adapt(m.init(jax.random.key(1), x)["params"], jlora.LoraConfig(2, 4))

    def loss(p):
        return jnp.sum(jlora.lora(m.apply)({"params": p}, x) ** 2)

    grads = jax.grad(loss)(lp)  # eager
    for path in ("Dense_0", "Dense_1", "Dense_2"):
        g = grads[path]["kernel"]
        assert not np.asarray(g.w).any()
        assert np.asarray(g.a).any() and np.asarray(g.b).any()
    kernels = {tuple(lp[k]["kernel"].w.shape) for k in ("Dense_0", "Dense_1", "Dense_2")}
    jaxpr = jax.make_jaxpr(jax.grad(loss))(lp).jaxpr

    dots = {
        tuple(e.outvars[0].aval.shape)
        for e in jaxpr.eqns
        if e.primitive.name == "dot_general"
    }
    assert dots and not kernels & dots, "a kernel-shaped weight gradient was formed"
    # An eager whole-tree step with jlora.optimizer updates the factors only.
    tx = jlora.optimizer(optax.sgd(0.1))
    updates, _ = tx.update(grads, tx.init(lp), lp)
    new = optax.apply_updates(lp, updates)
    np.testing.assert_array_equal(new["Dense_0"]["kernel"].w, lp["Dense_0"]["kernel"].w)


def test_lora_weight_used_outside_lora_says_what_to_do():
    lp = jlora.init(jax.random.key(0), {"kernel": jnp.ones((4, 3))}, jlora.LoraConfig(2, 2))
    lw = lp["kernel"]
    uses = [
        lambda: np.asarray(lw),
        lambda: float(lw),
        lambda: lw[0],
        lambda: lw @ jnp.ones((3, 2)),
        lambda: np.ones((2, 4)) @ lw,
        lambda: jnp.dot(jnp.ones((2, 4)), lw),
        lambda: jnp.ones((2, 4)) @ lw,
    ]
    for use in uses:
        with pytest.raises(TypeError, match=r"outside jlora.lora.*jlora.lora\(fn\).*merge"):
            use()


def test_a_kernel_returned_by_a_nested_jit_stays_factored_and_is_probed():
    """A jit that returns the kernel (with an out_sharding) and one that donates:
    the kernel comes back factored, and the probe follows it out of the jit too."""
    params = {"w": jax.random.normal(jax.random.key(0), (3, 6, 5))}

    @jax.jit
    def layer(ws, i):
        return ws[i]  # returns a kernel

    def fn(p, x):
        w = layer(p["w"], 1)
        stacked = jnp.broadcast_to(p["w"][:1], (4, 6, 5))  # a size-1 stack, repeated
        xs = jnp.broadcast_to(x, (4, *x.shape))
        return x @ w + jnp.einsum("lbi,lio->lbo", xs, stacked).sum(0)

    x = jax.random.normal(jax.random.key(1), (2, 6))
    lp = adapt(params, jlora.LoraConfig(2, 4, targets="w"), probe=lambda p: fn(p, x))
    assert lp["w"].layout == jlora.Layout((1,), (2,), (0,))
    check(
        fn,
        lp,
        (x,),
        ["jit", "dynamic_slice", "squeeze", "slice", "broadcast_in_dim", "dot_general"],
        k=6,
        depth=4,
    )


def test_an_eager_call_does_not_compile_nested_jits_again():
    params = {"kernel": jax.random.normal(jax.random.key(0), (6, 5))}
    lp = adapt(params, jlora.LoraConfig(2, 4))

    @jax.jit
    def project(x, w):
        return jnp.tanh(x @ w)

    fn = jlora.lora(lambda p, x: project(x, p["kernel"]), strict=True)
    x = jnp.ones((2, 6))
    fn(lp, x)  # warm: every primitive compiled once
    with jax.log_compiles():
        import logging

        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("jax").addHandler(handler)
        try:
            for _ in range(3):
                fn(lp, x)
        finally:
            logging.getLogger("jax").removeHandler(handler)
    compiled = [r.getMessage() for r in records if "ompil" in r.getMessage()]
    assert not any("project" in m for m in compiled), compiled
