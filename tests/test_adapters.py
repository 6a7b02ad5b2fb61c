"""Many adapters on one base: stacked sets and selection, weighted combination, and
mixed batches (every row served by its own adapter, -1 the base), against the merged
model of each row's adapter on its own."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, chain_bound, perturb

import jlora


class Block(nn.Module):
    """A small attention block with a residual MLP: the batch axis is mixed into the
    attention's reshapes, so a per-row result that is right is not luck."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        dense = lambda name: nn.Dense(  # noqa: E731
            d, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        q, k, v = (dense(n)(x).reshape(b, t, 2, d // 2) for n in "qkv")
        att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / 4.0, axis=-1)
        y = jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, d)
        y = dense("o")(y) + x
        return dense("mlp")(jax.nn.gelu(y)) + y


D, T = 16, 5


def make(dtype=jnp.float32):
    model = Block(dtype)
    x = jax.random.normal(jax.random.key(0), (6, T, D), dtype)
    base = model.init(jax.random.key(1), x)["params"]
    adapters = {}
    for i, (rank, alpha) in enumerate([(2, 4.0), (4, 3.0), (3, 8.0)]):
        config = jlora.LoraConfig(rank, alpha, targets=r"(q|v|mlp)/kernel$")
        p = perturb(jlora.init(jax.random.key(10 + i), base, config), jax.random.key(i))
        adapters[f"task{i}"] = jlora.split(p)[0]
    return model, x, base, adapters


def merged_row(model, base, adapters, name, x_row):
    """The oracle: the merged model of one adapter (or the base), on one row."""
    params = base if name is None else jlora.merge(jlora.combine(adapters[name], base))
    return model.apply({"params": params}, x_row)


def test_stack_pads_ranks_folds_scales_and_selects_each_adapter_exactly():
    model, x, base, adapters = make()
    stacked = jlora.stack_adapters(adapters)
    lw = stacked["q"]["kernel"]
    assert lw.a.shape == (3, D, 4) and lw.b.shape == (3, 4, D) and lw.scale == 1.0
    assert lw.stack.names == ("task0", "task1", "task2") and lw.stack.ranks == (2, 4, 3)
    for k, name in enumerate(adapters):
        own = adapters[name]["q"]["kernel"]
        r = own.rank
        np.testing.assert_array_equal(lw.a[k, :, r:], 0)  # zero padding
        np.testing.assert_array_equal(lw.b[k, r:], 0)
        one = jlora.select(jlora.combine(stacked, base), name)
        ref = merged_row(model, base, adapters, name, x)
        assert_close(model.apply({"params": jlora.merge(one)}, x), ref, chain_bound(D, 8))
        # a traced index gives the same adapter
        by_index = jax.jit(lambda s, i: jlora.select(s, i))(stacked, k)
        np.testing.assert_array_equal(by_index["q"]["kernel"].a, lw.a[k])
    back = jlora.unstack_adapters(stacked)
    assert list(back) == list(adapters)
    for name in adapters:
        for path in ("q", "v", "mlp"):
            got, want = back[name][path]["kernel"], adapters[name][path]["kernel"]
            assert got.scale == want.scale and got.rank == want.rank
            np.testing.assert_array_equal(got.a, want.a)
            # b * scale / scale: within one rounding of b (exact for a power of 2)
            assert_close(got.b, want.b, 2 * 2.0**-24)


def test_stack_refuses_adapters_of_other_kernels_or_bases_naming_the_path():
    model, x, base, adapters = make()
    other = jlora.split(jlora.init(jax.random.key(3), base, jlora.LoraConfig(2, 2)))[0]
    with pytest.raises(ValueError, match="'b' adapts other kernels than 'a'"):
        jlora.stack_adapters({"a": adapters["task0"], "b": other})
    wide = jax.tree.map(lambda w: jnp.zeros((w.shape[0], 2 * w.shape[-1])), base)
    wide = {k: v for k, v in wide.items()}
    config = jlora.LoraConfig(2, 4.0, targets=r"(q|v|mlp)/kernel$")
    small = jlora.split(jlora.init(jax.random.key(4), wide, config))[0]
    with pytest.raises(ValueError, match="q/kernel: 'b' is for a kernel .* other bases"):
        jlora.stack_adapters({"a": adapters["task0"], "b": small})
    trained = jlora.init(jax.random.key(5), base, jlora.LoraConfig(2, 2, train_bias="all"))
    with pytest.raises(ValueError, match="q/bias: trained fully"):
        jlora.stack_adapters({"a": jlora.split(trained)[0]})
    with pytest.raises(ValueError, match="names must be strings"):
        jlora.stack_adapters({0: adapters["task0"]})
    stacked = jlora.stack_adapters(adapters)
    with pytest.raises(ValueError, match="no adapter named 'task9'.*'task0'"):
        jlora.select(stacked, "task9")
    with pytest.raises(ValueError, match="index 3 is out of range for a set of 3"):
        jlora.select(stacked, 3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_mixed_batch_serves_each_row_with_its_adapter_and_minus_one_with_the_base(
    dtype,
):
    model, x, base, adapters = make(dtype)
    names = list(adapters)
    params = {"params": jlora.combine(jlora.stack_adapters(adapters), base)}
    ids = np.array([2, -1, 0, 1, 0, -1])
    serve = jlora.lora(model.apply, adapter_ids=ids, strict=True)
    eager = serve(params, x)
    traced = jax.jit(
        lambda p, x, ids: jlora.lora(model.apply, adapter_ids=ids, strict=True)(p, x)
    )(params, x, jnp.asarray(ids))
    by_name = jlora.lora(
        model.apply, adapter_ids=[names[i] if i >= 0 else None for i in ids]
    )
    named = jax.jit(by_name)(params, x)
    # Each row against the merged model of its adapter on that row alone: both are the
    # same function rounded twice over a chain of about 8 reductions of <= D terms
    # (the merged kernel adds one more rounding per adapted kernel).
    for i, k in enumerate(ids):
        ref = merged_row(model, base, adapters, None if k < 0 else names[k], x[i : i + 1])
        for got in (eager, traced, named):
            assert got.dtype == dtype
            assert_close(got[i : i + 1], ref, chain_bound(D, 10, dtype))


def _sub_jaxprs(params):
    """The jaxprs an equation's params hold (closed or open, alone or in sequences)."""
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if hasattr(x, "jaxpr") and hasattr(x, "consts"):  # a ClosedJaxpr
                yield x.jaxpr
            elif hasattr(x, "eqns"):
                yield x


def test_a_mixed_batch_runs_each_frozen_kernel_once_over_the_whole_batch():
    model, x, base, adapters = make()
    params = {"params": jlora.combine(jlora.stack_adapters(adapters), base)}
    ids = jnp.array([0, 1, 2, -1, 0, 1])
    jaxpr = jax.make_jaxpr(
        lambda p, x, ids: jlora.lora(model.apply, adapter_ids=ids)(p, x)
    )(params, x, ids)

    def dots(j):
        for e in j.eqns:
            if e.primitive.name == "dot_general":
                yield e
            for sub in _sub_jaxprs(e.params):
                yield from dots(sub)

    shapes = [[tuple(v.aval.shape) for v in e.invars] for e in dots(jaxpr.jaxpr)]
    with_kernel = [s for s in shapes if (D, D) in s]
    # q, k, v, o, mlp: one dot each over the whole batch with the shared kernel...
    assert len(with_kernel) == 5 and all(s[0][0] == 6 for s in with_kernel)
    # ...and no kernel-sized operand per row (a [6, D, D] gathered or merged kernel)
    assert not [s for s in shapes if any(x[-2:] == (D, D) and len(x) > 2 for x in s)]


def test_mixed_batch_errors_name_the_input_and_the_ids():
    model, x, base, adapters = make()
    params = {"params": jlora.combine(jlora.stack_adapters(adapters), base)}
    with pytest.raises(ValueError, match=r"argument 1 at \(root\) is \[6, 5, 16\].*4 rows"):
        jlora.lora(model.apply, adapter_ids=np.array([0, 1, 2, 0]))(params, x)
    with pytest.raises(ValueError, match=r"adapter_ids \[3, -2\] \(rows \[1, 2\]\)"):
        jlora.lora(model.apply, adapter_ids=np.array([0, 3, -2, 0, 0, 0]))(params, x)
    with pytest.raises(ValueError, match=r"adapter_ids\[1\] is 'nope'"):
        jlora.lora(model.apply, adapter_ids=["task0", "nope"] + [None] * 4)(params, x)
    # traced ids cannot be checked: a row out of range is NaN, never another adapter
    bad = jax.jit(lambda p, x, i: jlora.lora(model.apply, adapter_ids=i)(p, x))(
        params, x, jnp.array([0, 7, 0, 0, 0, 0])
    )
    assert np.isnan(bad[1]).all() and np.isfinite(np.delete(np.asarray(bad), 1, 0)).all()
    plain = {"params": jlora.combine(adapters["task0"], base)}
    with pytest.raises(ValueError, match="holds no stacked set"):
        jlora.lora(model.apply, adapter_ids=np.zeros(6, int))(plain, x)
    with pytest.raises(ValueError, match="stacked set of adapters.*adapter_ids=ids"):
        jlora.lora(model.apply)(params, x)
    with pytest.raises(ValueError, match="stacked set of adapters.*jlora.select"):
        jlora.merge(params)
    with pytest.raises(ValueError, match="in_axes and out_axes are for mixed batches"):
        jlora.lora(model.apply, in_axes=(None, 0))


def test_add_weighted_cat_is_exact_and_svd_reports_the_optimal_error():
    model, x, base, adapters = make()
    names = list(adapters)
    weights = [0.5, -1.0, 2.0]

    def delta(ad, path):  # independently: scale * a @ b in float64
        lw = ad[path]["kernel"]
        return lw.scale * np.asarray(lw.a, np.float64) @ np.asarray(lw.b, np.float64)

    want = {
        p: sum(w * delta(adapters[n], p) for w, n in zip(weights, names))
        for p in ("q", "v", "mlp")
    }
    cat = jlora.add_weighted([adapters[n] for n in names], weights)
    assert cat["q"]["kernel"].rank == 2 + 4 + 3
    for p in want:
        got = delta(cat, p)
        bound = chain_bound(9, 1) * np.abs(want[p]).max() + 1e-30
        np.testing.assert_allclose(got, want[p], atol=4 * bound)
    svd, errors = jlora.add_weighted(
        [adapters[n] for n in names], weights, how="svd", rank=3, return_errors=True
    )
    for p in want:
        s = np.linalg.svd(want[p], compute_uv=False)
        best = np.sqrt(np.sum(s[3:] ** 2) / np.sum(s**2))  # Eckart-Young
        got = delta(svd, p)
        err = np.linalg.norm(got - want[p]) / np.linalg.norm(want[p])
        assert svd[p]["kernel"].rank == 3
        assert abs(err - best) <= 1e-4 and abs(errors[f"{p}/kernel"] - best) <= 1e-4
    with pytest.raises(ValueError, match="one weight per adapter"):
        jlora.add_weighted([adapters["task0"]], [1.0, 2.0])
    with pytest.raises(ValueError, match="how='svd' needs rank >= 1"):
        jlora.add_weighted([adapters["task0"]], [1.0], how="svd")


def test_nnx_models_stack_and_serve_a_mixed_batch_through_their_state():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(D, 2 * D, rngs=rngs)
            self.down = nnx.Linear(2 * D, D, rngs=rngs)

        def __call__(self, x):
            return self.down(jax.nn.gelu(self.up(x)))

    base = Net(nnx.Rngs(0))
    models = {}
    for i in range(3):
        m = nnx.clone(base)
        jlora.nnx.apply(m, jlora.LoraConfig(2 + i, 4.0), rngs=nnx.Rngs(10 + i))
        for layer in (m.up, m.down):
            v = layer.kernel_lora_b
            v.set_raw_value(0.1 * jax.random.normal(jax.random.key(i), v.shape))
        models[f"t{i}"] = m
    stacked = jlora.stack_adapters(models)  # adapted NNX models give their adapters
    graphdef, state = nnx.split(base)
    served = jlora.combine(stacked, state)
    ids = [0, 1, -1, 2, 1]
    x = jax.random.normal(jax.random.key(5), (len(ids), D))
    f = jlora.lora(lambda s, x: nnx.merge(graphdef, s)(x), adapter_ids=jnp.asarray(ids))
    for y in (f(served, x), jax.jit(f)(served, x)):
        for r, i in enumerate(ids):
            one = base if i < 0 else jlora.nnx.merge_and_unload(nnx.clone(models[f"t{i}"]))
            assert_close(y[r : r + 1], one(x[r : r + 1]), chain_bound(2 * D, 3))


def test_one_generate_call_serves_a_batch_mixing_adapters_and_the_base():
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    from instruct.model import GPT, GPTConfig, generate, init_params

    cfg = GPTConfig(
        vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, eos_token_id=0
    )
    params = init_params(cfg, jax.random.key(3))
    params = jax.tree.map(lambda x: x * 20 if x.ndim == 2 else x, params)  # sharper
    model = GPT(cfg)
    adapters = {}
    for i in range(3):
        lp = jlora.init(jax.random.key(10 + i), params, jlora.LoraConfig(2 + i, 8.0))
        adapters[f"t{i}"] = jlora.split(perturb(lp, jax.random.key(i), 0.3))[0]
    served = jlora.combine(jlora.stack_adapters(adapters), params)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15], [7, 8], [9]]
    ids = np.array([0, -1, 2, 1, 0])
    cache = {"k": 1, "v": 1, "index": None}  # the cache's batch axis; its index shared
    apply = jlora.lora(
        model.apply, adapter_ids=ids, in_axes=(None, 0, 0, 0, cache), out_axes=(0, cache)
    )
    got = generate(apply, served, cfg, prompts, max_new_tokens=6)
    for prompt, i, new in zip(prompts, ids, got):
        one = params if i < 0 else jlora.merge(jlora.combine(adapters[f"t{i}"], params))
        assert new == generate(model.apply, one, cfg, [prompt], max_new_tokens=6)[0]
    # a batched cache whose batch axis is not declared is named, not broadcast
    wrong = jlora.lora(model.apply, adapter_ids=ids, in_axes=(None, 0, 0, 0, 0))
    with pytest.raises(ValueError, match=r"argument 4 at index is \[\], batched on axis 0"):
        generate(wrong, served, cfg, prompts, max_new_tokens=2)


def test_a_stacked_set_shards_like_its_kernels_and_takes_the_padded_bytes():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    model, x, base, adapters = make()
    adapters = {**adapters, "again": adapters["task1"]}  # four: two per "a" device
    stacked = jlora.stack_adapters(adapters)
    # Memory: XLA's argument bytes of the set are those of the padded adapters (rank 4
    # each), nothing more.
    padded = sum(
        4 * 4 * (D + D) * len(adapters)  # float32 a [D, 4] and b [4, D], per adapter
        for _ in ("q", "v", "mlp")
    )
    compiled = jax.jit(lambda s: jax.tree.map(jnp.sum, s)).lower(stacked).compile()
    assert compiled.memory_analysis().argument_size_in_bytes == padded
    mesh = jax.make_mesh((2, 4), ("a", "m"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        kernel = jax.P(None, "m")
        sharded = jax.tree.map(
            lambda t: jax.device_put(t, kernel if t.ndim == 2 else jax.P()), base
        )
        served = jlora.combine(stacked, sharded)
        specs = jlora.adapter_specs(served, adapter_axis="a")
        lw = specs["q"]["kernel"]
        assert lw.a == jax.P("a", None, None) and lw.b == jax.P("a", None, "m")
        assert jlora.adapter_specs(served)["q"]["kernel"].a == jax.P(None, None, None)
        put = jax.tree.map(lambda s: jax.NamedSharding(mesh, s), specs)
        placed = jax.device_put(stacked, put)
        assert placed["q"]["kernel"].b.sharding.spec == jax.P("a", None, "m")
        ids = jnp.asarray([2, -1, 0, 1, 1, 0])
        f = jax.jit(jlora.lora(model.apply, adapter_ids=ids, strict=True))
        y = f({"params": jlora.combine(placed, sharded)}, x)
    names = list(adapters)
    for r, i in enumerate(np.asarray(ids)):
        want = merged_row(model, base, adapters, None if i < 0 else names[i], x[r : r + 1])
        assert_close(y[r : r + 1], want, chain_bound(D, 8))


def test_a_mixed_batch_serves_on_a_quantized_base():
    model, x, base, adapters = make()
    qbase = jlora.quantize(base, block_size=16)  # the [16, 16] kernels: one block a column
    served = jlora.combine(jlora.stack_adapters(adapters), qbase)
    ids = jnp.asarray([1, -1, 0, 2, 2, 0])
    y = jax.jit(jlora.lora(model.apply, adapter_ids=ids, strict=True))(
        {"params": served}, x
    )
    plain = jlora.dequantize(qbase)  # the oracle: the dequantized base, merged per row
    names = list(adapters)
    for r, i in enumerate(np.asarray(ids)):
        want = merged_row(model, plain, adapters, None if i < 0 else names[i], x[r : r + 1])
        assert_close(y[r : r + 1], want, chain_bound(D, 8))
