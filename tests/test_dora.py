"""DoRA (`LoraConfig(use_dora=True)`): against a NumPy DoRA written from the paper,
on the functional, Linen and NNX routes, a stacked and a quantized base, checkpoints,
and PEFT's own `use_dora=True` files."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_close, chain_bound

import jlora
from jlora._jax_compat import is_literal

D_IN, D_OUT, RANK = 24, 16, 4


def _dora_lw(key, d_in=D_IN, d_out=D_OUT, use_dora=True, **cfg):
    """A `{"kernel": LoraWeight}` with nonzero `b` and a magnitude away from the norm."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    p = {"kernel": jax.random.normal(k1, (d_in, d_out)) / np.sqrt(d_in)}
    lp = jlora.init(k2, p, jlora.LoraConfig(RANK, 8, use_dora=use_dora, **cfg))
    lw = lp["kernel"]
    b = 0.3 * jax.random.normal(k3, lw.b.shape)
    m = None if lw.m is None else lw.m * (1 + 0.3 * jax.random.uniform(k4, lw.m.shape))
    return {"kernel": lw.replace(b=b, m=m)}


def _np_dora(lw):
    """The paper's W' = m * (W + s AB) / ||W + s AB||_c in float64 (norm per output
    column, over the input axis), and V = W + s AB, norm."""
    w, a, b = (np.asarray(x, np.float64) for x in (lw.w, lw.a, lw.b))
    v = w + lw.scale * a @ b
    norm = np.linalg.norm(v, axis=0)
    return np.asarray(lw.m, np.float64) / norm * v, v, norm


def _np_grads(lw, x, cot):
    """Gradients of `sum(cot * (x @ W'))` for a, b, m, the norm held constant."""
    w_dora, v, norm = _np_dora(lw)
    x, cot = np.asarray(x, np.float64), np.asarray(cot, np.float64)
    g_w = x.T @ cot  # d/dW'
    m = np.asarray(lw.m, np.float64)
    g_m = np.sum(g_w * v, axis=0) / norm
    g_v = g_w * (m / norm)  # (the norm a constant)
    a, b = np.asarray(lw.a, np.float64), np.asarray(lw.b, np.float64)
    return lw.scale * g_v @ b.T, lw.scale * a.T @ g_v, g_m


def test_init_starts_at_the_base_and_m_is_the_kernels_column_norm(key):
    p = {"kernel": jax.random.normal(key, (D_IN, D_OUT))}
    lp = jlora.init(key, p, jlora.LoraConfig(RANK, 8, use_dora=True))
    lw = lp["kernel"]
    want = np.linalg.norm(np.asarray(p["kernel"], np.float64), axis=0)
    assert lw.m.shape == lw.norm.shape == (D_OUT,)
    assert_close(lw.m, want, chain_bound(D_IN, 1))
    x = jax.random.normal(key, (5, D_IN))
    y = jlora.lora(lambda p, x: x @ p["kernel"])(lp, x)
    # g = m / norm is 1 to the rounding of two evaluations of the same column norm.
    assert_close(y, x @ p["kernel"], chain_bound(D_IN, 3))


def test_forward_gradients_merge_and_unmerge_match_a_numpy_dora(key):
    lp = _dora_lw(key)
    lw = lp["kernel"]
    x = jax.random.normal(jax.random.key(1), (6, D_IN))
    cot = jax.random.normal(jax.random.key(2), (6, D_OUT))
    w_ref, _, norm_ref = _np_dora(lw)
    bound = chain_bound(D_IN + RANK, 4)
    y = jlora.lora(lambda p, x: x @ p["kernel"])(lp, x)
    assert_close(y, np.asarray(x, np.float64) @ w_ref, bound)
    assert_close(jax.jit(jlora.lora(lambda p, x: x @ p["kernel"]))(lp, x), y, bound)
    merged = jlora.merge(lp)["kernel"]
    assert_close(merged, w_ref, bound)

    adapters, base = jlora.split(lp)
    assert_close(adapters["kernel"].norm, norm_ref, bound)

    def loss(ad):
        return jnp.sum(
            cot * jlora.lora(lambda p, x: x @ p["kernel"])(jlora.combine(ad, base), x)
        )

    g = jax.grad(loss)(adapters)["kernel"]
    ga, gb, gm = _np_grads(lw, x, cot)
    gbound = chain_bound(6 + D_IN + D_OUT + RANK, 6)
    assert_close(g.a, ga, gbound)
    assert_close(g.b, gb, gbound)
    assert_close(g.m, gm, gbound)
    assert float(jnp.abs(g.norm).max()) == 0.0  # the cached norm is not trained

    back = jlora.unmerge(jlora.merge(lp), adapters)["kernel"]
    assert_close(back.w, lw.w, chain_bound(D_IN + RANK, 4))
    assert np.array_equal(back.m, lw.m)


def test_the_optimizer_trains_m_and_leaves_the_norm(key):
    lp = _dora_lw(key)
    x = jax.random.normal(key, (6, D_IN))
    tx = jlora.optimizer(optax.chain(optax.add_decayed_weights(0.1), optax.sgd(1e-2)))
    state = tx.init(lp)
    grads = jax.grad(lambda p: jnp.sum(jlora.lora(lambda p, x: x @ p["kernel"])(p, x)))(lp)
    updates, _ = tx.update(grads, state, lp)
    assert float(jnp.abs(updates["kernel"].m).max()) > 0
    assert float(jnp.abs(updates["kernel"].norm).max()) == 0.0
    assert float(jnp.abs(updates["kernel"].w).max()) == 0.0
    s = jlora.summary(lp)
    assert s.trainable_params == D_IN * RANK + RANK * D_OUT + D_OUT
    assert s.total_params == D_IN * D_OUT + s.trainable_params  # (the norm is a cache)


def test_with_dropout_the_magnitude_term_sees_the_dropped_input(key):
    # x rows one-hot at input k, b = 0: a kept row gives w_k + (g - 1) * w_k / (1 - p)
    # (PEFT's x @ w + (g - 1) * drop(x) @ w); a dropped row gives w_k. If the magnitude
    # term saw the undropped input, every row would be g * w_k.
    lp = _dora_lw(key, dropout=0.5)
    lw = lp["kernel"].replace(b=jnp.zeros_like(lp["kernel"].b))
    lp = {"kernel": lw}
    k = 3
    x = jnp.zeros((64, D_IN)).at[:, k].set(1.0)
    y = np.asarray(jlora.lora(lambda p, x: x @ p["kernel"], rng=key)(lp, x), np.float64)
    w_k = np.asarray(lw.w, np.float64)[k]
    g = np.asarray(lw.m, np.float64) / np.linalg.norm(np.asarray(lw.w, np.float64), axis=0)
    kept = w_k + (g - 1) * w_k / 0.5
    tol = chain_bound(D_IN, 4) * np.abs(kept).max()
    is_kept = np.all(np.abs(y - kept) <= tol, axis=1)
    is_dropped = np.all(np.abs(y - w_k) <= tol, axis=1)
    assert np.all(is_kept | is_dropped)
    assert is_kept.any() and is_dropped.any()


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D_OUT, name="up")(x)
        return nn.Dense(D_IN, name="down")(jax.nn.gelu(h))


def _perturbed(lp, key):
    def one(x):
        if not isinstance(x, jlora.LoraWeight):
            return x
        k1, k2 = jax.random.split(jax.random.fold_in(key, x.b.size))
        m = x.m * (1 + 0.2 * jax.random.uniform(k2, x.m.shape))
        return x.replace(b=0.2 * jax.random.normal(k1, x.b.shape), m=m)

    return jax.tree.map(one, lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))


def test_linen_strict_jitted_and_eager_equal_the_merged_model(key):
    model = _MLP()
    x = jax.random.normal(key, (3, 5, D_IN))
    p = model.init(key, x)["params"]
    lp = _perturbed(jlora.init(key, p, jlora.LoraConfig(RANK, 8, use_dora=True)), key)

    def fn(p, x):
        return model.apply({"params": p}, x)

    ref = fn(jlora.merge(lp), x)
    bound = chain_bound(D_IN + D_OUT + RANK, 6)
    assert_close(jlora.lora(fn, strict=True)(lp, x), ref, bound)
    assert_close(jax.jit(jlora.lora(fn, strict=True))(lp, x), ref, bound)


def test_a_scanned_layer_stack_equals_the_merged_stack(key):
    layers, d = 3, 16
    w = jax.random.normal(key, (layers, d, d)) / 4
    cfg = jlora.LoraConfig(
        RANK, 8, use_dora=True, layout={"w": jlora.Layout((1,), (2,), (0,))}
    )
    lp = _perturbed(jlora.init(key, {"w": w}, cfg), key)
    assert lp["w"].m.shape == (layers, d)

    def fn(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    x = jax.random.normal(key, (4, d))
    ref = fn(jlora.merge(lp), x)
    assert_close(jlora.lora(fn, strict=True)(lp, x), ref, chain_bound(d + RANK, 3 * 4))
    # Each layer's merged kernel is the NumPy DoRA of that layer.
    for i in range(layers):
        lw = lp["w"]
        one = jlora.LoraWeight(lw.w[i], lw.a[i], lw.b[i], lw.m[i], scale=lw.scale)
        assert_close(jlora.merge(lp)["w"][i], _np_dora(one)[0], chain_bound(d + RANK, 4))


def test_the_training_step_forms_no_kernel_sized_product_of_the_factors(key):
    d = 64
    p = {"kernel": jax.random.normal(key, (d, 2 * d))}
    lp = _perturbed(jlora.init(key, p, jlora.LoraConfig(RANK, 8, use_dora=True)), key)
    adapters, base = jlora.split(lp)
    x = jax.random.normal(key, (8, d))

    def loss(ad, base):
        return jnp.sum(
            jlora.lora(lambda p, x: x @ p["kernel"], strict=True)(
                jlora.combine(ad, base), x
            )
        )

    closed = jax.make_jaxpr(jax.grad(loss))(adapters, base)
    jaxpr = closed.jaxpr
    n_ad = len(jax.tree.leaves(adapters))
    tainted = set(jaxpr.invars[:n_ad])  # what depends on the factors or the magnitude
    kernel_size = d * 2 * d
    for eqn in jaxpr.eqns:
        if any(not is_literal(v) and v in tainted for v in eqn.invars):
            for out in eqn.outvars:
                tainted.add(out)
                size = int(np.prod(out.aval.shape))
                assert size < kernel_size, (
                    f"{eqn.primitive} forms a kernel-sized value from the adapters: "
                    f"{out.aval}"
                )


def test_a_quantized_base_equals_its_dequantized_merged_model(key):
    model = _MLP()
    x = jax.random.normal(key, (2, 4, D_IN))
    p = model.init(key, x)["params"]
    q = jlora.quantize(p, "nf4", block_size=8)
    lp = jlora.init(key, q, jlora.LoraConfig(RANK, 8, use_dora=True))
    w = jlora.dequantize(q)["up"]["kernel"]
    assert_close(
        lp["up"]["kernel"].m,
        np.linalg.norm(np.asarray(w, np.float64), axis=0),
        chain_bound(D_IN, 1),
    )
    lp = _perturbed(lp, key)

    def fn(p, x):
        return model.apply({"params": p}, x)

    ref = fn(jlora.merge(jlora.dequantize(lp)), x)
    got = jlora.lora(fn, strict=True)(lp, x)
    assert_close(got, ref, chain_bound(D_IN + D_OUT + RANK, 6))


def test_checkpoints_carry_the_magnitude_and_norm(key, tmp_path):
    model = _MLP()
    x = jax.random.normal(key, (2, D_IN))
    p = model.init(key, x)["params"]
    lp = _perturbed(jlora.init(key, p, jlora.LoraConfig(RANK, 8, use_dora=True)), key)
    jlora.save_adapter(tmp_path / "ad", lp)
    back = jlora.load_adapter(tmp_path / "ad", p)
    adapters = jlora.split(lp)[0]
    for name in ("up", "down"):
        got, want = back[name]["kernel"], adapters[name]["kernel"]
        assert np.array_equal(got.m, want.m) and np.array_equal(got.norm, want.norm)
    # The loaded norm undoes a merge of the saved adapters.
    restored = jlora.unmerge(jlora.merge(lp), jlora.split(back)[0])
    assert_close(restored["up"]["kernel"].w, p["up"]["kernel"], chain_bound(D_IN, 4))
    specs = jlora.adapter_specs(lp)
    assert specs["up"]["kernel"].m == jax.sharding.PartitionSpec(None)


def test_bad_input_is_refused_with_the_path(key):
    lp = _dora_lw(key)
    adapters = jlora.split(lp)[0]
    no_norm = {"kernel": adapters["kernel"].replace(norm=None)}
    with pytest.raises(ValueError, match="norm"):
        jlora.unmerge(jlora.merge(lp), no_norm)
    with pytest.raises(ValueError, match="kernel: a DoRA adapter"):
        jlora.stack_adapters({"x": adapters, "y": adapters})
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        jlora.LoraConfig(4, 8, use_dora=1)


class _NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D_IN, D_OUT, rngs=rngs)
        self.down = nnx.Linear(D_OUT, D_IN, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def test_nnx_model_trains_m_merges_and_unmerges(key):
    model = _NNXMLP(nnx.Rngs(0))
    x = jax.random.normal(key, (4, D_IN))
    y0 = model(x)
    jlora.nnx.apply(model, jlora.LoraConfig(RANK, 8, use_dora=True), rngs=nnx.Rngs(1))
    assert_close(model(x), y0, chain_bound(D_IN + D_OUT, 6))
    assert isinstance(model.up.kernel_lora_m, nnx.LoRAParam)
    assert not isinstance(model.up.kernel_lora_norm, nnx.LoRAParam)
    model.up.kernel_lora_b[...] = 0.2 * jax.random.normal(key, model.up.kernel_lora_b.shape)
    model.up.kernel_lora_m[...] = model.up.kernel_lora_m[...] * 1.3
    lw = jlora.LoraWeight(
        model.up.kernel[...],
        model.up.kernel_lora_a[...],
        model.up.kernel_lora_b[...],
        model.up.kernel_lora_m[...],
        scale=2.0,
    )
    h = np.asarray(x, np.float64) @ _np_dora(lw)[0] + np.asarray(model.up.bias[...])
    down = np.asarray(model.down.kernel[...], np.float64)
    ref = np.asarray(jax.nn.gelu(jnp.asarray(h, jnp.float32)), np.float64) @ down
    ref = ref + np.asarray(model.down.bias[...])
    y = model(x)
    assert_close(y, ref, chain_bound(D_IN + D_OUT + RANK, 6))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(
        model
    )
    assert float(jnp.abs(grads["up"]["kernel_lora_m"][...]).max()) > 0
    jlora.nnx.merge(model, keep=False)
    assert_close(model(x), y, chain_bound(D_IN + D_OUT + RANK, 6))
    jlora.nnx.unmerge(model)
    assert_close(model.up.kernel[...], lw.w, chain_bound(D_IN + RANK, 4))


def _peft_net():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, D_IN)
            self.fc = torch.nn.Linear(D_IN, D_OUT)
            self.out = torch.nn.Linear(D_OUT, 8)

        def forward(self, x):
            return self.out(torch.relu(self.fc(self.emb(x))))

    return torch, Net


class _Flax(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D_OUT, name="fc")(nn.Embed(20, D_IN, name="emb")(x))
        return nn.Dense(8, name="out")(jax.nn.relu(h))


def test_peft_dora_files_load_and_save_with_the_same_outputs(tmp_path):
    torch, Net = _peft_net()
    import peft

    torch.manual_seed(0)
    net = Net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    base = {
        "emb": {"embedding": jnp.asarray(net.emb.weight.detach().numpy())},
        "fc": {
            "kernel": jnp.asarray(net.fc.weight.detach().numpy().T),
            "bias": jnp.asarray(net.fc.bias.detach().numpy()),
        },
        "out": {
            "kernel": jnp.asarray(net.out.weight.detach().numpy().T),
            "bias": jnp.asarray(net.out.bias.detach().numpy()),
        },
    }
    cfg = peft.LoraConfig(
        r=RANK, lora_alpha=8, target_modules=["fc", "out", "emb"], use_dora=True
    )
    pm = peft.get_peft_model(net, cfg)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lora_" in name:
                param.add_(0.2 * torch.randn_like(param))
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    ids = np.array([[1, 5, 7, 19, 0]])
    want = pm(torch.tensor(ids)).detach().numpy()
    lp = jlora.load_peft(tmp_path / "peft", base)
    got = jlora.lora(lambda p, x: _Flax().apply({"params": p}, x))(lp, jnp.asarray(ids))
    bound = chain_bound(D_IN + D_OUT + RANK, 8)
    assert_close(got, want, bound)
    merged = pm.merge_and_unload()
    assert_close(
        jlora.merge(lp)["fc"]["kernel"], merged.fc.weight.detach().numpy().T, bound
    )
    assert_close(
        jlora.merge(lp)["emb"]["embedding"], merged.emb.weight.detach().numpy(), bound
    )

    jlora.save_peft(tmp_path / "ours", lp)
    assert jlora.read_peft_config(tmp_path / "ours")["use_dora"] is True
    net2 = Net()
    net2.load_state_dict(state)
    theirs = peft.PeftModel.from_pretrained(net2, tmp_path / "ours")
    theirs.eval()
    assert_close(theirs(torch.tensor(ids)).detach().numpy(), want, bound)
