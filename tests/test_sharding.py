"""Sharded LoRA on 8 simulated CPU devices: placement, specs, training, HLO, merge, load."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_close, chain_bound, collectives
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS host device count)"
)


def mesh(shape, names):
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), names)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(96, name="up")(x))
        return nn.Dense(32, name="down")(h)


def _setup():
    m = MLP()
    x = jax.random.normal(jax.random.key(0), (16, 32))
    y = jax.random.normal(jax.random.key(1), (16, 32))
    params = m.init(jax.random.key(2), x)["params"]
    return m, x, y, params


def _place(params, specs, msh):
    return jax.tree.map(
        lambda p, s: jax.device_put(p, NamedSharding(msh, s)), params, specs
    )


CFG = jlora.LoraConfig(4, 8, train_bias="lora_only")


def test_init_gives_factors_the_kernel_sharding_on_their_axes():
    msh = mesh((2, 4), ("data", "model"))
    params = {
        "kernel": jax.device_put(
            jnp.ones((16, 32)), NamedSharding(msh, P("data", "model"))
        ),
        "stack": jax.device_put(
            jnp.ones((4, 16, 32)), NamedSharding(msh, P("data", None, "model"))
        ),
    }
    cfg = jlora.LoraConfig(
        2, 2, targets=["kernel", "stack"], layout={"stack": jlora.Layout((1,), (2,), (0,))}
    )
    lp = jlora.init(jax.random.key(0), params, cfg)
    assert lp["kernel"].a.sharding.spec == P("data", None)
    assert lp["kernel"].b.sharding.spec == P(None, "model")
    assert lp["stack"].a.sharding.spec == P("data", None, None)
    assert lp["stack"].b.sharding.spec == P("data", None, "model")
    specs = jlora.adapter_specs(lp)
    assert specs["kernel"].a == P("data", None) and specs["stack"].b == P(
        "data", None, "model"
    )
    from_base = jlora.adapter_specs(
        lp, {"kernel": P("data", "model"), "stack": P("data", None, "model")}
    )
    assert from_base["kernel"].b == P(None, "model")
    with pytest.raises(ValueError, match="no spec for"):
        jlora.adapter_specs(lp, {"kernel": P()})


def test_linen_logical_partitioning_keeps_rank_axis_unsharded():
    class Logical(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")
            )
            return nn.Dense(64, kernel_init=init)(x)

    msh = mesh((2, 4), ("data", "model"))
    rules = (("embed", "data"), ("mlp", "model"), ("lora_rank", None))
    variables = Logical().init(jax.random.key(0), jnp.ones((2, 16)))
    lp = jlora.init(jax.random.key(1), variables, jlora.LoraConfig(4, 4))
    specs = nn.get_partition_spec(lp)
    shardings = nn.logical_to_mesh_sharding(specs, msh, rules)
    lw = shardings["params"]["Dense_0"]["kernel"]
    assert lw.a.spec == P("data", None) and lw.b.spec == P(None, "model")
    placed = jax.device_put(nn.unbox(lp), nn.unbox(shardings))
    out = jlora.lora(Logical().apply)(placed, jnp.ones((8, 16)))
    ref = Logical().apply(jlora.merge(nn.unbox(lp)), jnp.ones((8, 16)))
    assert_close(out, ref, chain_bound(k=16, depth=2))


LAYOUTS = {
    # FSDP: every kernel and the batch sharded over all 8 devices.
    "fsdp": ((8,), ("fsdp",), {"up": P("fsdp", None), "down": P("fsdp", None)}, P("fsdp")),
    # Tensor parallel: up column-parallel, down row-parallel, batch over "data".
    "tp": (
        (2, 4),
        ("data", "model"),
        {"up": P(None, "model"), "down": P("model", None)},
        P("data"),
    ),
}


def _param_specs(kernel_specs):
    return {
        name: {"kernel": kernel_specs[name], "bias": P(kernel_specs[name][1])}
        for name in ("up", "down")
    }


STEPS, LR = 3, 0.05


def _train(m, params, x, y, steps=STEPS, msh=None, kernel_specs=None, batch_spec=None):
    if msh is not None:
        params = _place(params, _param_specs(kernel_specs), msh)
        x = jax.device_put(x, NamedSharding(msh, batch_spec))
        y = jax.device_put(y, NamedSharding(msh, batch_spec))
    lp = jlora.init(jax.random.key(5), params, CFG)
    adapters, base = jlora.split(lp)
    start = jax.tree.map(np.asarray, adapters)
    tx = optax.sgd(LR)  # linear in the gradients: their rounding error stays bounded
    opt_state = tx.init(adapters)
    apply = jlora.lora(m.apply)

    def step(adapters, opt_state, base, x, y):
        def loss_fn(ad):
            return jnp.mean((apply({"params": jlora.combine(ad, base)}, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    if msh is not None:
        ad_sh = jax.tree.map(lambda s: NamedSharding(msh, s), jlora.adapter_specs(lp))
        step = jax.jit(step, out_shardings=(ad_sh, None, None))
    else:
        step = jax.jit(step)
    losses = []
    for _ in range(steps):
        adapters, opt_state, loss = step(adapters, opt_state, base, x, y)
        losses.append(float(loss))
    return adapters, losses, step, (adapters, opt_state, base, x, y), start


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_sharded_training_matches_single_device(layout):
    shape, names, kspecs, bspec = LAYOUTS[layout]
    m, x, y, params = _setup()
    ref_ad, ref_losses, _, _, ref_start = _train(m, params, x, y)
    msh = mesh(shape, names)
    ad, losses, _, _, start = _train(
        m, params, x, y, msh=msh, kernel_specs=kspecs, batch_spec=bspec
    )
    # Sharded and one-device steps differ only in reduction order: each step's loss (a
    # mean of 16 x 32 terms) and gradient (through reductions of up to 96 terms, forward
    # and backward) by a chain of rounding errors, and SGD adds them up over the steps.
    assert_close(losses, ref_losses, chain_bound(k=16 * 32, depth=4 * STEPS))
    # What training changed (the initial factors are the same and would dominate).
    tol = chain_bound(k=96, depth=6 * STEPS)
    for a, a0, b, b0 in zip(*map(jax.tree.leaves, (ad, start, ref_ad, ref_start))):
        assert_close(np.asarray(a) - a0, np.asarray(b) - b0, tol)
    expected = jlora.adapter_specs(
        jlora.combine(ad, _place(params, _param_specs(kspecs), msh))
    )
    assert ad["up"]["kernel"].a.sharding.spec == expected["up"]["kernel"].a
    assert ad["down"]["kernel"].b.sharding.spec == expected["down"]["kernel"].b


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_lora_adds_no_kernel_sized_collective(layout):
    shape, names, kspecs, bspec = LAYOUTS[layout]
    m, x, y, params = _setup()
    msh = mesh(shape, names)
    _, _, step, args, _ = _train(
        m, params, x, y, steps=1, msh=msh, kernel_specs=kspecs, batch_spec=bspec
    )
    lora_hlo = step.lower(*args).compile().as_text()
    xs, ys = args[3:]
    plain = _place(params, _param_specs(kspecs), msh)  # the same model with no adapters

    def frozen_step(delta, base, x, y):  # backprop through the frozen model, no weight grad
        return jax.grad(lambda d: jnp.mean((m.apply({"params": base}, x + d) - y) ** 2))(
            delta
        )

    base_hlo = jax.jit(frozen_step).lower(jnp.zeros(32), plain, xs, ys).compile().as_text()
    smallest_kernel = min(96 * 32, 32 * 96)
    big = [c for c in collectives(lora_hlo) if c[1] >= smallest_kernel]
    allowed = [c for c in collectives(base_hlo) if c[1] >= smallest_kernel]
    for c in big:
        assert c in allowed, (c, allowed)
        allowed.remove(c)
    if layout == "fsdp":
        assert big, "FSDP gathers the kernels; the check should see those collectives"


def test_merge_keeps_kernel_sharding_in_place_with_donation():
    msh = mesh((8,), ("fsdp",))
    m, x, y, params = _setup()
    specs = {
        "up": {"kernel": P("fsdp", None), "bias": P()},
        "down": {"kernel": P("fsdp", None), "bias": P()},
    }
    lp = jlora.init(jax.random.key(1), _place(params, specs, msh), CFG)
    eager = jlora.merge(lp)
    assert eager["up"]["kernel"].sharding.spec == P("fsdp", None)
    want = NamedSharding(msh, P("fsdp", None))
    merge = jax.jit(jlora.merge, donate_argnums=0)
    stats = merge.lower(lp).compile().memory_analysis()
    merged = merge(lp)
    assert merged["up"]["kernel"].sharding.is_equivalent_to(want, 2)
    assert merged["down"]["kernel"].sharding.is_equivalent_to(want, 2)
    # In place: outputs alias the donated kernels; no device holds a full kernel copy.
    assert stats.alias_size_in_bytes > 0
    per_device_kernel = 96 * 32 * 4 // 8
    assert stats.temp_size_in_bytes < 96 * 32 * 4, (
        stats.temp_size_in_bytes,
        per_device_kernel,
    )


def test_sharded_adapters_save_and_load_into_derived_shardings(tmp_path):
    msh = mesh((2, 4), ("data", "model"))
    m, x, y, params = _setup()
    specs = {
        "up": {"kernel": P("data", "model"), "bias": P("model")},
        "down": {"kernel": P("model", "data"), "bias": P("data")},
    }
    sharded_base = _place(params, specs, msh)
    lp = jlora.init(jax.random.key(1), sharded_base, CFG)
    path = jlora.save_adapter(tmp_path / "ad", lp, CFG)
    back = jlora.load_adapter(path, sharded_base)
    assert back["up"]["kernel"].a.sharding.spec == P("data", None)
    assert back["up"]["kernel"].b.sharding.spec == P(None, "model")
    assert back["down"]["bias"].value.sharding.spec == P("data")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("row_parallel", [False, True])
def test_explicit_axis_mesh_low_rank_dots_carry_out_sharding(row_parallel):
    """Under explicit axis types a dot over a sharded contraction needs `out_sharding`;
    the LoRA branch's dots take theirs from the user's dot."""
    from jax.sharding import AxisType

    msh = jax.make_mesh(
        (2, 4), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit)
    )
    with jax.set_mesh(msh):
        if row_parallel:  # contraction over "model": the user's dot names out_sharding
            w = jax.device_put(
                jax.random.normal(jax.random.key(0), (16, 32)), P("model", None)
            )
            x = jax.device_put(
                jax.random.normal(jax.random.key(1), (8, 16)), P("data", "model")
            )

            def fn(p, x):
                return jnp.tanh(jnp.matmul(x, p["kernel"], out_sharding=P("data", None)))
        else:
            w = jax.device_put(
                jax.random.normal(jax.random.key(0), (16, 32)), P(None, "model")
            )
            x = jax.device_put(
                jax.random.normal(jax.random.key(1), (8, 16)), P("data", None)
            )

            def fn(p, x):
                return jnp.tanh(x @ p["kernel"])

        lp = jlora.init(jax.random.key(2), {"kernel": w}, jlora.LoraConfig(2, 2))
        lp = {"kernel": lp["kernel"].replace(b=lp["kernel"].b + 0.1)}
        y = jax.jit(jlora.lora(fn, strict=True))(lp, x)
        ref = jax.jit(fn)(jlora.merge(lp), x)
        assert y.sharding.spec == ref.sharding.spec
        assert_close(y, ref, chain_bound(k=16, depth=2))  # sums split over shards
        adapters, _ = jlora.split(lp)

        def loss(ad, f):
            return f(jlora.combine(ad, {"kernel": w}), x).sum()

        g = jax.jit(jax.grad(lambda ad: loss(ad, jlora.lora(fn))))(adapters)
        gr = jax.jit(
            jax.grad(lambda ad: fn(jlora.merge(jlora.combine(ad, {"kernel": w})), x).sum())
        )(adapters)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
            assert_close(a, b, chain_bound(k=16, depth=5))


def test_nnx_sharding_metadata_gives_adapter_specs_and_trains_sharded():
    from flax import nnx

    msh = mesh((2, 4), ("data", "model"))
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model"))
    with jax.set_mesh(msh):  # NNX creates the variables sharded, under the mesh
        model = nnx.Linear(16, 32, kernel_init=init, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    base_specs = nnx.get_partition_spec(state)
    assert state["kernel"].get_value().sharding.spec == P("data", "model")
    lp = jlora.init(jax.random.key(1), state, jlora.LoraConfig(4, 4))
    lw = lp["kernel"].get_value()
    assert lw.a.sharding.spec == P("data", None) and lw.b.sharding.spec == P(None, "model")
    specs = jlora.adapter_specs(lp, base_specs)
    assert specs["kernel"].get_value().a == P("data", None)
    assert specs["kernel"].get_value().b == P(None, "model")
    x = jax.device_put(
        jax.random.normal(jax.random.key(2), (8, 16)), NamedSharding(msh, P())
    )
    adapters, base = jlora.split(lp)

    def loss(ad):
        s = jlora.combine(ad, base)
        return jnp.sum(jlora.lora(lambda s, x: nnx.merge(graphdef, s)(x))(s, x) ** 2)

    out_sh = jax.tree.map(
        lambda s: NamedSharding(msh, s), specs, is_leaf=lambda s: isinstance(s, P)
    )
    grads = jax.jit(jax.grad(loss), out_shardings=out_sh)(adapters)
    g = grads["kernel"].get_value()
    assert g.a.sharding.spec == P("data", None)
    ref = jax.grad(
        lambda ad: jnp.sum(
            nnx.merge(graphdef, jlora.merge(jlora.combine(ad, base)))(x) ** 2
        )
    )(adapters)
    assert_close(g.b, ref["kernel"].get_value().b, chain_bound(k=16, depth=5))
