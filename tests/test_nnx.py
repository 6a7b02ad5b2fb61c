"""NNX-native LoRA (`jlora.nnx`): adapters inside NNX models, the model's own call
factored, `nnx.Optimizer` training, merge and back, checkpoints.

The oracle is a plain copy of the model whose kernels are `W + scale * a @ b`, the
product computed here with `jnp.einsum` (not with jlora's merge), run by the model's
own (unwrapped) classes; gradients of the factors go through that einsum.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_close, chain_bound

import jlora
from jlora import _nnx

# Fixtures: NNX models written the way Flax's own NNX examples write them ---------------


class MLP(nnx.Module):
    def __init__(self, rngs, din=6, dh=16, dout=5, drop=0.0):
        self.fc1 = nnx.Linear(din, dh, rngs=rngs)
        self.bn = nnx.BatchNorm(dh, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs) if drop else None
        self.fc2 = nnx.Linear(dh, dout, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.fc1(x)))
        if self.drop is not None:
            h = self.drop(h)
        return self.fc2(h)


class Layers(nnx.Module):
    """`nnx.LinearGeneral` with multi-axis kernels in and out, `nnx.Einsum`, `nnx.Conv`."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.split = nnx.LinearGeneral(4, (2, 6), rngs=rngs)  # [4, 2, 6]
        self.join = nnx.LinearGeneral((2, 6), 8, axis=(-2, -1), rngs=rngs)  # [2, 6, 8]
        self.ein = nnx.Einsum("bsd,dh->bsh", (8, 5), rngs=rngs)

    def __call__(self, img):
        h = nnx.relu(self.conv(img))  # [b, 5, 5, 4]
        h = h.reshape(h.shape[0], -1, 4)  # [b, 25, 4]
        return self.ein(nnx.gelu(self.join(nnx.tanh(self.split(h)))))


class TiedLM(nnx.Module):
    """`nnx.Embed` looked up, and used again as the head through `attend`."""

    def __init__(self, rngs, vocab=11, d=8):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.mid = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, ids):
        return self.embed.attend(jnp.tanh(self.mid(self.embed(ids))))


class Block(nnx.Module):
    def __init__(self, rngs, d=8):
        self.fc = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, h):
        return h + jnp.tanh(self.fc(h))


class Stack(nnx.Module):
    """Layers created with `nnx.vmap` and run with `nnx.scan` (Flax's scan-over-layers)."""

    def __init__(self, rngs, n=3, d=8):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs, d)

        self.blocks = make(rngs)
        self.head = nnx.Linear(d, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(block, h):
            return block(h)

        return self.head(body(self.blocks, x))


def normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def perturb(model, seed=7, scale=0.3):
    """Nonzero `b` factors (a fresh `b` is zero, which would hide a wrong B path)."""
    for i, (_, v) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):
        if v.get_metadata("lora_role", None) == "b":
            old = v.get_raw_value()
            new = scale * normal(seed + i, v.shape, v.dtype)
            v.set_raw_value(jax.device_put(new, old.sharding))  # (keeps its placement)
    return model


def _kernels(model):
    """`[(kernel path, a path, b path, scale, layout)]`, read from the variables."""
    out = []
    for path, v in nnx.to_flat_state(nnx.state(model)):
        if v.get_metadata("lora_role", None) == "a":
            name = v.get_metadata("lora_kernel")
            out.append(
                (
                    path[:-1] + (name,),
                    path,
                    path[:-1] + (name + "_lora_b",),
                    v.get_metadata("lora_scale"),
                    v.get_metadata("lora_layout"),
                )
            )
    return out


def oracle(model):
    """`(f, factors)`: `f(factors, call, *args)` runs `call(plain, *args)` on a plain
    copy of `model` whose kernels are `W + scale * einsum(a, b)`; `factors` is
    `{a or b path: value}` of `model` (differentiate `f` with respect to it)."""
    info = _kernels(model)
    plain = nnx.clone(model)
    _nnx._unload(plain)
    graphdef, state = nnx.split(plain)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    factors = {p: flat[p].get_raw_value() for _, pa, pb, _, _ in info for p in (pa, pb)}

    def f(factors, call, *args):
        # (fresh variables: the call may mutate them under the caller's trace)
        entries = {p: v.replace(v.get_raw_value()) for p, v in nnx.to_flat_state(state)}
        for kp, pa, pb, scale, layout in info:
            w = entries[kp]
            delta = jnp.einsum(
                layout.product_subscripts(),
                factors[pa],
                factors[pb],
                precision=jax.lax.Precision.HIGHEST,
            )
            entries[kp] = w.replace(value=w.get_raw_value() + scale * delta)
        m = nnx.merge(graphdef, nnx.from_flat_state(list(entries.items())))
        return call(m, *args), nnx.state(m)

    return f, factors


def factor_grads(model, loss):
    """Gradients of `loss(model)` with respect to the factors, by path."""
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    return {p: v.get_raw_value() for p, v in nnx.to_flat_state(grads)}


def check_against_oracle(model, call, args, k, depth, loss=None):
    """Forward and factor gradients of `call(model, *args)` equal the oracle's."""
    f, factors = oracle(model)
    expected, _ = f(factors, call, *args)
    got = call(model, *args)
    assert_close(got, expected, chain_bound(k, depth))
    loss = loss or (lambda y: jnp.sum(y**2))
    g = factor_grads(nnx.clone(model), lambda m: loss(call(m, *args)))
    g_ref = jax.grad(lambda fac: loss(f(fac, call, *args)[0]))(factors)
    assert set(g_ref) <= set(g)
    for p, ref in g_ref.items():
        assert_close(g[p], ref, chain_bound(k, 2 * depth + 1))
    return got


CFG = jlora.LoraConfig(2, 4)


# The model's own call, factored ---------------------------------------------------------


def test_apply_puts_lora_params_beside_the_kernels_and_keeps_them_params():
    model = MLP(nnx.Rngs(0))
    before = nnx.state(model, nnx.Param)
    out = jlora.nnx.apply(model, CFG, rngs=nnx.Rngs(1))
    assert out is model
    assert isinstance(model.fc1, nnx.Linear) and isinstance(model, MLP)
    assert type(model.fc1.kernel) is nnx.Param  # frozen kernels stay nnx.Param
    a, b = model.fc1.kernel_lora_a, model.fc1.kernel_lora_b
    assert type(a) is nnx.LoRAParam and type(b) is nnx.LoRAParam
    assert a.shape == (6, 2) and b.shape == (2, 16)
    assert not np.asarray(b[...]).any()  # b starts at zero: the model equals the base
    assert np.abs(np.asarray(a[...])).max() <= 1 / np.sqrt(6)  # Kaiming-uniform bound
    lora = {
        "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    }
    assert lora == {f"{m}/kernel_lora_{x}" for m in ("fc1", "fc2") for x in "ab"}
    # nnx.state(model, nnx.Param) still holds every base param, values unchanged.
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for p, v in nnx.to_flat_state(before):
        np.testing.assert_array_equal(params[p].get_raw_value(), v.get_raw_value())


def test_mlp_forward_gradients_and_mutated_state_equal_the_merged_model():
    model = perturb(jlora.nnx.apply(MLP(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1)))
    f, factors = oracle(model)
    x = normal(0, (7, 6))
    ref_out, ref_state = f(factors, lambda m, x: m(x), x)
    for call in (lambda m, x: m(x), nnx.jit(lambda m, x: m(x))):
        m = nnx.clone(model)
        out = call(m, x)
        assert_close(out, ref_out, chain_bound(16, 3))
        # BatchNorm's statistics come back updated, as in the plain model's call.
        for name in ("mean", "var"):
            assert_close(
                getattr(m.bn, name)[...],
                ref_state["bn"][name].get_raw_value(),
                chain_bound(7, 2),
            )
            assert not np.allclose(getattr(m.bn, name)[...], getattr(model.bn, name)[...])
    check_against_oracle(nnx.clone(model), lambda m, x: m(x), (x,), k=16, depth=3)


def test_standard_layers_run_factored_with_strict():
    model = jlora.nnx.apply(Layers(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1), strict=True)
    assert model.conv.kernel_lora_a.shape == (3, 3, 3, 2)
    assert model.conv.kernel_lora_b.shape == (2, 4)
    assert model.split.kernel_lora_a.shape == (
        4,
        2,
    ) and model.split.kernel_lora_b.shape == (2, 2, 6)
    assert model.join.kernel_lora_a.shape == (
        2,
        6,
        2,
    ) and model.join.kernel_lora_b.shape == (2, 8)
    assert model.ein.kernel_lora_a.shape == (8, 2)
    perturb(model)
    img = normal(0, (2, 5, 5, 3))
    used = jlora.nnx.explain(model, img)
    assert set(used) == {f"{m}/kernel" for m in ("conv", "split", "join", "ein")}
    for path, rules in used.items():
        assert rules and not any(r.startswith("materialize") for r in rules), (path, rules)
    check_against_oracle(model, lambda m, x: m(x), (img,), k=27, depth=4)
    jitted = nnx.jit(lambda m, x: m(x))(model, img)
    assert_close(jitted, model(img), chain_bound(27, 8))


def test_embed_lookup_and_attend_for_a_tied_head():
    cfg = jlora.LoraConfig(2, 4, targets=("embedding", "kernel"))
    model = jlora.nnx.apply(TiedLM(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1), strict=True)
    emb_a, emb_b = model.embed.embedding_lora_a, model.embed.embedding_lora_b
    assert emb_a.shape == (11, 2) and emb_b.shape == (2, 8)
    assert not np.asarray(emb_a[...]).any()  # the reference embedding init: a = 0
    for v in (emb_a,):
        v.set_raw_value(0.3 * normal(3, v.shape))
    perturb(model)
    ids = jnp.array([[1, 4, 9], [0, 10, 2]])
    used = jlora.nnx.explain(model, ids)
    assert "gather" in used["embed/embedding"] and "dot_general" in used["embed/embedding"]
    check_against_oracle(model, lambda m, i: m(i), (ids,), k=8, depth=3)
    # attend on its own, called on the submodule: factored too.
    q = normal(4, (3, 8))
    f, factors = oracle(model)
    assert_close(
        model.embed.attend(q),
        f(factors, lambda m, q: m.embed.attend(q), q)[0],
        chain_bound(8, 1),
    )


def test_scanned_layer_stack_is_factored_per_layer():
    model = jlora.nnx.apply(Stack(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1), strict=True)
    a, b = model.blocks.fc.kernel_lora_a, model.blocks.fc.kernel_lora_b
    assert a.shape == (3, 8, 2) and b.shape == (3, 2, 8)  # one pair per layer
    assert a.get_metadata("lora_layout") == jlora.Layout((1,), (2,), (0,))
    perturb(model)
    x = normal(0, (4, 8))
    used = jlora.nnx.explain(model, x)
    assert "scan" in used["blocks/fc/kernel"], used
    check_against_oracle(model, lambda m, x: m(x), (x,), k=8, depth=4)


def test_remat_and_jit_inside_the_model():
    class Inner(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(6, 6, rngs=rngs)
            self.out = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            h = nnx.remat(lambda fc, x: jnp.tanh(fc(x)))(self.fc, x)
            return nnx.jit(lambda out, h: out(h))(self.out, h)

    model = perturb(jlora.nnx.apply(Inner(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1), strict=True))
    check_against_oracle(model, lambda m, x: m(x), (normal(0, (5, 6)),), k=6, depth=2)


# Dropout --------------------------------------------------------------------------------


def _dropout_model(seed=1, rate=0.5):
    cfg = jlora.LoraConfig(2, 4, dropout=rate)
    return perturb(jlora.nnx.apply(MLP(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(seed)))


def test_dropout_is_on_in_train_off_in_eval_fresh_per_call_and_reproducible():
    x = normal(0, (7, 6))
    model = _dropout_model()
    model.eval()
    f, factors = oracle(model)
    ref = f(factors, lambda m, x: m(x), x)[0]  # no dropout on the merged model
    assert_close(model(x), ref, chain_bound(16, 3))
    assert_close(model(x), ref, chain_bound(16, 3))
    model.train()
    first, second = model(x), model(x)
    assert not np.allclose(first, ref) and not np.allclose(first, second)
    twin = _dropout_model()  # same seeds: the same masks, call after call
    np.testing.assert_array_equal(twin(x), first)
    np.testing.assert_array_equal(twin(x), second)
    other = _dropout_model(seed=2)
    assert not np.allclose(other(x), first)
    # Under nnx.jit too: a fresh mask each call, the count carried by the model.
    jitted = nnx.jit(lambda m, x: m(x))
    assert not np.allclose(jitted(model, x), jitted(model, x))


def test_dropout_mask_is_fresh_in_every_scan_iteration():
    class Same(nnx.Module):
        """Two stacked layers with equal weights, each applied to the same input."""

        def __init__(self, rngs):
            @nnx.split_rngs(splits=2)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return nnx.Linear(8, 8, rngs=nnx.Rngs(0))

            self.layers = make(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
            def body(layer, x):
                return x, layer(x)  # (the same input to every layer)

            return body(self.layers, x)[1]

    cfg = jlora.LoraConfig(4, 4, dropout=0.5)
    model = jlora.nnx.apply(Same(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1))
    for name in ("kernel_lora_a", "kernel_lora_b"):
        v = getattr(model.layers, name)
        one = normal(5, v.shape[1:])
        v.set_raw_value(jnp.stack([one, one]))
    np.testing.assert_array_equal(model.layers.kernel[0], model.layers.kernel[1])
    x = normal(0, (3, 8))
    ys = model(x)
    assert not np.allclose(ys[0], ys[1])  # the same layer, the same input: other masks
    model.eval()
    ys = model(x)
    np.testing.assert_array_equal(ys[0], ys[1])


def test_model_dropout_rng_counts_advance_as_without_lora():
    base = MLP(nnx.Rngs(0), drop=True)
    model = jlora.nnx.apply(MLP(nnx.Rngs(0), drop=True), CFG, rngs=nnx.Rngs(1))
    x = normal(0, (7, 6))
    for _ in range(3):
        assert_close(model(x), base(x), chain_bound(16, 3))
    assert int(model.drop.rngs.count[...]) == int(base.drop.rngs.count[...]) == 3


# Mutated state: sow, caches ---------------------------------------------------------------


def test_sown_intermediates_come_back():
    class Sower(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            h = self.fc(x)
            self.sow(nnx.Intermediate, "h", h)
            return jnp.sum(h)

    model = perturb(jlora.nnx.apply(Sower(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1)))
    f, factors = oracle(model)
    x = normal(0, (2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (sow outside nnx.capture)
        _, ref_state = f(factors, lambda m, x: m(x), x)
        model(x)
    got = model.h.get_raw_value()[0]
    assert_close(got, ref_state["h"].get_raw_value()[0], chain_bound(4, 1))


class Decoder(nnx.Module):
    """A KV-cached decoder: `nnx.MultiHeadAttention` with `decode=True`, a tied head."""

    def __init__(self, rngs, vocab=13, d=16, heads=2):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.mlp = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, ids, decode=False):
        h = self.embed(ids)
        mask = None if decode else nnx.make_causal_mask(ids)
        h = h + self.attn(h, mask=mask, decode=decode)
        h = h + jnp.tanh(self.mlp(h))
        return self.embed.attend(h)


def test_kv_cached_decoding_equals_full_recompute_and_the_merged_model():
    cfg = jlora.LoraConfig(2, 4, targets=("kernel", "embedding"))
    model = perturb(
        jlora.nnx.apply(Decoder(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1), strict=True)
    )
    ids = jnp.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    full = model(ids)
    f, factors = oracle(model)
    assert_close(full, f(factors, lambda m, i: m(i), ids)[0], chain_bound(16, 6))
    model.attn.init_cache((2, 5, 16))
    steps = [model(ids[:, t : t + 1], decode=True) for t in range(5)]
    assert_close(jnp.concatenate(steps, axis=1), full, chain_bound(16, 8))
    assert int(model.attn.cache_index[...]) == 5  # the cache came back, step by step
    cached = model.attn.cached_key[...]
    # The merged model's cache after the same steps holds the same keys.
    plain = jlora.nnx.merge_and_unload(nnx.clone(model))
    plain.attn.init_cache((2, 5, 16))
    for t in range(5):
        plain(ids[:, t : t + 1], decode=True)
    assert_close(cached, plain.attn.cached_key[...], chain_bound(16, 3))


# Training -------------------------------------------------------------------------------


def test_nnx_optimizer_trains_the_factors_only():
    model = jlora.nnx.apply(MLP(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-2), wrt=nnx.LoRAParam)
    x, y = normal(0, (16, 6)), normal(1, (16, 5))
    frozen = {
        p: np.asarray(v.get_raw_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if type(v) is nnx.Param
    }

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(
            model
        )
        optimizer.update(model, grads)
        return loss

    with jax.numpy_dtype_promotion("standard"):  # (optax's adam is not strict-clean)
        losses = [float(step(model, optimizer, x, y)) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if type(v) is nnx.Param:  # bit-identical after 30 steps of adamw
            np.testing.assert_array_equal(v.get_raw_value(), frozen[p])
    assert np.asarray(model.fc1.kernel_lora_b[...]).any()


def test_training_step_holds_no_kernel_sized_product():
    class Odd(nnx.Module):
        def __init__(self, rngs):
            self.mid = nnx.Linear(48, 80, rngs=rngs)
            self.head = nnx.Linear(80, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(jnp.tanh(self.mid(x)))

    model = jlora.nnx.apply(
        Odd(nnx.Rngs(0)), jlora.LoraConfig(4, 8, targets="mid/kernel"), rngs=nnx.Rngs(1)
    )
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)
    x = jnp.ones((5, 48))
    graphdef, state = nnx.split((model, optimizer))

    def step(state):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            return jnp.sum(model(x) ** 2)

        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer))

    with jax.numpy_dtype_promotion("standard"):  # (optax's adam is not strict-clean)
        hlo = jax.jit(step).lower(state).compile().as_text()
    dots = re.findall(r"= (f32\[[0-9,]*\])\{?[^ ]* (?:dot|convolution)\(", hlo)
    assert dots
    assert not {"f32[48,80]", "f32[80,48]"} & set(dots), dots
    # The merged model's gradient does form one: the check can fail.
    plain = jlora.nnx.merge_and_unload(nnx.clone(model))
    g2, s2 = nnx.split(plain)
    mat = jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(g2, s)(x) ** 2))).lower(s2).compile()
    assert {"f32[48,80]", "f32[80,48]"} & set(
        re.findall(r"= (f32\[[0-9,]*\])\{?[^ ]* (?:dot|convolution)\(", mat.as_text())
    )


def test_eager_calls_trace_once():
    traces = []

    class Counting(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            traces.append(1)
            return self.fc(x)

    model = jlora.nnx.apply(Counting(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1))
    x = normal(0, (2, 4))
    outs = [model(x) for _ in range(4)]
    assert len(traces) == 1
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


# Merge and back -------------------------------------------------------------------------


def test_merge_and_unload_gives_the_plain_model():
    model = perturb(jlora.nnx.apply(MLP(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1)))
    model.eval()
    x = normal(0, (7, 6))
    f, factors = oracle(model)
    ref = f(factors, lambda m, x: m(x), x)[0]
    served = jlora.nnx.merge_and_unload(model)
    assert served is model
    assert type(served) is MLP and type(served.fc1) is nnx.Linear
    assert not jlora.nnx.is_adapted(served)
    assert not nnx.state(served, nnx.LoRAParam)
    fresh = MLP(nnx.Rngs(0))
    fresh.eval()
    assert nnx.graphdef(served) == nnx.graphdef(fresh)  # no LoRA left in its graph
    assert_close(served(x), ref, chain_bound(16, 3))
    expected = factors[("fc1", "kernel_lora_a")] @ factors[("fc1", "kernel_lora_b")]
    assert_close(
        served.fc1.kernel[...], fresh.fc1.kernel[...] + 2.0 * expected, chain_bound(2, 1)
    )
    # It can be adapted anew.
    jlora.nnx.apply(served, CFG, rngs=nnx.Rngs(2))


def test_merge_in_place_runs_plain_and_unmerge_takes_it_back():
    model = perturb(jlora.nnx.apply(MLP(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1)))
    model.eval()
    x = normal(0, (7, 6))
    w0 = np.asarray(model.fc1.kernel[...])
    factored = model(x)
    jlora.nnx.merge(model)
    assert jlora.nnx.explain(model, x) == {}  # no kernel is held factored: plain calls
    assert_close(model(x), factored, chain_bound(16, 3))
    with pytest.raises(ValueError, match="unmerge"):  # training while merged
        nnx.grad(lambda m: jnp.sum(m(x)), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    with pytest.raises(ValueError, match="merged"):
        jlora.save_adapter("/nonexistent/never-written", model)
    jlora.nnx.unmerge(model)
    w = np.asarray(model.fc1.kernel[...])
    delta = np.abs(
        np.asarray(model.fc1.kernel_lora_a[...] @ model.fc1.kernel_lora_b[...]) * 2.0
    )
    # merged - delta: two float32 roundings of |w| + |delta|.
    assert np.all(np.abs(w - w0) <= 2 * 2.0**-24 * (np.abs(w0) + delta) * 2)
    assert_close(model(x), factored, chain_bound(16, 3))
    with pytest.raises(ValueError, match="not merged"):
        jlora.nnx.unmerge(model)


# Checkpoints ---------------------------------------------------------------------------


def test_save_adapter_and_load_onto_a_fresh_model(tmp_path):
    cfg = jlora.LoraConfig(2, 4, train_bias="lora_only")
    model = perturb(jlora.nnx.apply(MLP(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
    assert type(model.fc1.bias) is nnx.LoRAParam  # a trained leaf trains with the factors
    model.fc1.bias.set_raw_value(model.fc1.bias[...] + 0.5)
    model.eval()
    x = normal(0, (7, 6))
    expected = model(x)
    jlora.save_adapter(tmp_path / "ad", model, cfg)
    fresh = MLP(nnx.Rngs(0))
    fresh.eval()
    got = jlora.load_adapter(tmp_path / "ad", fresh)
    assert got is fresh and jlora.nnx.is_adapted(fresh)
    np.testing.assert_array_equal(fresh(x), expected)
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        np.testing.assert_array_equal(
            dict(nnx.to_flat_state(nnx.state(fresh, nnx.LoRAParam)))[p].get_raw_value(),
            v.get_raw_value(),
        )
    # A model of another structure: a clear error naming the path, nothing loaded.
    other = MLP(nnx.Rngs(0), dh=12)
    before = nnx.graphdef(other)
    with pytest.raises(ValueError, match="fc1/kernel"):
        jlora.load_adapter(tmp_path / "ad", other)
    assert not jlora.nnx.is_adapted(other) and nnx.graphdef(other) == before


def test_orbax_round_trip_of_the_lora_state(tmp_path):
    import orbax.checkpoint as ocp

    model = perturb(jlora.nnx.apply(MLP(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1)))
    model.eval()
    x = normal(0, (7, 6))
    expected = model(x)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "lora", nnx.state(model, nnx.LoRAParam))
    fresh = jlora.nnx.apply(MLP(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(5))
    fresh.eval()
    abstract = nnx.state(fresh, nnx.LoRAParam)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(tmp_path / "lora", abstract)
    nnx.update(fresh, restored)
    np.testing.assert_array_equal(fresh(x), expected)


def test_peft_directory_round_trip(tmp_path):
    cfg = jlora.LoraConfig(2, 4, targets=("kernel", "embedding"))
    model = perturb(jlora.nnx.apply(TiedLM(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
    model.embed.embedding_lora_a.set_raw_value(0.3 * normal(3, (11, 2)))
    ids = jnp.array([[1, 4, 9]])
    expected = model(ids)
    jlora.save_peft(
        tmp_path / "peft",
        model,
        cfg,
        module_names={"embed/embedding": "embed", "mid/kernel": "mid"},
    )
    fresh = TiedLM(nnx.Rngs(0))
    jlora.load_peft(
        tmp_path / "peft",
        fresh,
        module_names={"embed/embedding": "embed", "mid/kernel": "mid"},
    )
    assert_close(fresh(ids), expected, chain_bound(8, 3))


def test_summary_and_adapter_specs_read_a_model():
    model = jlora.nnx.apply(MLP(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1))
    s = jlora.summary(model)
    assert s.trainable_params == 6 * 2 + 2 * 16 + 16 * 2 + 2 * 5
    assert {p.path for p in s.adapted} == {"fc1/kernel", "fc2/kernel"}


# Sharding -------------------------------------------------------------------------------


def test_sharded_model_keeps_shardings_and_strict_holds_under_the_mesh():
    mesh = jax.make_mesh(
        (2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2
    )
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
    with jax.set_mesh(mesh):
        base = nnx.Linear(16, 32, kernel_init=init, rngs=nnx.Rngs(0))
        model = nnx.Linear(16, 32, kernel_init=init, rngs=nnx.Rngs(0))
        jlora.nnx.apply(model, CFG, rngs=nnx.Rngs(1), strict=True)
        perturb(model)
        a, b = model.kernel_lora_a, model.kernel_lora_b
        assert a.get_metadata("out_sharding") == (None, None)
        assert b.get_metadata("out_sharding") == (None, "model")
        assert b[...].sharding.spec == jax.P(None, "model")
        x = jax.device_put(normal(0, (8, 16)), jax.P("data", None))
        f, factors = oracle(model)
        ref = f(factors, lambda m, x: m(x), x)[0]
        for call in (lambda m, x: m(x), nnx.jit(lambda m, x: m(x))):
            out = call(model, x)
            assert_close(out, ref, chain_bound(16, 1))
            assert out.sharding.spec == base(x).sharding.spec
        grads = factor_grads(model, lambda m: jnp.sum(m(x) ** 2))
        assert grads[("kernel_lora_b",)].sharding.spec == jax.P(None, "model")


# Custom modules and bad input ------------------------------------------------------------


class RawHead(nnx.Module):
    """Custom code that uses a kernel itself: in `__call__`, and in another method."""

    def __init__(self, rngs):
        self.proj = nnx.Linear(6, 4, rngs=rngs)
        self.w = nnx.Param(normal(9, (4, 3)))

    def __call__(self, x):
        return jnp.tanh(self.proj(x)) @ self.w[...]

    def logits_t(self, x):  # reads proj's kernel transposed, outside __call__
        return x @ self.proj.kernel[...].T


def test_custom_module_raw_kernel_uses():
    cfg = jlora.LoraConfig(2, 4, layout={"w": jlora.Layout((0,), (1,))})
    model = perturb(
        jlora.nnx.apply(RawHead(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1), strict=True)
    )
    assert set(jlora.nnx.explain(model, normal(0, (2, 6)))) == {"proj/kernel", "w"}
    check_against_oracle(model, lambda m, x: m(x), (normal(0, (2, 6)),), k=6, depth=2)
    # Another method: through jlora.nnx.lora (one call on the module, same rules).
    call = jlora.nnx.lora(lambda m, x: m.logits_t(x))
    check_against_oracle(model, lambda m, x: call(m, x), (normal(1, (2, 4)),), k=4, depth=1)
    with pytest.raises(jlora.RuleError, match="proj/kernel"):  # strict from apply
        jlora.nnx.lora(lambda m, x: jnp.sin(m.proj.kernel[...]) @ x)(
            model, normal(1, (4, 2))
        )
    with pytest.warns(UserWarning, match="proj/kernel"):
        jlora.nnx.lora(lambda m, x: jnp.sin(m.proj.kernel[...]) @ x, strict=False)(
            model, normal(1, (4, 2))
        )


def test_bad_input_says_what_and_where():
    with pytest.raises(ValueError, match="matches no leaf.*closest paths"):
        jlora.nnx.apply(
            MLP(nnx.Rngs(0)),
            jlora.LoraConfig(2, 4, targets="attn/kernel"),
            rngs=nnx.Rngs(1),
        )
    model = jlora.nnx.apply(MLP(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already adapted"):
        jlora.nnx.apply(model, CFG, rngs=nnx.Rngs(1))
    with pytest.raises(TypeError, match="nnx.Rngs"):
        jlora.nnx.apply(MLP(nnx.Rngs(0)), CFG, rngs=jax.random.key(0))
    with pytest.raises(TypeError, match="nnx.Module"):
        jlora.nnx.apply({"kernel": jnp.ones((2, 2))}, CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no jlora adapters"):
        jlora.nnx.merge_and_unload(MLP(nnx.Rngs(0)))

    # A kernel whose axes the layers do not fix and nothing declares: named.
    class Odd(nnx.Module):
        def __init__(self):
            self.kernel = nnx.Param(jnp.ones((2, 3, 4)))

    with pytest.raises(ValueError, match="kernel.*probe="):
        jlora.nnx.apply(Odd(), CFG, rngs=nnx.Rngs(0))


def test_probe_reads_a_custom_kernel_off_the_model():
    class Heads(nnx.Module):
        def __init__(self, rngs):
            self.kernel = nnx.Param(normal(0, (3, 6, 4)))  # [heads, d, head_dim]

        def __call__(self, x):
            return jnp.einsum("bd,hdk->bhk", x, self.kernel[...])

    x = normal(1, (2, 6))
    model = jlora.nnx.apply(
        Heads(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1), probe=lambda m: m(x), strict=True
    )
    # h and k are outputs of the contraction over d.
    assert model.kernel_lora_a.get_metadata("lora_layout") == jlora.Layout((1,), (0, 2))
    perturb(model)
    check_against_oracle(model, lambda m, x: m(x), (x,), k=6, depth=2)


# What a hostile review found --------------------------------------------------------------


def test_a_stack_mapped_from_outside_the_root_runs_each_layer_factored():
    model = perturb(jlora.nnx.apply(Stack(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1), strict=True))
    x = normal(0, (4, 8))

    def scan_blocks(m, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(block, h):
            return block(h)  # each layer's own call, outside the root's

        return body(m.blocks, x)

    check_against_oracle(model, scan_blocks, (x,), k=8, depth=3)
    per_layer = nnx.vmap(lambda b, x: b(x), in_axes=(0, None))
    check_against_oracle(model, lambda m, x: per_layer(m.blocks, x), (x,), k=8, depth=1)


def test_eval_mode_survives_apply_and_loading(tmp_path):
    cfg = jlora.LoraConfig(2, 4, dropout=0.5)
    x = normal(0, (7, 6))
    model = perturb(jlora.nnx.apply(MLP(nnx.Rngs(0), drop=True), cfg, rngs=nnx.Rngs(1)))
    jlora.save_adapter(tmp_path / "ad", model, cfg)
    for make in (
        lambda m: jlora.nnx.apply(m, cfg, rngs=nnx.Rngs(1)),
        lambda m: jlora.load_adapter(tmp_path / "ad", m),
    ):
        m = MLP(nnx.Rngs(0), drop=True)
        m.eval()
        make(m)
        np.testing.assert_array_equal(m(x), m(x))  # no LoRA dropout in eval mode
        m.train()
        assert not np.allclose(m(x), m(x))
    if hasattr(nnx, "view"):  # Flax's view: dropout off in the view only
        view = nnx.view(model, deterministic=True)
        np.testing.assert_array_equal(view(x), view(x))


def test_each_module_follows_its_own_switches():
    class Student(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(6, 5, rngs=rngs)
            self.teacher = nnx.data(None)

        def __call__(self, x):
            return self.fc(x) + self.teacher(x)

    teacher = perturb(jlora.nnx.apply(MLP(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1)))
    teacher.eval()
    x = normal(0, (7, 6))
    expected = teacher(x)
    cfg = jlora.LoraConfig(2, 4, dropout=0.5)
    student = perturb(jlora.nnx.apply(Student(nnx.Rngs(2)), cfg, rngs=nnx.Rngs(3)))
    student.teacher = teacher  # adapted, in eval mode, inside a training student
    first, second = student(x), student(x)
    assert not np.allclose(first, second)  # the student's dropout is on ...
    student.fc.eval()
    assert_close(student(x) - student.fc(x), expected, chain_bound(16, 4))  # ... not its
    jlora.nnx.merge(teacher)  # merged on its own: its update still counted once
    assert_close(student(x) - student.fc(x), expected, chain_bound(16, 4))
    jlora.nnx.merge(student)  # folds the student's kernels; the teacher's stay as they are
    assert_close(student(x) - student.fc(x), expected, chain_bound(16, 4))


def test_a_model_reached_through_a_closure_runs_factored_inside_another_call():
    teacher = perturb(jlora.nnx.apply(MLP(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1)))
    teacher.eval()
    x = normal(0, (7, 6))
    expected = teacher(x)

    class Student(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(6, 5, rngs=rngs)

        def __call__(self, x):
            return self.fc(x) + teacher(x)  # not an attribute, not an argument

    student = jlora.nnx.apply(Student(nnx.Rngs(2)), CFG, rngs=nnx.Rngs(3))
    assert_close(student(x) - student.fc(x), expected, chain_bound(16, 4))


def test_containers_get_no_attributes():
    class Named(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.Dict(
                {"a": nnx.Linear(4, 4, rngs=rngs), "b": nnx.Linear(4, 4, rngs=rngs)}
            )

        def __call__(self, x):
            for _, block in sorted(self.blocks.items()):
                x = block(x)
            return x

    model = perturb(jlora.nnx.apply(Named(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1), strict=True))
    assert sorted(model.blocks.keys()) == ["a", "b"]
    check_against_oracle(model, lambda m, x: m(x), (normal(0, (2, 4)),), k=4, depth=2)

    class Raw(nnx.Module):
        def __init__(self):
            self.ws = nnx.Dict({"kernel": nnx.Param(jnp.ones((4, 4)))})

    with pytest.raises(ValueError, match="ws/kernel.*nowhere to live"):
        jlora.nnx.apply(Raw(), CFG, rngs=nnx.Rngs(0))


def test_unmerge_puts_the_frozen_kernels_back_bit_for_bit(tmp_path):
    model = perturb(jlora.nnx.apply(MLP(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1)))
    before = {
        p: np.asarray(v.get_raw_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    jlora.nnx.merge(model)
    assert not np.array_equal(model.fc1.kernel[...], before[("fc1", "kernel")])
    jlora.nnx.unmerge(model)
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        np.testing.assert_array_equal(v.get_raw_value(), before[p])
    assert not any(
        isinstance(v, jlora.nnx.Kept) for _, v in nnx.to_flat_state(nnx.state(model))
    )
    jlora.save_adapter(tmp_path / "ad", model)
    jlora.load_adapter(tmp_path / "ad", MLP(nnx.Rngs(0)), base_mismatch="error")


def test_loading_onto_adapted_model_refuses_to_keep_old_trained_leaves(tmp_path):
    plain = jlora.nnx.apply(MLP(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1))
    jlora.save_adapter(tmp_path / "ad", plain)
    model = jlora.nnx.apply(
        MLP(nnx.Rngs(0)), jlora.LoraConfig(2, 4, train_bias="all"), rngs=nnx.Rngs(1)
    )
    model.fc1.bias.set_raw_value(model.fc1.bias[...] + 1.0)
    graph = nnx.graphdef(model)
    with pytest.raises(ValueError, match="fc1/bias.*fresh model"):
        jlora.load_adapter(tmp_path / "ad", model)
    assert nnx.graphdef(model) == graph  # nothing changed


def test_a_submodule_called_alone_in_training_says_where_dropout_keys_come_from():
    model = jlora.nnx.apply(
        MLP(nnx.Rngs(0)), jlora.LoraConfig(2, 4, dropout=0.5), rngs=nnx.Rngs(1)
    )
    with pytest.raises(ValueError, match="root.*eval"):
        model.fc1(normal(0, (2, 6)))
    model.fc1.eval()
    model.fc1(normal(0, (2, 6)))  # no dropout: no key needed
