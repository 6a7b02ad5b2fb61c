"""merge / unmerge / split / combine, and LoraWeight as a pytree node."""

import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close, chain_bound, gamma, perturb

import jlora


def _params(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "attn": {
            "q": {
                "kernel": jax.random.normal(k[0], (64, 48), dtype),
                "bias": jnp.zeros(48, dtype),
            },
            "o": {"kernel": jax.random.normal(k[1], (4, 12, 64), dtype)},
        },
        "head": {
            "kernel": jax.random.normal(k[2], (64, 10), dtype),
            "bias": jax.random.normal(k[3], (10,), dtype),
        },
    }


CFG = jlora.LoraConfig(
    8,
    16,
    layout={"o/kernel": jlora.Layout((0, 1), (2,))},
    train_bias="lora_only",
    also_train="head/bias",
    targets="attn/.*kernel",
)


def merge_scale(lw) -> np.ndarray:
    """`|w| + |scale| * |a| @ |b|` per element, in float64 (an independent einsum): the
    magnitudes a float merge of this kernel rounds against."""
    a = np.abs(np.asarray(lw.a, np.float64))
    b = np.abs(np.asarray(lw.b, np.float64))
    prod = np.einsum(lw.layout.product_subscripts(), a, b)
    return np.abs(np.asarray(lw.w, np.float64)) + abs(lw.scale) * prod


def test_merge_unmerge_round_trip_float32():
    lp = perturb(jlora.init(jax.random.key(1), _params(), CFG), jax.random.key(2), 0.5)
    adapters, _ = jlora.split(lp)
    back = jlora.unmerge(jlora.merge(lp), adapters)
    for path in (("attn", "q", "kernel"), ("attn", "o", "kernel")):
        lw = lp[path[0]][path[1]][path[2]]
        w2 = back[path[0]][path[1]][path[2]].w
        err = np.abs(np.asarray(w2, np.float64) - np.asarray(lw.w, np.float64))
        # merge and unmerge: each an r-term product plus one rounding of the sum.
        bound = 2 * gamma(lw.rank + 1) * merge_scale(lw)
        assert (err <= bound).all(), float((err / bound).max())


def test_merge_unmerge_round_trip_bfloat16_within_stated_bound():
    lp = perturb(
        jlora.init(jax.random.key(1), _params(jnp.bfloat16), CFG), jax.random.key(2), 0.5
    )
    adapters, _ = jlora.split(lp)
    back = jlora.unmerge(jlora.merge(lp), adapters)
    for name in ("q", "o"):
        lw = lp["attn"][name]["kernel"]
        w = np.asarray(lw.w, np.float32)
        err = np.abs(np.asarray(back["attn"][name]["kernel"].w, np.float32) - w)
        delta = np.abs(np.asarray(lw.delta()))
        # The documented bound: two roundings, each at most half an ulp of the larger.
        assert (err <= 2.0**-8 * (np.abs(w) + delta) + 1e-30).all()
        assert err.max() > 0  # bfloat16 does round: the bound is not vacuous


def test_merge_keeps_structure_dtypes_and_hits_base_jit_cache():
    params = _params(jnp.bfloat16)
    lp = jlora.init(jax.random.key(1), params, CFG)
    merged = jlora.merge(lp)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        assert a.shape == b.shape and a.dtype == b.dtype

    @jax.jit
    def f(p):
        return jax.tree.reduce(lambda s, x: s + x.astype(jnp.float32).sum(), p, 0.0)

    f(params)
    f(merged)
    assert f._cache_size() == 1


def test_merge_jit_donated_in_place():
    lp = perturb(jlora.init(jax.random.key(1), _params(), CFG), jax.random.key(2))
    expected = jax.tree.map(np.array, jlora.merge(lp))  # host copies: lp is donated
    merge = jax.jit(jlora.merge, donate_argnums=0)
    stats = merge.lower(lp).compile().memory_analysis()
    kernel_bytes = sum(
        lw.w.nbytes
        for lw in jax.tree.leaves(lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
        if isinstance(lw, jlora.LoraWeight)
    )
    assert stats.alias_size_in_bytes >= kernel_bytes  # outputs reuse the kernels' buffers
    scales = {
        p: merge_scale(lp["attn"][p]["kernel"]) for p in ("q", "o")
    }  # read before lp is donated
    got = merge(lp)
    for name, scale in scales.items():
        # Both run the per-kernel computation, but inside jit XLA may fuse it with
        # its neighbours: equal to the rounding of one merge each, not bitwise.
        err = np.abs(
            np.asarray(got["attn"][name]["kernel"]) - expected["attn"][name]["kernel"]
        )
        assert (err <= 2 * gamma(CFG.rank + 1) * scale).all()
    for a, b in zip(jax.tree.leaves(got["head"]), jax.tree.leaves(expected["head"])):
        np.testing.assert_array_equal(a, b)  # not adapted: untouched


def test_merge_safe_reports_nan_paths_and_is_eager_only():
    lp = jlora.init(jax.random.key(1), _params(), CFG)
    bad = jax.tree.map(lambda x: x, lp)
    q = bad["attn"]["q"]["kernel"]
    bad["attn"]["q"]["kernel"] = q.replace(b=q.b.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"NaN or Inf at \['attn/q/kernel'\]"):
        jlora.merge(bad, safe=True)
    jlora.merge(lp, safe=True)  # finite: no error
    with pytest.raises(TypeError, match="eager-only"):
        jax.jit(lambda p: jlora.merge(p, safe=True))(lp)


def test_split_combine_exact_with_trained_biases():
    lp = perturb(jlora.init(jax.random.key(1), _params(), CFG), jax.random.key(2))
    adapters, base = jlora.split(lp)
    trainable = jax.tree.leaves(adapters)
    # a, b of both kernels + the q bias (lora_only) + the head bias (also_train)
    assert len(trainable) == 6
    assert jlora.summary(lp).trainable_params == sum(x.size for x in trainable)
    assert not any(x is y for x in trainable for y in jax.tree.leaves(base))  # disjoint
    back = jlora.combine(adapters, base)
    assert jax.tree.structure(back) == jax.tree.structure(lp)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
        np.testing.assert_array_equal(a, b)
    # Adapters go back onto the plain base params too.
    onto_plain = jlora.combine(adapters, _params())
    np.testing.assert_array_equal(
        jlora.merge(onto_plain)["attn"]["q"]["kernel"],
        jlora.merge(lp)["attn"]["q"]["kernel"],
    )


def test_combine_and_unmerge_list_every_mismatch():
    lp = jlora.init(jax.random.key(1), _params(), CFG)
    adapters, base = jlora.split(lp)
    other = jlora.init(
        jax.random.key(1),
        {
            **_params(),
            "attn": {
                **_params()["attn"],
                "q": {"kernel": jnp.zeros((32, 48)), "bias": jnp.zeros(48)},
                "o": {"kernel": jnp.zeros((4, 12, 60))},
            },
        },
        CFG,
    )
    _, other_base = jlora.split(other)
    with pytest.raises(ValueError) as err:
        jlora.combine(adapters, other_base)
    assert "attn/q/kernel" in str(err.value) and "attn/o/kernel" in str(err.value)
    missing = {"attn": base["attn"]}
    with pytest.raises(ValueError, match="in adapters but not in base: head/bias"):
        jlora.combine(adapters, missing)
    with pytest.raises(ValueError, match="in adapters but not in merged"):
        jlora.unmerge({"attn": jlora.merge(lp)["attn"]}, adapters)


def test_pytree_transforms_accept_lora_weight():
    lp = jlora.init(jax.random.key(1), _params(), CFG)
    shapes = jax.eval_shape(lambda p: p, lp)
    lw = shapes["attn"]["q"]["kernel"]
    assert isinstance(lw, jlora.LoraWeight) and lw.a.shape == (64, 8)
    assert lw.scale == 2.0
    paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(lp)[0]
    ]
    assert "['attn']['q']['kernel'].a" in paths
    masked = jax.tree.map(lambda x: optax.MaskedNode(), lp)  # children of any type
    assert isinstance(masked["attn"]["q"]["kernel"], jlora.LoraWeight)
    specs = jax.tree.map(lambda x: jax.sharding.PartitionSpec(), lp)
    assert isinstance(specs["attn"]["q"]["kernel"].a, jax.sharding.PartitionSpec)


def test_jax_export_round_trip():
    lp = perturb(jlora.init(jax.random.key(1), _params(), CFG), jax.random.key(2))
    x = jnp.ones((3, 64))

    def fn(p, x):
        q = p["attn"]["q"]
        return x @ q["kernel"] + q["bias"]

    applied = jax.jit(jlora.lora(fn))
    exported = jax.export.export(applied)(lp, x)
    restored = jax.export.deserialize(exported.serialize())
    assert restored.in_tree == exported.in_tree
    assert_close(restored.call(lp, x), fn(jlora.merge(lp), x), chain_bound(k=64, depth=3))


def test_linen_apply_on_merged_boxed_params_round_trip():
    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "mlp"))
            return nn.Dense(8, kernel_init=init)(x)

    m = Boxed()
    v = m.init(jax.random.key(0), jnp.ones((1, 8)))
    lp = perturb(
        jlora.init(jax.random.key(1), v, jlora.LoraConfig(2, 2)), jax.random.key(2)
    )
    adapters, _ = jlora.split(lp)
    back = jlora.unmerge(jlora.merge(lp), adapters)
    lw = nn.unbox(lp["params"]["Dense_0"]["kernel"])
    err = np.abs(np.asarray(nn.unbox(back["params"]["Dense_0"]["kernel"].w)) - lw.w)
    assert (err <= 2 * gamma(lw.rank + 1) * merge_scale(lw)).all()


# Bounded memory: every entry point runs one compiled computation per kernel ----------


def _big(dtype, rank, dim=512):
    w = jax.random.normal(jax.random.key(0), (dim, dim), dtype)
    lp = jlora.init(
        jax.random.key(1),
        {"k1": w, "k2": w[:, :256]},
        jlora.LoraConfig(rank, rank, targets="k"),
    )
    return perturb(lp, jax.random.key(2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rank", [32, 64])  # fused product, and a dot above rank 32
def test_merge_kernel_memory_is_one_float32_kernel_at_most(dtype, rank):
    """XLA's memory analysis of the per-kernel computation: temporaries no larger than
    one float32 copy of the kernel plus its factors (the eager path used to hold the
    `[in, out, r]` broadcast product, r float32 kernels)."""
    lw = _big(dtype, rank)["k1"]
    kernel_f32 = lw.w.size * 4
    factors = lw.a.nbytes + lw.b.nbytes
    for fn, kw in (
        (jlora._merge.merge_kernel, {"check": False}),
        (jlora._merge.merge_kernel, {"check": True}),
        (jlora._merge.unmerge_kernel, {}),
    ):
        mem = (
            fn.lower(lw.w, lw.a, lw.b, layout=lw.layout, scale=lw.scale, **kw)
            .compile()
            .memory_analysis()
        )
        assert mem.temp_size_in_bytes <= kernel_f32 + factors, (fn, kw, mem)


def test_every_eager_entry_point_runs_the_per_kernel_computation(tmp_path, monkeypatch):
    lp = _big(jnp.float32, 32)
    calls = []
    for name in ("merge_kernel", "unmerge_kernel"):
        real = getattr(jlora._merge, name)

        def spy(*args, _real=real, _name=name, **kw):
            calls.append((_name, args[0].shape))
            return _real(*args, **kw)

        monkeypatch.setattr(jlora._merge, name, spy)
    merged = jlora.merge(lp)
    jlora.merge(lp, safe=True)
    jlora.unmerge(merged, jlora.split(lp)[0])
    jlora.save_merged(tmp_path / "merged", lp)
    shapes = [(512, 512), (512, 256)]
    assert calls == [
        *(("merge_kernel", s) for s in shapes),
        *(("merge_kernel", s) for s in shapes),
        *(("unmerge_kernel", s) for s in shapes),
        *(("merge_kernel", s) for s in shapes),
    ]
    # The compiled merge is the formula: an independent float64 NumPy oracle.
    lw = lp["k1"]
    ref = np.asarray(lw.w, np.float64) + lw.scale * (
        np.asarray(lw.a, np.float64) @ np.asarray(lw.b, np.float64)
    )
    err = np.max(np.abs(np.asarray(merged["k1"], np.float64) - ref))
    # One rounding of the float32 sum, and a 32-term product accumulated in float32.
    assert err <= (2.0**-24 + gamma(32)) * np.max(np.abs(ref)) * 2


def test_eager_merge_peak_memory_in_a_fresh_process():
    """End to end: the process's peak resident memory while merging eagerly grows by
    about the output, not by rank x the kernel."""
    code = textwrap.dedent(
        """
        import resource, jax, jax.numpy as jnp, jlora
        w = jax.random.normal(jax.random.key(0), (2048, 2048))
        lp = jlora.init(jax.random.key(1), {"k": w}, jlora.LoraConfig(32, 32, targets="k"))
        lp = {"k": lp["k"].replace(b=lp["k"].b + 0.01)}
        lw = lp["k"]
        jlora._merge.merge_kernel.lower(  # compile first: measure the run alone
            lw.w, lw.a, lw.b, layout=lw.layout, scale=lw.scale, sharding=None
        ).compile()
        jax.block_until_ready(lp)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        jax.block_until_ready(jlora.merge(lp))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    grown = int(out.stdout.strip().splitlines()[-1])
    kernel = 2048 * 2048 * 4  # 16 MiB; the broadcast product would be 32 of them
    assert grown <= 4 * kernel, f"peak memory grew by {grown / 2**20:.0f} MiB"


# Wrong trees: a clear error naming the path, never a silent result ----------------------


def test_unmerge_refuses_params_that_are_still_adapted():
    """`unmerge` of params that were never merged would take `w - delta` as the new base
    (a silently wrong kernel); it must refuse and name the path."""
    lp = perturb(jlora.init(jax.random.key(1), _params(), CFG), jax.random.key(2))
    adapters = jlora.split(lp)[0]
    with pytest.raises(ValueError, match=r"attn/q/kernel: merged holds an adapted kernel"):
        jlora.unmerge(lp, adapters)
    # The merged tree still unmerges (the check is not a blanket refusal).
    back = jlora.unmerge(jlora.merge(lp), adapters)
    assert isinstance(back["attn"]["q"]["kernel"], jlora.LoraWeight)


def test_merge_of_split_adapters_says_combine_with_the_base(tmp_path):
    """`split`'s adapters where adapted params were wanted (the lean route's obvious
    slip): merge, save_merged and lora(fn) each say what is missing and what to call."""
    lp = jlora.init(jax.random.key(1), _params(), CFG)
    adapters = jlora.split(lp)[0]
    with pytest.raises(ValueError, match=r"without a base kernel at \['attn/o/kernel'.*"
                       r"jlora\.combine\(adapters, base\)"):
        jlora.merge(adapters)
    with pytest.raises(ValueError, match=r"without a base kernel.*jlora\.combine"):
        jlora.save_merged(tmp_path / "merged", adapters)
    assert not (tmp_path / "merged").exists()
    x = jnp.ones((2, 64))

    def fn(p, x):
        return x @ p["attn"]["q"]["kernel"]

    for call in (jlora.lora(fn), jax.jit(jlora.lora(fn))):
        with pytest.raises(ValueError, match=r"attn/.*/kernel holds adapters without a "
                           r"base kernel.*jlora\.combine\(adapters, base\)"):
            call(adapters, x)


def _bf16_rounding_oracle(lw):
    """What rounding the float32 sum `w + delta` to bfloat16 does to the update, in
    float64 NumPy, with the elements whose rounding jlora's float32 product may decide
    otherwise (within its error bound of a rounding boundary) counted apart."""
    import ml_dtypes

    w = np.asarray(lw.w.astype(jnp.float32), np.float64)
    a, b = np.asarray(lw.a, np.float64), np.asarray(lw.b, np.float64)
    delta = lw.scale * (a @ b)
    # The float32 product and sum are within this of the exact sum, elementwise.
    err = gamma(lw.rank + 1) * abs(lw.scale) * (np.abs(a) @ np.abs(b))
    err += 2.0**-24 * (np.abs(w) + np.abs(delta)) + 1e-300

    def rounded(x):
        return x.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)

    merged = rounded(w + delta)
    ambiguous = rounded(w + delta - err) != rounded(w + delta + err)
    applied = merged - w
    moved = delta != 0
    unchanged = np.sum(moved & (applied == 0)) / np.sum(moved)
    error = np.linalg.norm(applied - delta) / np.linalg.norm(delta)
    return unchanged, error, ambiguous, w


def test_merge_safe_reports_what_bfloat16_rounding_dropped_of_each_update():
    """A small update (|delta| / |w| about 3e-3) merged into a bfloat16 kernel loses
    much of itself to the one rounding; `merge(safe=True)` says how much, per path, and
    a float32 merge of the same params says nothing."""
    w = jax.random.normal(jax.random.key(0), (128, 96), jnp.float32)
    lp = jlora.init(
        jax.random.key(1),
        {"dense": {"kernel": w.astype(jnp.bfloat16)}},
        jlora.LoraConfig(4, 4),
    )
    lw = lp["dense"]["kernel"]
    # b chosen so that scale * a @ b has an RMS of about 3e-3 (|w| is about 1).
    b = jax.random.normal(jax.random.key(2), lw.b.shape) * 3e-3 / np.sqrt(
        np.mean(np.square(np.asarray(lw.a)), axis=0).sum() * lw.scale**2
    ).astype(np.float32)
    lw = lw.replace(b=b.astype(jnp.float32))
    lp = {"dense": {"kernel": lw}}
    with pytest.warns(jlora.RoundingWarning, match="dense/kernel: bfloat16") as rec:
        jlora.merge(lp, safe=True)
    (warning,) = [w for w in rec if issubclass(w.category, jlora.RoundingWarning)]
    got = warning.message.report["dense/kernel"]
    unchanged, error, ambiguous, _ = _bf16_rounding_oracle(lw)
    n = ambiguous.size
    assert got.dtype == "bfloat16"
    assert abs(got.unchanged - unchanged) <= ambiguous.sum() / n + 1 / n
    # Each ambiguous element moves the applied update by at most one bfloat16 step.
    ulp = 2.0**-7 * (np.abs(np.asarray(lw.w, np.float64)) + 3e-2)
    slack = np.sqrt(np.sum(np.where(ambiguous, ulp, 0) ** 2))
    delta_norm = np.linalg.norm(lw.scale * np.asarray(lw.a, np.float64) @ np.asarray(b))
    assert abs(got.update_error - error) <= slack / delta_norm + 1e-6
    assert unchanged > 0.2 and error > 0.1  # the case the report is for

    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), lp)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.RoundingWarning)
        jlora.merge(f32, safe=True)  # float32 keeps the update: no warning
