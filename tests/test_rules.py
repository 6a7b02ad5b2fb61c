"""Rules for uses of an adapted kernel that stay exactly low rank: lookups of rows,
slices, concatenations, reshapes, scalings, grouped convolutions.

Each case runs `jlora.lora(fn, strict=True)` (no kernel may be materialized) and is
compared against the oracle `fn(jlora.merge(params), ...)`: outputs, and gradients with
respect to the factors `a` and `b`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, chain_bound, perturb
from jax import lax

import jlora


def check(fn, params, args, *, k, depth, rules=()):
    """`lora(fn, strict=True)` equals the merged oracle in value and in the gradients of
    every factor; `explain` names no materialization and names each rule in `rules`.

    Factored and merged evaluations differ by rounding only: a chain of `depth`
    reductions of at most `k` terms each (a factored use adds `x @ a`, `(x a) @ b`),
    forward; the gradients chain the forward and the backward (helpers.chain_bound).
    """
    lfn = jlora.lora(fn, strict=True)
    explained = jlora.explain(fn, params, *args)
    used = {r for rs in explained.values() for r in rs}
    for path, rs in explained.items():
        assert rs, f"{path} never used"
        assert not any(r.startswith("materialize") for r in rs), (path, rs)
    assert set(rules) <= used, (rules, explained)

    out = jax.jit(lfn)(params, *args)
    ref = jax.jit(lambda p, a: fn(jlora.merge(p), *a))(params, args)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        assert_close(x, y, chain_bound(k, depth))

    adapters, base = jlora.split(params)
    cts = [
        jax.random.normal(jax.random.fold_in(jax.random.key(7), i), jnp.shape(y))
        for i, y in enumerate(jax.tree.leaves(ref))
    ]

    def loss(f, ad, base, args):
        outs = jax.tree.leaves(f(jlora.combine(ad, base), *args))
        return sum((o.astype(jnp.float32) * c).sum() for o, c in zip(outs, cts))

    g = jax.jit(jax.grad(lambda ad, b, a: loss(lfn, ad, b, a)))(adapters, base, args)
    gr = jax.jit(
        jax.grad(lambda ad, b, a: loss(lambda p, *x: fn(jlora.merge(p), *x), ad, b, a))
    )(adapters, base, args)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
        assert_close(x, y, chain_bound(k, 2 * depth + 1))
    return explained


def adapt(params, cfg, probe=None, seed=1):
    lp = jlora.init(jax.random.key(seed), params, cfg, probe=probe)
    return perturb(lp, jax.random.key(seed + 1), scale=0.3)


def normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


# Item 14: the forms JAX emits for a row of an embedding table ---------------------------

V, D = 10, 6
LOOKUPS = {
    # one traced id: dynamic_slice of one row, squeezed
    "scalar_id": (lambda t, i: t[i], jnp.int32(7)),
    # a static id: slice of one row, squeezed
    "static_id": (lambda t, i: t[3] + t[-1] * i.astype(t.dtype), jnp.int32(2)),
    # vmap of the scalar lookup: a gather that keeps the row axis (size 1), squeezed
    "vmapped": (lambda t, ids: jax.vmap(lambda i: t[i])(ids), jnp.array([4, 0, 9, 4])),
    # twice vmapped
    "vmapped_2d": (
        lambda t, ids: jax.vmap(jax.vmap(lambda i: t[i]))(ids),
        jnp.array([[1, 2, 3], [9, 8, 0]]),
    ),
    # jnp.take along the rows: a gather collapsing the row axis (inside a jit)
    "take": (lambda t, ids: jnp.take(t, ids, axis=0), jnp.array([5, 1, 1, 8])),
    "take_scalar": (lambda t, i: jnp.take(t, i, axis=0), jnp.int32(6)),
    # fancy indexing with an array of ids
    "index_array": (lambda t, ids: t[ids], jnp.array([[3, 2], [0, 9]])),
    # windows of rows under vmap: a gather of 2-row slices
    "vmapped_window": (
        lambda t, ids: jax.vmap(lambda i: lax.dynamic_slice_in_dim(t, i, 2))(ids),
        jnp.array([0, 3, 8]),
    ),
    # an id out of range is clamped as for the plain table
    "clamped": (lambda t, i: lax.dynamic_slice_in_dim(t, i, 3), jnp.int32(9)),
}


@pytest.mark.parametrize("form", sorted(LOOKUPS))
def test_row_lookups_run_factored(form):
    lookup, ids = LOOKUPS[form]
    params = {"embedding": normal(0, (V, D))}
    lp = adapt(params, jlora.LoraConfig(3, 6, targets="embedding"))

    def fn(p, ids):
        return lookup(p["embedding"], ids) * 1.5

    check(fn, lp, (ids,), k=3, depth=2)


@pytest.mark.parametrize("form", sorted(LOOKUPS))
def test_probe_reads_lookups_as_rows_in_features_out(form):
    # A table [rows, heads, features]: rows are the inputs, both other axes outputs,
    # which only the lookup can tell (a default guess would be wrong).
    lookup, ids = LOOKUPS[form]
    params = {"table": normal(0, (V, 2, 3))}

    def fn(p, ids):
        return lookup(p["table"], ids)

    cfg = jlora.LoraConfig(2, 2, targets="table")
    lp = adapt(params, cfg, probe=lambda p: fn(p, ids))
    assert lp["table"].layout == jlora.Layout((0,), (1, 2))
    check(fn, lp, (ids,), k=2, depth=2)


def test_lookups_inside_scan_and_tied_decode():
    # A decoder loop reading one token's row per step, then a tied readout x @ E.T.
    params = {"embedding": normal(0, (V, D))}
    lp = adapt(params, jlora.LoraConfig(3, 6, targets="embedding"))

    def fn(p, tokens):
        def step(h, tok):
            h = jnp.tanh(h + p["embedding"][tok])
            return h, h @ p["embedding"].T

        return lax.scan(step, jnp.zeros(D), tokens)[1]

    check(fn, lp, (jnp.array([1, 4, 4, 9]),), k=D, depth=8, rules=("scan",))


# Slices ---------------------------------------------------------------------------------


def test_column_and_row_slices_of_a_kernel():
    params = {"kernel": normal(0, (8, 12))}
    lp = adapt(params, jlora.LoraConfig(3, 6))
    x = normal(1, (2, 8))

    def fn(p, x):
        w = p["kernel"]
        q, k, v = jnp.split(w, 3, axis=1)  # a fused qkv kernel
        head = x @ w[:, :4]
        rows = x[:, :5] @ w[:5]
        window = x[:, 1:7] @ lax.slice(w, (1, 2), (7, 10))
        strided = x[:, ::2] @ w[::2, 1::3]
        return x @ q, x @ k, x @ v, head, rows, window, strided

    explained = check(fn, lp, (x,), k=8, depth=2, rules=("split", "slice"))
    assert "dot_general" in explained["kernel"]


def test_dynamic_slice_of_a_position_table():
    params = {"embedding": normal(0, (16, D))}
    lp = adapt(params, jlora.LoraConfig(3, 6, targets="embedding"))

    def fn(p, t):
        pos = lax.dynamic_slice_in_dim(p["embedding"], t, 4)  # positions t .. t+3
        return pos, lax.dynamic_slice(p["embedding"], (t, 2), (2, 3))

    for t in (jnp.int32(5), jnp.int32(15)):  # 15: clamped to the last window
        check(fn, lp, (t,), k=3, depth=2, rules=("dynamic_slice",))


# Concatenation --------------------------------------------------------------------------


def _two_kernels(shape_q, shape_k):
    params = {"q": {"kernel": normal(0, shape_q)}, "k": {"kernel": normal(1, shape_k)}}
    cfg = jlora.LoraConfig(
        2, 4, targets="kernel", rank_pattern={"^k/": 3}, alpha_pattern={"^k/": 9.0}
    )
    lp = adapt(params, cfg)
    assert lp["q"]["kernel"].scale != lp["k"]["kernel"].scale
    return lp


def test_concatenate_kernels_along_outputs_and_inputs():
    x = normal(2, (3, 6))

    def outputs(p, x):  # [6, 5] | [6, 4]: one kernel of rank 2 + 3
        w = jnp.concatenate([p["q"]["kernel"], p["k"]["kernel"]], axis=1)
        return x @ w

    lp = _two_kernels((6, 5), (6, 4))
    explained = check(outputs, lp, (x,), k=6, depth=2, rules=("concatenate",))
    # What happens to the joint kernel is recorded for each of its parts.
    assert explained["q/kernel"] == explained["k/kernel"] == ("concatenate", "dot_general")

    def dense(p, x):
        return x @ jnp.sin(jnp.concatenate([p["q"]["kernel"], p["k"]["kernel"]], axis=1))

    with pytest.raises(jlora.RuleError, match="q/kernel \\+ k/kernel flows into 'sin'"):
        jlora.lora(dense, strict=True)(lp, x)
    assert "materialize:sin" in jlora.explain(dense, lp, x)["k/kernel"]

    def inputs(p, x):  # [6, 5] over [4, 5]
        w = jnp.concatenate([p["q"]["kernel"], p["k"]["kernel"]], axis=0)
        return jnp.concatenate([x, x[:, :4]], 1) @ w

    check(inputs, _two_kernels((6, 5), (4, 5)), (x,), k=10, depth=2, rules=("concatenate",))


def test_concatenate_a_kernel_with_plain_arrays():
    params = {"kernel": normal(0, (6, 5))}
    lp = adapt(params, jlora.LoraConfig(2, 4))
    x = normal(2, (3, 6))
    cols, rows = normal(3, (6, 2)), normal(4, (2, 5))

    def fn(p, x, cols, rows):
        w = p["kernel"]
        wide = jnp.concatenate([cols, w, jnp.zeros((6, 1))], axis=1)
        tall = jnp.concatenate([w, rows], axis=0)
        return x @ wide, jnp.concatenate([x, x[:, :2]], 1) @ tall

    check(fn, lp, (x, cols, rows), k=8, depth=2, rules=("concatenate",))


def test_concatenate_stacked_kernels_along_the_stack():
    params = {"a": {"kernel": normal(0, (2, 6, 5))}, "b": {"kernel": normal(1, (3, 6, 5))}}
    stack = jlora.Layout((1,), (2,), (0,))
    cfg = jlora.LoraConfig(
        2,
        4,
        targets="kernel",
        layout={"kernel": stack},
        rank_pattern={"^b/": 3},
    )
    lp = adapt(params, cfg)
    xs = normal(2, (6, 4, 6))

    def fn(p, xs):
        ws = jnp.concatenate([p["a"]["kernel"], p["b"]["kernel"], jnp.ones((1, 6, 5))])
        return jnp.einsum("lbi,lio->lbo", xs, ws)

    check(fn, lp, (xs,), k=6, depth=2, rules=("concatenate",))


def test_probe_follows_a_concatenation():
    # Kernels stored [out, in] (as PyTorch's and Equinox's Linear.weight) joined and
    # used as x @ W.T: the probe reads both through the concatenation.
    params = {"q": {"weight": normal(0, (5, 6))}, "k": {"weight": normal(1, (4, 6))}}
    x = normal(2, (3, 6))

    def fn(p, x):
        return x @ jnp.concatenate([p["q"]["weight"], p["k"]["weight"]], 0).T

    lp = adapt(params, jlora.LoraConfig(2, 4, targets="weight"), probe=lambda p: fn(p, x))
    for name in "qk":
        assert lp[name]["weight"].layout == jlora.Layout((1,), (0,))
    check(fn, lp, (x,), k=6, depth=2, rules=("concatenate",))


# Reshapes -------------------------------------------------------------------------------


def test_reshape_merging_and_splitting_axes_of_one_role():
    params = {
        "heads": {"kernel": normal(0, (6, 2, 3))},  # [d, h, hd]: outputs (1, 2)
        "flat": {"kernel": normal(1, (6, 6))},  # [d, h*hd]
        "proj": {"kernel": normal(2, (2, 3, 4))},  # [h, hd, d]: inputs (0, 1)
    }
    cfg = jlora.LoraConfig(
        2,
        4,
        targets="kernel",
        layout={
            "heads": jlora.Layout((0,), (1, 2)),
            "proj": jlora.Layout((0, 1), (2,)),
        },
    )
    lp = adapt(params, cfg)
    x = normal(3, (3, 6))

    def fn(p, x):
        merged = x @ p["heads"]["kernel"].reshape(6, 6)
        split = jnp.einsum("bd,dhk->bhk", x, p["flat"]["kernel"].reshape(6, 2, 3))
        inputs = x @ p["proj"]["kernel"].reshape(6, 4)
        round_trip = x @ p["heads"]["kernel"].reshape(6, 6).reshape(6, 3, 2)[:, 1]
        return merged, split, inputs, round_trip

    check(fn, lp, (x,), k=6, depth=2, rules=("reshape",))


def test_probe_follows_a_reshape():
    params = {"kernel": normal(0, (6, 2, 3))}
    x = normal(3, (3, 6))

    def fn(p, x):
        return x @ p["kernel"].reshape(6, 6)

    lp = adapt(params, jlora.LoraConfig(2, 4), probe=lambda p: fn(p, x))
    assert lp["kernel"].layout == jlora.Layout((0,), (1, 2))
    check(fn, lp, (x,), k=6, depth=2, rules=("reshape",))


def test_reshape_that_mixes_roles_materializes_with_a_warning():
    params = {"kernel": normal(0, (6, 4))}
    lp = adapt(params, jlora.LoraConfig(2, 4))

    def fn(p, x):
        return x @ p["kernel"].reshape(4, 6)  # rows and columns interleave

    with pytest.raises(jlora.RuleError, match="kernel flows into 'reshape'"):
        jlora.lora(fn, strict=True)(lp, jnp.ones((1, 4)))


# Scalings -------------------------------------------------------------------------------


def test_kernel_times_a_scalar():
    params = {"kernel": normal(0, (6, 5))}
    lp = adapt(params, jlora.LoraConfig(2, 4))
    x = normal(1, (3, 6))
    cols, rows = normal(2, (5,)), normal(3, (6,))

    def fn(p, x, s, cols, rows):
        w = p["kernel"]
        return (
            x @ (w * 0.5),
            x @ (2 * w),
            x @ (w / 3.0),
            x @ (w * s),
            x @ (s * w),
            x @ (w / s),
            x @ -w,
            x @ (w * cols),  # one factor per output column: scales b
            x @ (w * rows[:, None]),  # per input row: scales a
        )

    check(fn, lp, (x, jnp.float32(-1.7), cols, rows), k=6, depth=3, rules=("mul",))


def test_a_traced_multiplier_gets_its_gradient():
    params = {"kernel": normal(0, (6, 5))}
    lp = adapt(params, jlora.LoraConfig(2, 4))
    x = normal(1, (3, 6))

    def fn(p, s):
        return (x @ (p["kernel"] * s)).sum()

    got = jax.grad(jlora.lora(fn, strict=True), argnums=1)(lp, jnp.float32(0.7))
    want = jax.grad(fn, argnums=1)(jlora.merge(lp), jnp.float32(0.7))
    assert_close(got, want, chain_bound(6, 3))


def test_scalar_over_a_kernel_is_not_low_rank():
    lp = adapt({"kernel": normal(0, (6, 5))}, jlora.LoraConfig(2, 4))
    with pytest.raises(jlora.RuleError, match="kernel flows into 'div'"):
        jlora.lora(lambda p, x: x @ (1.0 / p["kernel"]), strict=True)(lp, jnp.ones((1, 6)))


# Convolutions and custom derivatives ----------------------------------------------------


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_convolution(groups):
    cin, cout = 4, 8
    params = {"kernel": normal(0, (3, 3, cin // groups, cout))}
    cfg = jlora.LoraConfig(2, 4, layout={"kernel": jlora.Layout((0, 1, 2), (3,))})
    lp = adapt(params, cfg)
    x = normal(1, (2, 6, 6, cin))

    def fn(p, x):
        return lax.conv_general_dilated(
            x,
            p["kernel"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )

    check(fn, lp, (x,), k=9 * cin // groups, depth=2, rules=("conv_general_dilated",))


@pytest.mark.parametrize("kind", ["custom_jvp", "custom_vjp"])
def test_custom_derivative_around_a_kernel_use_says_what_to_do(kind):
    def matmul(x, w):
        return x @ w

    if kind == "custom_jvp":
        op = jax.custom_jvp(matmul)
        op.defjvp(lambda p, t: (matmul(*p), matmul(t[0], p[1]) + matmul(p[0], t[1])))
    else:
        op = jax.custom_vjp(matmul)
        op.defvjp(
            lambda x, w: (matmul(x, w), (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g)
        )
    lp = adapt({"kernel": normal(0, (6, 5))}, jlora.LoraConfig(2, 4))
    x = normal(1, (3, 6))

    def fn(p, x):
        return op(x, p["kernel"])

    with pytest.raises(jlora.RuleError, match=f"{kind}.*outside the custom"):
        jlora.lora(fn, strict=True)(lp, x)
    with pytest.warns(UserWarning, match="exact"):
        got = jlora.lora(fn)(lp, x)
    assert_close(got, fn(jlora.merge(lp), x), chain_bound(6, 2))
    np.testing.assert_array_equal(np.shape(got), (3, 5))


# Kernels handed back unchanged by control flow ------------------------------------------
#
# NNX's transforms (`nnx.remat`, `nnx.scan`, `nnx.fori_loop`, `nnx.cond`) return the
# module state they were given, kernels included; a kernel that leaves a body unchanged
# stays factored (and is used again after it) instead of being materialized.


def _square(seed=0):
    return adapt({"kernel": normal(seed, (6, 6))}, jlora.LoraConfig(2, 4))


def test_remat_hands_a_kernel_back_factored():
    def fn(p, x):
        y, w = jax.checkpoint(lambda w, x: (jnp.tanh(x @ w), w))(p["kernel"], x)
        return y @ w

    check(fn, _square(), (normal(1, (3, 6)),), k=6, depth=2, rules=("remat",))


def test_cond_hands_a_kernel_back_factored():
    def fn(p, x, flag):
        def yes(w, x):
            return w, jnp.tanh(x @ w)

        def no(w, x):
            return w, -x

        w, h = lax.cond(flag, yes, no, p["kernel"], x)
        return h @ w

    for flag in (True, False):
        check(fn, _square(), (normal(1, (3, 6)), flag), k=6, depth=2, rules=("cond",))


def test_loops_carry_a_kernel_back_factored():
    def scanned(p, x):
        def body(carry, _):
            w, h = carry
            return (w, jnp.tanh(h @ w)), None

        (w, h), _ = lax.scan(body, (p["kernel"], x), length=3)
        return h @ w

    def looped(p, x):
        def body(carry):
            i, w, h = carry
            return i + 1, w, jnp.tanh(h @ w)

        _, w, h = lax.while_loop(lambda c: c[0] < 3, body, (0, p["kernel"], x))
        return h @ w

    check(scanned, _square(), (normal(1, (3, 6)),), k=6, depth=4, rules=("scan",))
    # A while loop has no reverse-mode derivative: forward only.
    lp, x = _square(), normal(1, (3, 6))
    used = jlora.explain(looped, lp, x)["kernel"]
    assert "while" in used and not any(r.startswith("materialize") for r in used), used
    out = jax.jit(jlora.lora(looped, strict=True))(lp, x)
    assert_close(out, looped(jlora.merge(lp), x), chain_bound(6, 4))


def test_scan_hands_a_stacked_kernel_back_stacked():
    cfg = jlora.LoraConfig(2, 4, layout={"kernel": jlora.Layout((1,), (2,), (0,))})
    lp = adapt({"kernel": normal(0, (3, 6, 6))}, cfg)

    def fn(p, x):
        def body(h, w):
            return jnp.tanh(h @ w), w  # each layer's kernel out as a scan output

        h, ws = lax.scan(body, x, p["kernel"])
        h, _ = lax.scan(body, h, ws)  # the stack again, used a second time
        return h

    check(fn, lp, (normal(1, (3, 6)),), k=6, depth=6, rules=("scan",))
