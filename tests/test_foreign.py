"""jlora on models written the way Equinox, penzai and gemma write them (built in
`foreign_models.py`): the lean route's round trip through `None` leaves, default
targets, orientation, and a tied embedding with a declared layout. The oracle is the
merged model."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from foreign_models import (
    eqx_combine,
    eqx_model,
    eqx_partition,
    gemma_forward,
    gemma_params,
    penzai_forward,
    penzai_params,
)
from helpers import chain_bound, perturb

import jlora

IDS = jnp.array([[1, 4, 2, 7, 0, 3]])


def _close(got, want, k, depth):
    """Factored and merged evaluations of the same function agree to the rounding of
    `depth` chained `k`-term float32 reductions, relative to the output's scale."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bound = chain_bound(k, depth) * max(np.max(np.abs(want)), 1e-30)
    assert np.max(np.abs(got - want)) <= bound, (np.max(np.abs(got - want)), bound)


def _grads_match(loss, lp, k, depth):
    """Gradients of the factors through `jlora.lora(loss)` equal those of the merged
    kernel's function of the factors (an independent route: jax.grad through merge)."""
    adapters, base = jlora.split(lp)
    got = jax.grad(lambda ad: jlora.lora(loss)(jlora.combine(ad, base)))(adapters)
    want = jax.grad(lambda ad: loss(jlora.merge(jlora.combine(ad, base))))(adapters)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _close(g, w, k, depth)


# Equinox -------------------------------------------------------------------------------


def _eqx_setup():
    model = eqx_model(jax.random.key(0))
    arrays, static = eqx_partition(model)

    def forward(p, ids):
        return eqx_combine(p, static)(ids)

    return model, arrays, static, forward


def test_equinox_lean_route_round_trips_through_none_leaves():
    """`eqx.partition` leaves None in every non-array field (the activation) and every
    `bias=None`: split and combine keep them as the empty subtrees they are."""
    model, arrays, static, forward = _eqx_setup()
    ids = IDS[0]
    lp = jlora.init(
        jax.random.key(1),
        arrays,
        jlora.LoraConfig(2, 4),
        probe=lambda p: forward(p, ids),
    )
    lp = perturb(lp, jax.random.key(2))
    adapters, base = jlora.split(lp)
    back = jlora.combine(adapters, base)
    assert jax.tree.structure(back) == jax.tree.structure(lp)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
        assert x is y
    got = jlora.lora(forward)(back, ids)
    want = forward(jlora.merge(back), ids)
    _close(got, want, k=12, depth=4)
    _grads_match(lambda p: jnp.sum(jnp.sin(forward(p, ids))), lp, k=12, depth=8)


def test_equinox_weights_are_default_targets_and_the_probe_reads_them_out_in():
    """Equinox's `Linear.weight` is `[out, in]`: with a probe, `a` sits on the input
    side (`[in, r]`), and the embedding's `weight` is read as `[rows, features]`."""
    model, arrays, static, forward = _eqx_setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the probe decides: no orientation warning
        lp = jlora.init(
            jax.random.key(1),
            arrays,
            jlora.LoraConfig(2, 4),
            probe=lambda p: forward(p, IDS[0]),
        )
    first = lp.layers[0].weight
    assert isinstance(first, jlora.LoraWeight)
    assert first.layout == jlora.Layout(in_axes=(1,), out_axes=(0,))
    assert first.a.shape == (model.layers[0].weight.shape[1], 2)
    embed = lp.embed.weight
    assert embed.layout == jlora.Layout(in_axes=(0,), out_axes=(1,))
    assert embed.b.shape == (2, model.embed.weight.shape[1])


def test_unconventional_two_axis_names_warn_naming_the_path_without_a_probe():
    """Without a probe, a 2-axis kernel whose name gives no orientation is not guessed
    silently; Flax's `kernel` is `[in, out]` by convention and says nothing."""
    _, arrays, _, _ = _eqx_setup()
    with pytest.warns(UserWarning, match=r"layers/0/weight.*pass probe=") as rec:
        jlora.init(jax.random.key(1), arrays, jlora.LoraConfig(2, 4))
    assert any("Layout(in_axes=(1,), out_axes=(0,))" in str(w.message) for w in rec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.init(
            jax.random.key(1),
            {"dense": {"kernel": jnp.ones((4, 3))}},
            jlora.LoraConfig(2, 4),
        )
    # A declared layout decides too, with no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp = jlora.init(
            jax.random.key(1),
            arrays,
            jlora.LoraConfig(
                2,
                4,
                layout={
                    r"layers/\d+/weight": jlora.Layout((1,), (0,)),
                    "embed/weight": jlora.Layout((0,), (1,)),
                },
            ),
        )
    assert lp.layers[1].weight.layout == jlora.Layout((1,), (0,))


# penzai --------------------------------------------------------------------------------


def test_penzai_data_arrays_are_default_targets_and_run_factored():
    params = penzai_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(3), (3, 8))
    lp = jlora.init(
        jax.random.key(1),
        params,
        jlora.LoraConfig(2, 4),
        probe=lambda p: penzai_forward(p, x),
    )
    up = lp["up"]["weights"]["value"].data_array
    down = lp["down"]["weights"]["value"].data_array
    assert up.layout == jlora.Layout((0,), (1,))
    assert down.layout == jlora.Layout((1,), (0,))  # stored (embedding, neurons)
    lp = perturb(lp, jax.random.key(2))
    got = jlora.lora(penzai_forward, strict=True)(lp, x)
    _close(got, penzai_forward(jlora.merge(lp), x), k=12, depth=4)
    _grads_match(lambda p: jnp.sum(jnp.sin(penzai_forward(p, x))), lp, k=12, depth=8)


# gemma ---------------------------------------------------------------------------------


def test_gemma_kernels_are_default_targets_read_by_the_probe():
    params = gemma_params(jax.random.key(0))
    lp = jlora.init(
        jax.random.key(1),
        params,
        jlora.LoraConfig(2, 4),
        probe=lambda p: gemma_forward(p, IDS),
    )
    adapted = {
        n.path for n in jlora._targets.walk(lp).nodes if n.kind == jlora._targets.LORA
    }
    assert adapted == {
        "layer_0/attn/qkv_einsum/w",
        "layer_0/attn/attn_vec_einsum/w",
        "layer_0/mlp/gating_einsum",
        "layer_0/mlp/linear",
    }  # the embedding table only when targeted, as Flax's `embedding`
    attn, mlp = lp["layer_0"]["attn"], lp["layer_0"]["mlp"]
    assert attn["qkv_einsum"]["w"].layout == jlora.Layout((2,), (0, 1, 3))
    assert attn["attn_vec_einsum"]["w"].layout == jlora.Layout((0, 1), (2,))
    assert mlp["gating_einsum"].layout == jlora.Layout((1,), (0, 2))
    lp = perturb(lp, jax.random.key(2))
    got = jlora.lora(gemma_forward, strict=True)(lp, IDS)
    _close(got, gemma_forward(jlora.merge(lp), IDS), k=16, depth=8)


def test_gemma_tied_embedding_with_a_declared_layout_is_not_refused_by_the_probe():
    """The table is looked up by rows and used transposed for the logits; the probe sees
    two orientations. A layout in the config wins, as the docs say."""
    params = gemma_params(jax.random.key(0))
    config = jlora.LoraConfig(
        2,
        4,
        targets=("input_embedding", "linear"),
        layout={"input_embedding": jlora.Layout((0,), (1,))},
    )
    lp = jlora.init(
        jax.random.key(1), params, config, probe=lambda p: gemma_forward(p, IDS)
    )
    table = lp["embedder"]["input_embedding"]
    assert table.layout == jlora.Layout((0,), (1,))
    lp = perturb(lp, jax.random.key(2))
    got = jlora.lora(gemma_forward)(lp, IDS)
    _close(got, gemma_forward(jlora.merge(lp), IDS), k=16, depth=8)
    _grads_match(lambda p: jnp.sum(jnp.sin(gemma_forward(p, IDS))), lp, k=16, depth=12)


def test_default_targets_that_select_nothing_list_the_leaves_that_could_be_meant():
    params = {
        "proj": {"mat": jnp.ones((4, 3))},
        "norm": {"gain": jnp.ones(3)},
        "ids": jnp.ones((4, 3), jnp.int32),
    }
    with pytest.raises(ValueError, match=r"proj/mat \[4, 3\].*Pass targets=") as e:
        jlora.init(jax.random.key(0), params, jlora.LoraConfig(2, 4))
    assert "norm/gain" not in str(e.value) and "'ids" not in str(e.value)


def test_gemma_tied_embedding_is_read_as_the_lookup_reads_it():
    """Without a declared layout, the probe sees the rows looked up and the table used
    transposed for the logits: a tied embedding, oriented as the lookup reads it (rows
    are the inputs); the transform runs both uses from the same factors."""
    params = gemma_params(jax.random.key(0))
    lp = jlora.init(
        jax.random.key(1),
        params,
        jlora.LoraConfig(2, 4, targets="input_embedding"),
        probe=lambda p: gemma_forward(p, IDS),
    )
    assert lp["embedder"]["input_embedding"].layout == jlora.Layout((0,), (1,))
    lp = perturb(lp, jax.random.key(2))
    got = jlora.lora(gemma_forward, strict=True)(lp, IDS)
    _close(got, gemma_forward(jlora.merge(lp), IDS), k=16, depth=8)
    _grads_match(lambda p: jnp.sum(jnp.sin(gemma_forward(p, IDS))), lp, k=16, depth=12)
