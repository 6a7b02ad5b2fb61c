"""LoraConfig validation and jlora.init: selection, distributions, boxes, NNX, errors."""

import math
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="up")(x))
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(6, name="head")(x)


@pytest.fixture(scope="module")
def mlp():
    m = MLP()
    x = jax.random.normal(jax.random.key(0), (3, 16))
    return m, m.init(jax.random.key(0), x)["params"], x


def test_adapted_model_at_init_equals_base_exactly(mlp):
    m, params, x = mlp
    lp = jlora.init(jax.random.key(1), params, jlora.LoraConfig(4, 8))
    merged = jlora.merge(lp)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        m.apply({"params": merged}, x), m.apply({"params": params}, x)
    )
    np.testing.assert_array_equal(
        jlora.lora(m.apply)({"params": lp}, x), m.apply({"params": params}, x)
    )


def test_default_targets_every_dense_kernel_only(mlp):
    _, params, _ = mlp
    lp = jlora.init(jax.random.key(1), params, jlora.LoraConfig(4, 8))
    adapted = {s.path for s in jlora.summary(lp).adapted}
    assert adapted == {"up/kernel", "head/kernel"}  # not the LayerNorm scale or biases


def test_kaiming_uniform_a_and_zero_b():
    params = {"kernel": jnp.zeros((400, 300))}
    lw = jlora.init(jax.random.key(0), params, jlora.LoraConfig(64, 8))["kernel"]
    bound = 1 / math.sqrt(400)
    a = np.asarray(lw.a)
    assert a.shape == (400, 64) and lw.b.shape == (64, 300)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.99 * bound  # uniform over the whole interval
    np.testing.assert_allclose(a.std(), bound / math.sqrt(3), rtol=0.02)
    assert not np.asarray(lw.b).any()


def test_gaussian_init_std_is_one_over_rank():
    params = {"kernel": jnp.zeros((500, 300))}
    cfg = jlora.LoraConfig(50, 8, init="gaussian")
    lw = jlora.init(jax.random.key(0), params, cfg)["kernel"]
    np.testing.assert_allclose(np.asarray(lw.a).std(), 1 / 50, rtol=0.02)
    assert not np.asarray(lw.b).any()


def test_factor_dtype_default_float32_and_override():
    params = {"kernel": jnp.zeros((8, 8), jnp.bfloat16)}
    lw = jlora.init(jax.random.key(0), params, jlora.LoraConfig(2, 2))["kernel"]
    assert lw.a.dtype == jnp.float32 and lw.w.dtype == jnp.bfloat16
    cfg = jlora.LoraConfig(2, 2, dtype=jnp.bfloat16)
    assert jlora.init(jax.random.key(0), params, cfg)["kernel"].a.dtype == jnp.bfloat16


def test_per_path_keys_independent_of_tree_order_and_process():
    k = jax.random.key(42)
    cfg = jlora.LoraConfig(2, 2)
    one = jlora.init(k, {"x": {"kernel": jnp.zeros((5, 4))}}, cfg)
    two = jlora.init(
        k, {"a": {"kernel": jnp.zeros((3, 3))}, "x": {"kernel": jnp.zeros((5, 4))}}, cfg
    )
    np.testing.assert_array_equal(one["x"]["kernel"].a, two["x"]["kernel"].a)
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np, jlora
        lp = jlora.init(jax.random.key(42), {"x": {"kernel": jnp.zeros((5, 4))}},
                        jlora.LoraConfig(2, 2))
        print(repr(np.asarray(lp["x"]["kernel"].a).tobytes().hex()))
        """
    )
    # Same platform, another hash seed; on a GPU the parent holds most of the memory.
    env = {**os.environ, "PYTHONHASHSEED": "123", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    here = repr(np.asarray(one["x"]["kernel"].a).tobytes().hex())
    assert out.stdout.strip() == here


def test_scale_plain_and_rslora_and_patterns():
    params = {"q": {"kernel": jnp.zeros((16, 16))}, "v": {"kernel": jnp.zeros((16, 16))}}
    cfg = jlora.LoraConfig(4, 8, rank_pattern={"^v/": 8}, alpha_pattern={"^v/": 4})
    lp = jlora.init(jax.random.key(0), params, cfg)
    assert lp["q"]["kernel"].scale == 2.0 and lp["q"]["kernel"].rank == 4
    assert lp["v"]["kernel"].scale == 0.5 and lp["v"]["kernel"].rank == 8
    rs = jlora.init(jax.random.key(0), params, jlora.LoraConfig(4, 8, use_rslora=True))
    assert rs["q"]["kernel"].scale == 8 / 2.0


def test_layout_override_for_multi_axis_kernel():
    params = {"out": {"kernel": jnp.zeros((4, 8, 32))}}
    lay = jlora.Layout(in_axes=(0, 1), out_axes=(2,))
    lw = jlora.init(jax.random.key(0), params, jlora.LoraConfig(2, 2, layout={"out": lay}))
    a = lw["out"]["kernel"].a
    assert a.shape == (4, 8, 2) and lw["out"]["kernel"].b.shape == (2, 32)
    bound = 1 / math.sqrt(32)  # fan_in over both input axes
    assert float(jnp.abs(a).max()) <= bound


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("none", set()),
        ("all", {"up/bias", "head/bias", "norm/bias"}),
        ("lora_only", {"head/bias"}),
    ],
)
def test_train_bias_modes(mlp, mode, expected):
    _, params, _ = mlp
    cfg = jlora.LoraConfig(2, 2, targets="head/kernel", train_bias=mode)
    lp = jlora.init(jax.random.key(0), params, cfg)
    assert set(jlora.summary(lp).trained_leaves) == expected


def test_also_train_leaves(mlp):
    _, params, _ = mlp
    cfg = jlora.LoraConfig(2, 2, targets="up/kernel", also_train="^head/")
    lp = jlora.init(jax.random.key(0), params, cfg)
    assert set(jlora.summary(lp).trained_leaves) == {"head/kernel", "head/bias"}


@pytest.mark.parametrize("logical", [False, True])
def test_boxed_linen_params_rank_axis_name_logical_only(logical):
    """The rank axis is named "lora_rank" under logical names (rules map it; without a
    rule it is unsharded) and unnamed under physical mesh-axis names, where any name
    must be an axis of the mesh."""
    box = nn.with_logical_partitioning if logical else nn.with_partitioning
    rank = "lora_rank" if logical else None

    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = box(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(8, kernel_init=init)(x)

    m = Boxed()
    x = jnp.ones((2, 4))
    variables = m.init(jax.random.key(0), x)
    for targets in (None, "kernel/value$"):  # paths match with or without the box's value
        lp = jlora.init(
            jax.random.key(1), variables, jlora.LoraConfig(2, 2, targets=targets)
        )
        lw = lp["params"]["Dense_0"]["kernel"]
        assert isinstance(lw, jlora.LoraWeight)
        assert type(lw.a) is type(lw.w) and type(lw.b) is type(lw.w)
        assert lw.a.names == ("embed", rank) and lw.b.names == (rank, "mlp")
        specs = nn.get_partition_spec(lp)["params"]["Dense_0"]["kernel"]
        assert tuple(specs.a) == ("embed", rank)
        merged = jlora.merge(lp)
        assert merged["params"]["Dense_0"]["kernel"].names == ("embed", "mlp")
        np.testing.assert_array_equal(m.apply(merged, x), m.apply(variables, x))


def test_nnx_state():
    model = nnx.Sequential(
        nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1))
    )
    graphdef, state = nnx.split(model)
    x = jnp.ones((3, 4))
    lp = jlora.init(jax.random.key(0), state, jlora.LoraConfig(2, 2))
    assert len(jlora.summary(lp).adapted) == 2
    np.testing.assert_array_equal(nnx.merge(graphdef, jlora.merge(lp))(x), model(x))


# Bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0, alpha=1), "rank must be a positive int"),
        (dict(rank=2.5, alpha=1), "rank must be a positive int"),
        (dict(rank=2, alpha=0), "alpha must be a positive"),
        (dict(rank=2, alpha=1, dropout=1.0), r"dropout must be a number in \[0, 1\)"),
        (dict(rank=2, alpha=1, dropout=-0.1), "dropout"),
        (dict(rank=2, alpha=1, init="xavier"), "init must be one of"),
        (dict(rank=2, alpha=1, train_bias="some"), "train_bias must be one of"),
        (dict(rank=2, alpha=1, targets="(["), "targets.*not a valid regex"),
        (dict(rank=2, alpha=1, rank_pattern={"q": -1}), r"rank_pattern\['q'\]"),
        (dict(rank=2, alpha=1, layout={"q": (0, 1)}), "jlora.Layout"),
        (dict(rank=2, alpha=1, dtype=jnp.int32), "floating dtype"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        jlora.LoraConfig(**kwargs)


def test_init_errors_name_paths(mlp):
    _, params, _ = mlp
    with pytest.raises(ValueError, match=r"'qurey' matches no leaf; closest paths"):
        jlora.init(jax.random.key(0), params, jlora.LoraConfig(2, 2, targets="qurey"))
    with pytest.raises(
        ValueError, match="up/bias: matched .* only floating leaves with >= 2"
    ):
        jlora.init(jax.random.key(0), params, jlora.LoraConfig(2, 2, targets="up/"))
    with pytest.raises(ValueError, match="rank 40 exceeds min"):
        jlora.init(jax.random.key(0), params, jlora.LoraConfig(40, 2))
    ints = {"kernel": jnp.zeros((3, 3), jnp.int32)}
    with pytest.raises(ValueError, match="kernel: matched .*int32"):
        jlora.init(jax.random.key(0), ints, jlora.LoraConfig(1, 1, targets="kernel"))
    three = {"kernel": jnp.zeros((2, 3, 4))}
    with pytest.raises(ValueError, match="has 3 axes; pass probe="):
        jlora.init(jax.random.key(0), three, jlora.LoraConfig(1, 1))
    bad = jlora.LoraConfig(1, 1, layout={"kernel": jlora.Layout((0,), (1,))})
    with pytest.raises(ValueError, match="does not fit a kernel with 3 axes"):
        jlora.init(jax.random.key(0), three, bad)
    lp = jlora.init(jax.random.key(0), params, jlora.LoraConfig(2, 2))
    with pytest.raises(ValueError, match="already adapted"):
        jlora.init(jax.random.key(0), lp, jlora.LoraConfig(2, 2))
    with pytest.raises(TypeError, match="config must be a jlora.LoraConfig"):
        jlora.init(jax.random.key(0), params, {"rank": 2})


def test_layout_hint_suggests_what_a_kernel_most_likely_is():
    from jlora._init import likely_layouts

    L = jlora.Layout
    # A stack of layers [L, in, out]: the layer axis is stacked, not an input.
    assert likely_layouts((4, 16, 32))[0] == L((1,), (2,), (0,))
    # Attention projections: [heads, head_dim, d] and [d, heads, head_dim].
    assert likely_layouts((8, 64, 512))[0] == L((0, 1), (2,))
    assert likely_layouts((512, 8, 64))[0] == L((0,), (1, 2))
    # Ambiguous by shape alone: both readings are offered, with probe= first.
    three = {"kernel": jnp.zeros((4, 16, 32))}
    with pytest.raises(ValueError) as err:
        jlora.init(jax.random.key(0), three, jlora.LoraConfig(1, 1))
    msg = str(err.value)
    assert "pass probe=" in msg
    assert "most likely LoraConfig(layout={'kernel': jlora.Layout(in_axes=(1,)" in msg
