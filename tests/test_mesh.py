"""Sharded Flax models run under `jax.set_mesh`, in strict mode, eager and jitted.

The models box their kernels as Flax's own examples do (logical names through
`nn.with_logical_partitioning`, physical mesh axes through `nn.with_partitioning`, and
3-axis attention kernels boxed with only two names), are initialised under the mesh,
and run with `strict=True`: every adapted kernel must stay factored through Flax's
sharding constraints, with the same values and gradients as the merged model and no
kernel-sized collective beyond those of the frozen model's own backprop.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, chain_bound, collectives, perturb
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS host device count)"
)

EMBED, HEADS, MLP_DIM, VOCAB, SEQ, BATCH = 32, 8, 64, 64, 8, 8


def logical(names):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class LogicalLM(nn.Module):
    """A one-block decoder boxed the way Flax's lm1b example boxes its kernels.

    The attention projections are 3-axis `DenseGeneral` kernels (`[embed, heads,
    head_dim]` and `[heads, head_dim, embed]`) boxed with just two names,
    `("embed", "kv")`; the MLP kernels carry `("embed", "mlp")` / `("mlp", "embed")`.
    """

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(VOCAB, EMBED, embedding_init=logical(("vocab", "embed")))
        x = emb(ids)
        attn = nn.MultiHeadDotProductAttention(
            num_heads=HEADS,
            qkv_features=EMBED,
            kernel_init=logical(("embed", "kv")),
            use_bias=False,
            deterministic=True,
        )
        x = x + attn(x, x, mask=nn.make_causal_mask(ids))
        h = nn.Dense(MLP_DIM, kernel_init=logical(("embed", "mlp")), name="up")(x)
        x = x + nn.Dense(EMBED, kernel_init=logical(("mlp", "embed")), name="down")(
            nn.gelu(h)
        )
        return emb.attend(x)


# Logical-axis rules for the two layouts people use most.
RULES = {
    # FSDP: every kernel's embed axis and the batch over all 8 devices.
    "fsdp": (
        (8,),
        ("fsdp",),
        (("batch", "fsdp"), ("embed", "fsdp"), ("lora_rank", None)),
    ),
    # Tensor parallel (Megatron-style): mlp, heads and vocab over "model", batch over
    # "data". The rank axis gets no rule: unmatched logical names are unsharded.
    "tp": (
        (2, 4),
        ("data", "model"),
        (("batch", "data"), ("mlp", "model"), ("kv", "model"), ("vocab", "model")),
    ),
}
CFG = jlora.LoraConfig(4, 8, targets=r"(query|key|value|out|up|down)/kernel$")
# Bounds from the longest reduction (the MLP's 64 inputs) and the reductions chained
# in the forward pass (q/k/v, scores, softmax, values, out, up, down, the tied head,
# and the factored branch's two extra dots) and, for gradients, forward and backward.
FWD_TOL = chain_bound(k=MLP_DIM, depth=11)
GRAD_TOL = chain_bound(k=MLP_DIM, depth=22)


def _mesh(layout):
    shape, names, rules = RULES[layout]
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names)), rules


def sharded_init(model, msh, rules, ids, config):
    """`jlora.init` of `model`'s variables initialised sharded under the mesh (call it
    under `jax.set_mesh(msh)` and the logical-axis rules), as Flax's docs do it."""
    abstract = jax.eval_shape(model.init, jax.random.key(1), ids)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), msh, rules)
    variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(1), ids)
    return jlora.init(
        jax.random.key(2), variables, config, probe=lambda v: model.apply(v, ids)
    )


def _setup(layout):
    """Variables initialised sharded under the mesh, as Flax's docs do it."""
    msh, rules = _mesh(layout)
    model = LogicalLM()
    ids = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, VOCAB)
    with jax.set_mesh(msh), nn.logical_axis_rules(rules):
        lp = sharded_init(model, msh, rules, ids, CFG)
        lp = perturb(lp, jax.random.key(3))
        ids = jax.device_put(ids, NamedSharding(msh, P(rules[0][1])))
    return model, msh, rules, lp, ids


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_logical_partitioning_under_the_mesh_stays_factored(layout):
    model, msh, rules, lp, ids = _setup(layout)
    adapters, base = jlora.split(lp)
    with jax.set_mesh(msh), nn.logical_axis_rules(rules):
        merged = jax.jit(model.apply)(jlora.merge(lp), ids)
        if layout == "fsdp":  # eager, op by op (slow: one layout is enough)
            eager = jlora.lora(model.apply, strict=True)(lp, ids)
            assert_close(eager, merged, FWD_TOL)
        jitted = jax.jit(jlora.lora(model.apply, strict=True))(lp, ids)
        assert_close(jitted, merged, FWD_TOL)
        assert jitted.sharding.is_equivalent_to(merged.sharding, merged.ndim)

        explained = jlora.explain(model.apply, lp, ids)
        assert len(explained) == 6
        for path, used in explained.items():
            assert "sharding_constraint" in used and "dot_general" in used, (path, used)
            assert not any(r.startswith("materialize") for r in used), (path, used)

        def loss(ad, apply):
            return jnp.mean(apply(jlora.combine(ad, base), ids) ** 2)

        def loss_merged(ad):
            return loss(ad, lambda p, i: model.apply(jlora.merge(p), i))

        lora_grad = jax.jit(jax.grad(loss), static_argnums=1)
        compiled = lora_grad.lower(adapters, jlora.lora(model.apply, strict=True)).compile()
        g = compiled(adapters)
        gr = jax.jit(jax.grad(loss_merged))(adapters)
        for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
            assert_close(x, y, GRAD_TOL)
        # The factors keep the placement derived from their kernel's.
        q = g["params"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
        kernel = lp["params"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
        a_spec = jlora.adapter_specs(lp)["params"]["MultiHeadDotProductAttention_0"]
        assert kernel.a.value.sharding.spec == a_spec["query"]["kernel"].a
        assert q.a.value.shape == kernel.a.value.shape

        # No kernel-sized collective beyond what the frozen model's backprop needs.
        lora_hlo = compiled.as_text()
        plain = nn.unbox(jlora.merge(lp))

        def frozen(delta, plain):  # backprop into the embeddings only: no weight grad
            emb = plain["params"]["Embed_0"]["embedding"]
            params = {**plain["params"], "Embed_0": {"embedding": emb + delta}}
            return jnp.mean(model.apply({"params": params}, ids) ** 2)

        zero = jnp.zeros((VOCAB, EMBED))
        base_hlo = jax.jit(jax.grad(frozen)).lower(zero, plain).compile().as_text()
    smallest_kernel = EMBED * EMBED
    allowed = [c for c in collectives(base_hlo) if c[1] >= smallest_kernel]
    for c in [c for c in collectives(lora_hlo) if c[1] >= smallest_kernel]:
        assert c in allowed, (c, allowed)
        allowed.remove(c)


def test_boxes_with_fewer_names_than_axes_pad_with_unsharded_axes():
    model = LogicalLM()
    ids = jnp.zeros((2, SEQ), jnp.int32)
    variables = model.init(jax.random.key(0), ids)
    out_kernel = variables["params"]["MultiHeadDotProductAttention_0"]["out"]["kernel"]
    assert out_kernel.value.ndim == 3 and out_kernel.names == ("embed", "kv")
    lp = jlora.init(jax.random.key(1), variables, CFG, probe=lambda v: model.apply(v, ids))
    lw = lp["params"]["MultiHeadDotProductAttention_0"]["out"]["kernel"]
    # out kernel [heads, head_dim, embed]: a takes (heads, head_dim), b takes embed,
    # whose name was missing (unsharded).
    assert lw.a.names == ("embed", "kv", "lora_rank")
    assert lw.b.names == ("lora_rank", None)
    spec = nn.get_partition_spec(lp)["params"]["MultiHeadDotProductAttention_0"]
    assert spec["out"]["kernel"].b == P("lora_rank", None)


class PhysicalMLP(nn.Module):
    """Kernels boxed with physical mesh-axis names (`nn.with_partitioning`)."""

    up_names: tuple = (None, "model")
    down_names: tuple = ("model", None)

    @nn.compact
    def __call__(self, x):
        def init(names):
            return nn.with_partitioning(nn.initializers.lecun_normal(), names)

        h = nn.Dense(64, kernel_init=init(self.up_names), name="up")(x)
        return nn.Dense(16, kernel_init=init(self.down_names), name="down")(nn.gelu(h))


# Megatron-style column/row parallel under `Auto` axes; under `Explicit` axes, a layout
# plain Flax itself runs (a row-parallel Dense needs an `out_sharding` Flax can't give).
PHYSICAL = {
    "auto": ((8,), ("model",), AxisType.Auto, (None, "model"), ("model", None), P()),
    "explicit": (
        (2, 4),
        ("data", "model"),
        AxisType.Explicit,
        ("data", "model"),
        (None, "model"),
        P("data"),
    ),
}


@pytest.mark.parametrize("axes", ["auto", "explicit"])
def test_physical_partitioning_gets_no_rank_name_and_runs_under_either_axis_type(axes):
    shape, names, axis_type, up, down, x_spec = PHYSICAL[axes]
    model = PhysicalMLP(up, down)
    x = jax.random.normal(jax.random.key(0), (8, 16))
    variables = model.init(jax.random.key(1), x)  # outside the mesh
    lp = jlora.init(jax.random.key(2), variables, jlora.LoraConfig(4, 8))
    lp = perturb(lp, jax.random.key(3))
    specs = nn.get_partition_spec(lp)
    assert specs["params"]["up"]["kernel"].a == P(up[0], None)
    assert specs["params"]["up"]["kernel"].b == P(None, up[1])
    assert specs["params"]["down"]["kernel"].a == P(down[0], None)
    msh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
    # Every spec names axes of the mesh, so the shardings can be built and used.
    shardings = jax.tree.map(
        lambda s: NamedSharding(msh, s), specs, is_leaf=lambda s: isinstance(s, P)
    )
    placed = jax.device_put(lp, shardings)
    with jax.set_mesh(msh):
        x = jax.device_put(x, x_spec)
        merged = jax.jit(model.apply)(jlora.merge(placed), x)
        for apply in (
            jlora.lora(model.apply, strict=True),
            jax.jit(jlora.lora(model.apply, strict=True)),
        ):
            y = apply(placed, x)
            assert_close(y, merged, chain_bound(k=64, depth=4))
            assert y.sharding.spec == merged.sharding.spec
        explained = jlora.explain(model.apply, placed, x)
        assert all("materialize" not in " ".join(u) for u in explained.values())
        adapters, base = jlora.split(placed)

        def loss(ad, apply):
            return jnp.sum(apply(jlora.combine(ad, base), x) ** 2)

        g = jax.jit(jax.grad(loss), static_argnums=1)(
            adapters, jlora.lora(model.apply, strict=True)
        )
        gr = jax.jit(jax.grad(loss), static_argnums=1)(
            adapters, lambda p, x: model.apply(jlora.merge(p), x)
        )
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
        assert_close(a, b, chain_bound(k=64, depth=8))


def test_explain_works_wherever_lora_runs_under_a_mesh():
    """Params made outside the mesh, a Dense whose output axis is sharded 8 ways."""
    model = PhysicalMLP()
    x = jnp.ones((8, 16))
    lp = jlora.init(jax.random.key(0), model.init(jax.random.key(1), x), CFG_ANY)
    msh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(msh):
        jax.jit(jlora.lora(model.apply, strict=True))(lp, x)  # runs
        explained = jlora.explain(model.apply, lp, x)
    assert explained == {
        "params/up/kernel": ("sharding_constraint", "dot_general"),
        "params/down/kernel": ("sharding_constraint", "dot_general"),
    }


CFG_ANY = jlora.LoraConfig(2, 4)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_barrier_reshard_and_shard_map_keep_the_kernel_factored(axis_type):
    msh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(msh):
        w = jax.device_put(jax.random.normal(jax.random.key(0), (16, 32)), P(None, None))
        x = jax.device_put(jax.random.normal(jax.random.key(1), (8, 16)), P(None, None))
        lp = perturb(
            jlora.init(jax.random.key(2), {"kernel": w}, CFG_ANY), jax.random.key(3)
        )

        # A constraint places an array under Auto axes; Explicit axes need a reshard.
        explicit = axis_type == AxisType.Explicit
        place = jax.sharding.reshard if explicit else jax.lax.with_sharding_constraint

        def fn(p, x):
            k = place(p["kernel"], P("data", "model"))
            x = place(x, P(None, "data"))
            k, x = jax.lax.optimization_barrier((k, x))
            body = jax.shard_map(
                lambda k, x: jax.lax.psum(x @ k, "data"),  # row-parallel partial sums
                in_specs=(P("data", "model"), P(None, "data")),
                out_specs=P(None, "model"),
            )
            return jnp.tanh(body(k, x))

        merged = jax.jit(fn)(jlora.merge(lp), x)
        for apply in (jlora.lora(fn, strict=True), jax.jit(jlora.lora(fn, strict=True))):
            y = apply(lp, x)
            assert_close(y, merged, chain_bound(k=16, depth=1))
            assert y.sharding.spec == merged.sharding.spec
        placed_by = "reshard" if explicit else "sharding_constraint"
        assert jlora.explain(fn, lp, x) == {
            "kernel": (placed_by, "optimization_barrier", "shard_map", "dot_general")
        }
        adapters, base = jlora.split(lp)

        def loss(ad, f):
            return jnp.sum(f(jlora.combine(ad, base), x) ** 2)

        g = jax.jit(jax.grad(loss), static_argnums=1)(adapters, jlora.lora(fn, strict=True))
        gr = jax.jit(jax.grad(loss), static_argnums=1)(
            adapters, lambda p, x: fn(jlora.merge(p), x)
        )
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
            assert_close(a, b, chain_bound(k=16, depth=3))


@pytest.mark.parametrize("check_vma", [True, False])
def test_dropout_in_shard_map_draws_per_shard_of_a_varying_input(check_vma):
    """Rows of a batch split over "data" get their own masks. (With `check_vma`, shards
    along "model", where the input does not vary, share theirs, as the unsharded
    function would; without it JAX does not say, and every shard draws its own.)"""
    d = 16
    msh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    cfg = jlora.LoraConfig(d, d, targets="kernel", dropout=0.5)
    lp = jlora.init(jax.random.key(0), {"kernel": jnp.zeros((d, d))}, cfg)
    eye = jnp.eye(d)
    lp = {"kernel": lp["kernel"].replace(a=eye, b=eye)}  # delta = I: y = dropout(x)

    def fn(p, x):
        body = jax.shard_map(
            lambda k, x: x @ k,
            in_specs=(P(), P("data", None)),
            out_specs=P("data", None),
            check_vma=check_vma,
        )
        return body(p["kernel"], x)

    with jax.set_mesh(msh):
        x = jax.device_put(jnp.ones((8, d)), P("data", None))
        y = np.asarray(jax.jit(jlora.lora(fn, rng=jax.random.key(1), strict=True))(lp, x))
    kept = y != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(y[kept], 2.0)  # inverted dropout at rate 0.5
    assert not np.array_equal(kept[:4], kept[4:])  # the two "data" shards differ
