"""Property tests: random kernel layouts and dot_general dimension numbers vs the oracle."""

import jax
from helpers import assert_close, chain_bound
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jlora


@st.composite
def dot_cases(draw):
    n_in = draw(st.integers(1, 2))
    n_out = draw(st.integers(1, 2))
    n_stack = draw(st.integers(0, 1))
    ndim = n_in + n_out + n_stack
    perm = draw(st.permutations(range(ndim)))
    in_axes, out_axes = tuple(perm[:n_in]), tuple(perm[n_in : n_in + n_out])
    stack_axes = tuple(perm[n_in + n_out :])
    shape = tuple(draw(st.integers(2, 4)) for _ in range(ndim))
    rank = draw(st.integers(1, 2))
    x_free = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(0, 2))))
    kernel_left = draw(st.booleans())
    transposed_use = draw(st.booleans())  # contract the outputs (x @ W.T style)
    n_contract = n_out if transposed_use else n_in
    x_order = draw(st.permutations(range(len(stack_axes) + n_contract + len(x_free))))
    return (
        Layout_(in_axes, out_axes, stack_axes),
        shape,
        rank,
        x_free,
        kernel_left,
        transposed_use,
        x_order,
    )


def Layout_(i, o, s):  # noqa: N802
    return jlora.Layout(i, o, s)


@settings(max_examples=20, deadline=None)
@given(dot_cases(), st.integers(0, 2**16))
def test_random_dot_general_matches_merged_oracle(case, seed):
    layout, shape, rank, x_free, kernel_left, transposed, x_order = case
    contract = layout.out_axes if transposed else layout.in_axes
    k = jax.random.split(jax.random.key(seed), 4)
    w = jax.random.normal(k[0], shape)
    cfg = jlora.LoraConfig(rank, 2.0, targets="w", layout={"w": layout})
    lw = jlora.init(k[1], {"w": w}, cfg)["w"]
    lw = lw.replace(b=jax.random.normal(k[2], lw.b.shape))
    # x holds the batch (stacked) axes, the contracted axes, and free axes, permuted.
    groups = [shape[a] for a in layout.stack_axes] + [shape[a] for a in contract]
    x_shape_natural = tuple(groups) + x_free
    x_shape = tuple(x_shape_natural[i] for i in x_order)
    pos = {old: new for new, old in enumerate(x_order)}
    ns = len(layout.stack_axes)
    x_batch = tuple(pos[i] for i in range(ns))
    x_contract = tuple(pos[ns + i] for i in range(len(contract)))
    x = jax.random.normal(k[3], x_shape)

    def fn(p, x):
        kern = p["w"]
        if kernel_left:
            dn = ((contract, x_contract), (layout.stack_axes, x_batch))
            return lax.dot_general(kern, x, dn)
        dn = ((x_contract, contract), (x_batch, layout.stack_axes))
        return lax.dot_general(x, kern, dn)

    params = {"w": lw}
    got = jax.jit(jlora.lora(fn, strict=True))(params, x)  # one compilation, not many
    ref = jax.jit(lambda p, x: fn(jlora.merge(p), x))(params, x)
    # One contraction of at most 4 x 4 terms, and the factored branch's two dots.
    assert_close(got, ref, chain_bound(k=16, depth=2))
    assert jlora.explain(fn, params, x) == {"w": ("dot_general",)}
