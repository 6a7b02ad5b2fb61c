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
    """Nonzero `b` and a magnitude away from the norm (boxes kept as they are)."""

    def val(x):
        return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x

    def put(box, v):
        return box.replace_boxed(v) if isinstance(box, nn.meta.AxisMetadata) else v

    def one(x):
        if not isinstance(x, jlora.LoraWeight):
            return x
        b, m = val(x.b), val(x.m)
        k1, k2 = jax.random.split(jax.random.fold_in(key, b.size))
        m = m * (1 + 0.2 * jax.random.uniform(k2, m.shape))
        return x.replace(b=put(x.b, 0.2 * jax.random.normal(k1, b.shape)), m=put(x.m, m))

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


class _TiedConv(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(32, 8, name="embed")
        h = embed(ids)[:, :, None, :]  # [batch, seq, 1, features]: an image row
        h = nn.Conv(8, (3, 1), padding="SAME", name="conv")(h)[:, :, 0, :]
        return embed.attend(jax.nn.gelu(h))  # the table used transposed


def test_embedding_lookup_tied_head_and_conv_equal_the_merged_model(key):
    model = _TiedConv()
    ids = jax.random.randint(key, (2, 6), 0, 32)
    p = model.init(key, ids)["params"]
    cfg = jlora.LoraConfig(2, 4, use_dora=True, targets=r"(embedding|kernel)$")
    probe = lambda p: model.apply({"params": p}, ids)  # noqa: E731
    lp = _perturbed(jlora.init(key, p, cfg, probe=probe), key)
    assert lp["embed"]["embedding"].m.shape == (8,)  # per feature, as PEFT's Embedding
    assert lp["conv"]["kernel"].m.shape == (8,)  # per output channel, as PEFT's Conv

    def fn(p, ids):
        return model.apply({"params": p}, ids)

    got = jlora.lora(fn, strict=True)(lp, ids)
    assert_close(got, fn(jlora.merge(lp), ids), chain_bound(32 + 24 + 2, 8))


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
    plain = jlora.split(_dora_lw(key, use_dora=False))[0]
    with pytest.raises(ValueError, match=r"at kernel, \['x'\] are DoRA adapters"):
        jlora.stack_adapters({"x": adapters, "y": plain})
    with pytest.raises(ValueError, match="kernel: a DoRA adapter"):
        jlora.add_weighted([adapters, adapters], [0.5, 0.5])
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


def _net_and_base(torch, Net):
    """A seeded PyTorch net, a copy of its state, and its weights as Flax params."""
    torch.manual_seed(0)
    net = Net()
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def dense(layer):
        return {
            "kernel": jnp.asarray(layer.weight.detach().numpy().T),
            "bias": jnp.asarray(layer.bias.detach().numpy()),
        }

    emb = {"embedding": jnp.asarray(net.emb.weight.detach().numpy())}
    return net, state, {"emb": emb, "fc": dense(net.fc), "out": dense(net.out)}


class _Flax(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D_OUT, name="fc")(nn.Embed(20, D_IN, name="emb")(x))
        return nn.Dense(8, name="out")(jax.nn.relu(h))


def test_peft_dora_files_load_and_save_with_the_same_outputs(tmp_path):
    torch, Net = _peft_net()
    import peft

    net, state, base = _net_and_base(torch, Net)
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


def _write_peft(path, cfg: dict, tensors: dict):
    import json
    import os

    from jlora import _safetensors

    os.makedirs(path)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", **cfg}, f)
    _safetensors.save(os.path.join(path, "adapter_model.safetensors"), tensors)


def _peft_tensors(path):
    import os

    from jlora import _safetensors

    return _safetensors.load(os.path.join(path, "adapter_model.safetensors"))[0]


def test_a_fused_peft_module_carries_its_parts_magnitudes_side_by_side(key, tmp_path):
    ks = jax.random.split(key, 4)
    params = {n: {"kernel": jax.random.normal(ks[i], (4, 3))} for i, n in enumerate("qkv")}
    cfg = jlora.LoraConfig(2, 4.0, targets=r"(q|k|v)/kernel$", use_dora=True)
    lp = jlora.init(ks[3], params, cfg)
    for i, n in enumerate("qkv"):  # one A for the module; each part its own B and m
        lw = lp[n]["kernel"]
        lp[n]["kernel"] = lw.replace(
            a=lp["q"]["kernel"].a,
            b=0.3 * jax.random.normal(jax.random.fold_in(key, i), lw.b.shape),
            m=lw.m * jnp.asarray([0.5, 1.0, 2.0]) + i,
        )
    names = {
        f"{n}/kernel": jlora.PeftModule("qkv", rows=(3 * i, 9)) for i, n in enumerate("qkv")
    }
    jlora.save_peft(tmp_path / "f", lp, cfg, module_names=names)
    tensors = _peft_tensors(tmp_path / "f")
    m_file = tensors["base_model.model.qkv.lora_magnitude_vector"]
    want_m = np.concatenate([np.asarray(lp[n]["kernel"].m) for n in "qkv"])
    assert np.array_equal(m_file, want_m)
    assert tensors["base_model.model.qkv.lora_B.weight"].shape == (9, 2)  # A shared

    back = jlora.load_peft(tmp_path / "f", params, module_names=names)
    for n in "qkv":
        assert np.array_equal(back[n]["kernel"].m, lp[n]["kernel"].m)
        assert np.array_equal(back[n]["kernel"].b, lp[n]["kernel"].b)
    merged, want = jlora.merge(back), jlora.merge(lp)
    for n in "qkv":
        assert_close(merged[n]["kernel"], want[n]["kernel"], chain_bound(4, 4))

    # A row of the module no part adapts would need the base's norm, which the
    # adapters do not hold: refused, naming the rows.
    two = {k: v for k, v in names.items() if not k.startswith("k")}
    only = jlora.init(
        ks[3], params, jlora.LoraConfig(2, 4.0, targets=r"(q|v)/kernel$", use_dora=True)
    )
    with pytest.raises(
        ValueError, match=r"lora_magnitude_vector must cover every row.*\[3, 4, 5\]"
    ):
        jlora.save_peft(tmp_path / "g", only, cfg, module_names=two)


def test_a_stacked_kernels_layers_missing_from_a_dora_file_keep_their_norm(key, tmp_path):
    w = jax.random.normal(key, (3, 4, 5))
    rng = np.random.default_rng(0)
    tensors = {}
    for i in (0, 2):
        pre = f"base_model.model.layers.{i}.fc."
        tensors[pre + "lora_A.weight"] = rng.normal(size=(2, 4)).astype(np.float32)
        tensors[pre + "lora_B.weight"] = rng.normal(size=(5, 2)).astype(np.float32)
        tensors[pre + "lora_magnitude_vector"] = rng.uniform(1, 2, 5).astype(np.float32)
    _write_peft(tmp_path / "f", {"r": 2, "lora_alpha": 2, "use_dora": True}, tensors)
    names = {"layers/kernel": "layers.{layer}.fc"}
    lw = jlora.load_peft(tmp_path / "f", {"layers": {"kernel": w}}, module_names=names)[
        "layers"
    ]["kernel"]
    for i in (0, 2):
        pre = f"base_model.model.layers.{i}.fc."
        assert np.array_equal(lw.m[i], tensors[pre + "lora_magnitude_vector"])
        assert np.array_equal(lw.a[i], tensors[pre + "lora_A.weight"].T)
        assert np.array_equal(lw.b[i], tensors[pre + "lora_B.weight"].T)
    assert not np.any(lw.a[1]) and not np.any(lw.b[1])
    norm = np.linalg.norm(np.asarray(w[1], np.float64), axis=0)
    assert_close(lw.m[1], norm, chain_bound(4, 1))
    assert_close(jlora.merge({"k": lw})["k"][1], w[1], chain_bound(4, 3))  # unchanged


def test_peft_files_whose_magnitudes_disagree_with_the_config_are_refused(key, tmp_path):
    w = {"fc": {"kernel": jax.random.normal(key, (4, 5))}}
    rng = np.random.default_rng(0)
    pre = "base_model.model.fc."
    ab = {
        pre + "lora_A.weight": rng.normal(size=(2, 4)).astype(np.float32),
        pre + "lora_B.weight": rng.normal(size=(5, 2)).astype(np.float32),
    }
    m = {pre + "lora_magnitude_vector": np.ones(5, np.float32)}
    cases = [
        ("off", {}, m, "fc: has lora_magnitude_vector but the config's use_dora is false"),
        ("on", {"use_dora": True}, {}, "fc: the config sets use_dora but the file has no"),
        (
            "short",
            {"use_dora": True},
            {pre + "lora_magnitude_vector": np.ones(4, np.float32)},
            r"lora_B.weight \[5, 2\], lora_magnitude_vector \[4\] are not \[r, in\], "
            r"\[out, r\], \[out\]",
        ),
    ]
    for name, flags, extra, match in cases:
        _write_peft(tmp_path / name, {"r": 2, "lora_alpha": 2, **flags}, {**ab, **extra})
        with pytest.raises(ValueError, match=match):
            jlora.load_peft(tmp_path / name, w)

    # DoRA on some modules and plain LoRA on others: PEFT has one use_dora for all.
    two = {"fc": w["fc"], "out": {"kernel": jax.random.normal(key, (5, 3))}}
    mixed = {
        "fc": jlora.init(key, {"fc": two["fc"]}, jlora.LoraConfig(2, 2, use_dora=True))[
            "fc"
        ],
        "out": jlora.init(key, {"out": two["out"]}, jlora.LoraConfig(2, 2))["out"],
    }
    with pytest.raises(
        ValueError, match=r"on \['fc'\] but not on \['out'\]; PEFT's use_dora"
    ):
        jlora.save_peft(tmp_path / "mixed", mixed)


# PiSSA and OLoRA starts ------------------------------------------------------------


def _np_start(w, init, rank, scale):
    """The starting update `scale * a0 @ b0` of the paper's PiSSA (the best rank-r
    approximation `U_r S_r V_r^T`) or PEFT's OLoRA (`scale * (Q_r R_r)^T` from the QR
    of the `[out, in]` matrix), in float64; both are free of the decompositions' sign
    conventions."""
    w = np.asarray(w, np.float64)
    if init == "olora":
        q, r = np.linalg.qr(w.T)
        return scale * (q[:, :rank] @ r[:rank]).T
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_starts_keep_the_model_and_move_the_start_out_of_the_kernel(key, init):
    w = jax.random.normal(key, (D_IN, D_OUT)) / np.sqrt(D_IN)
    lp = jlora.init(key, {"kernel": w}, jlora.LoraConfig(RANK, 8, init=init))
    lw = lp["kernel"]
    assert np.array_equal(lw.a0, lw.a) and np.array_equal(lw.b0, lw.b)
    start = _np_start(w, init, RANK, lw.scale)
    bound = chain_bound(D_IN + D_OUT, 4)
    assert_close(lw.scale * np.asarray(lw.a, np.float64) @ np.asarray(lw.b), start, bound)
    assert_close(
        lw.w, np.asarray(w, np.float64) - start, bound, scale=float(np.abs(w).max())
    )
    x = jax.random.normal(key, (5, D_IN))
    y = jlora.lora(lambda p, x: x @ p["kernel"], strict=True)(lp, x)
    assert_close(y, x @ w, chain_bound(D_IN + RANK, 4))
    assert jlora.summary(lp).total_params == D_IN * D_OUT + RANK * (D_IN + D_OUT)


def test_a_randomized_svd_start_approaches_the_exact_one(key):
    # Rank-RANK signal of singular value 10 over noise of 0.1: subspace iteration
    # converges as (0.1 / 10)^(2 niter), so two iterations give the exact residual to
    # far below the float32 bound of the comparison.
    k1, k2, k3 = jax.random.split(key, 3)
    u = jnp.linalg.qr(jax.random.normal(k1, (D_IN, D_IN)))[0]
    v = jnp.linalg.qr(jax.random.normal(k2, (D_OUT, D_OUT)))[0]
    s = jnp.concatenate([jnp.full((RANK,), 10.0), 0.1 * jnp.ones((D_OUT - RANK,))])
    w = (u[:, :D_OUT] * s) @ v.T
    exact = jlora.init(k3, {"kernel": w}, jlora.LoraConfig(RANK, 8, init="pissa"))
    approx = jlora.init(k3, {"kernel": w}, jlora.LoraConfig(RANK, 8, init="pissa_niter_2"))
    optimal = np.sqrt(D_OUT - RANK) * 0.1  # Eckart-Young: the noise's Frobenius norm
    err_exact = float(np.linalg.norm(np.asarray(exact["kernel"].w, np.float64)))
    err_approx = float(np.linalg.norm(np.asarray(approx["kernel"].w, np.float64)))
    tol = chain_bound(D_IN * D_OUT, 2) * float(np.linalg.norm(np.asarray(w)))
    assert abs(err_exact - optimal) <= tol
    assert optimal - tol <= err_approx <= optimal + tol + 1e-3 * optimal


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_plain_lora_conversion_is_the_trained_model_on_the_original_base(key, init):
    model = _MLP()
    x = jax.random.normal(key, (3, D_IN))
    p = model.init(key, x)["params"]
    cfg = jlora.LoraConfig(RANK, 8, init=init, use_rslora=init == "olora")
    lp = _perturbed_ab(jlora.init(key, p, cfg), key)

    def fn(p, x):
        return model.apply({"params": p}, x)

    trained = fn(jlora.merge(lp), x)
    plain = jlora.plain_lora(jlora.split(lp)[0])
    assert plain["up"]["kernel"].rank == 2 * RANK and plain["up"]["kernel"].a0 is None
    onto_original = jlora.combine(plain, p)
    bound = chain_bound(D_IN + D_OUT + 2 * RANK, 6)
    assert_close(jlora.lora(fn)(onto_original, x), trained, bound)
    assert_close(jlora.plain_lora(lp)["up"]["kernel"].w, p["up"]["kernel"], bound)
    with pytest.raises(ValueError, match="jlora.plain_lora"):
        jlora.stack_adapters({"x": jlora.split(lp)[0], "y": jlora.split(lp)[0]})


def _perturbed_ab(lp, key):
    def one(x):
        if not isinstance(x, jlora.LoraWeight):
            return x
        k1, k2 = jax.random.split(jax.random.fold_in(key, x.b.size))
        return x.replace(
            a=x.a + 0.1 * jax.random.normal(k1, x.a.shape),
            b=x.b + 0.1 * jax.random.normal(k2, x.b.shape),
        )

    return jax.tree.map(one, lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))


def test_starts_decompose_each_layer_of_a_stack_and_keep_shardings(key):
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    w = jax.random.normal(key, (2, 8, 16))
    w = jax.device_put(
        w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "model"))
    )
    cfg = jlora.LoraConfig(
        2, 4, init="pissa", layout={"w": jlora.Layout((1,), (2,), (0,))}, use_dora=True
    )
    lp = jlora.init(key, {"w": w}, cfg)
    lw = lp["w"]
    assert lw.w.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    assert lw.b.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    for i in range(2):
        start = _np_start(w[i], "pissa", 2, lw.scale)
        assert_close(
            lw.w[i],
            np.asarray(w[i], np.float64) - start,
            chain_bound(24, 4),
            scale=float(np.abs(w).max()),
        )
    # DoRA's magnitude is the original kernel's norm: the model starts at the base.
    assert_close(lw.m, np.linalg.norm(np.asarray(w, np.float64), axis=1), chain_bound(8, 1))
    assert_close(jlora.merge(lp)["w"], w, chain_bound(24, 6))


def test_starts_on_nnx_and_in_checkpoints(key, tmp_path):
    model = _NNXMLP(nnx.Rngs(0))
    x = jax.random.normal(key, (4, D_IN))
    y0 = model(x)
    original = np.asarray(model.up.kernel[...])
    jlora.nnx.apply(model, jlora.LoraConfig(RANK, 8, init="olora"), rngs=nnx.Rngs(1))
    assert not np.allclose(model.up.kernel[...], original)  # the residual
    assert_close(model(x), y0, chain_bound(D_IN + D_OUT + RANK, 6))
    assert not isinstance(model.up.kernel_lora_a0, nnx.LoRAParam)
    jlora.save_adapter(tmp_path / "ad", model)
    # The training checkpoint loads onto the base it trained on: the residual kernels.
    fresh = _NNXMLP(nnx.Rngs(0))
    for name in ("up", "down"):
        getattr(fresh, name).kernel[...] = getattr(model, name).kernel[...]
    back = jlora.load_adapter(tmp_path / "ad", fresh)
    assert np.array_equal(back.up.kernel_lora_a0[...], model.up.kernel_lora_a0[...])
    assert_close(back(x), y0, chain_bound(D_IN + D_OUT + RANK, 6))
    # Onto the original base: the residual is taken from it again (the recorded bits).
    original_model = jlora.load_adapter(tmp_path / "ad", _NNXMLP(nnx.Rngs(0)))
    assert np.array_equal(original_model.up.kernel[...], model.up.kernel[...])
    assert_close(original_model(x), y0, chain_bound(D_IN + D_OUT + RANK, 6))
    with pytest.warns(UserWarning, match="jlora.plain_lora"):  # another base
        jlora.load_adapter(tmp_path / "ad", _NNXMLP(nnx.Rngs(5)))


def test_starts_refuse_a_quantized_or_fused_kernel(key):
    p = {"kernel": jax.random.normal(key, (64, 64))}
    with pytest.raises(
        ValueError, match="kernel: init='pissa' can't start here: it is quantized"
    ):
        jlora.init(key, jlora.quantize(p, "nf4"), jlora.LoraConfig(4, 8, init="pissa"))
    fused = {"kernel$": jlora.Fused(axis=1, parts=2, adapt=(0,))}
    with pytest.raises(ValueError, match="fused"):
        jlora.init(key, p, jlora.LoraConfig(4, 8, init="olora", fused=fused))
    with pytest.raises(ValueError, match="pissa_niter_<n>"):
        jlora.LoraConfig(4, 8, init="pissa_niter_x")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_starts_match_peft_and_save_peft_writes_its_conversion(tmp_path, init):
    torch, Net = _peft_net()
    import peft

    net, state, base = _net_and_base(torch, Net)
    cfg = peft.LoraConfig(
        r=RANK, lora_alpha=8, target_modules=["fc", "out"], init_lora_weights=init
    )
    pm = peft.get_peft_model(net, cfg)
    lp = jlora.init(
        jax.random.key(0),
        base,
        jlora.LoraConfig(RANK, 8, targets="(fc|out)/kernel$", init=init),
    )
    bound = chain_bound(D_IN + D_OUT, 6)
    for name in ("fc", "out"):
        layer = getattr(pm.base_model.model, name)
        residual = layer.base_layer.weight.detach().numpy().T
        assert_close(
            lp[name]["kernel"].w, residual, bound, scale=float(np.abs(residual).max())
        )
        ab = (
            (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
            .detach()
            .numpy()
            .T
        )
        lw = lp[name]["kernel"]
        assert_close(np.asarray(lw.a) @ np.asarray(lw.b), ab, bound)
    # Train both alike (the same new factors), then jlora's PEFT file on the original
    # base gives PEFT's trained model.
    lp = _perturbed_ab(lp, jax.random.key(3))
    with torch.no_grad():
        for name in ("fc", "out"):
            layer = getattr(pm.base_model.model, name)
            layer.lora_A["default"].weight.copy_(
                torch.tensor(np.asarray(lp[name]["kernel"].a).T)
            )
            layer.lora_B["default"].weight.copy_(
                torch.tensor(np.asarray(lp[name]["kernel"].b).T)
            )
    pm.eval()
    ids = np.array([[1, 5, 7, 19, 0]])
    want = pm(torch.tensor(ids)).detach().numpy()
    got = jlora.lora(lambda p, x: _Flax().apply({"params": p}, x))(lp, jnp.asarray(ids))
    assert_close(got, want, bound)
    with pytest.warns(UserWarning, match="twice the rank"):
        jlora.save_peft(tmp_path / "ours", lp)
    written = jlora.read_peft_config(tmp_path / "ours")
    assert written["r"] == 2 * RANK and written["lora_alpha"] == 16
    net2 = Net()
    net2.load_state_dict(state)
    theirs = peft.PeftModel.from_pretrained(net2, tmp_path / "ours")
    theirs.eval()
    assert_close(theirs(torch.tensor(ids)).detach().numpy(), want, bound)


def test_dora_under_a_mesh_with_strict_stays_factored_and_sharded():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS host device count)")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from test_mesh import RULES, SEQ, VOCAB, LogicalLM, _mesh, sharded_init

    msh, rules = _mesh("tp")
    model = LogicalLM()
    ids = jax.random.randint(jax.random.key(0), (8, SEQ), 0, VOCAB)
    cfg = jlora.LoraConfig(4, 8, targets=r"(query|value|up|down)/kernel$", use_dora=True)
    with jax.set_mesh(msh), nn.logical_axis_rules(rules):
        lp = _perturbed(sharded_init(model, msh, rules, ids, cfg), jax.random.key(3))
        ids = jax.device_put(ids, NamedSharding(msh, P(RULES["tp"][1][0])))
        up = lp["params"]["up"]["kernel"]
        # m is placed as the kernel's output axis (mlp -> model).
        assert up.m.value.sharding.spec == P("model")
        merged = jax.jit(model.apply)(jlora.merge(lp), ids)
        got = jax.jit(jlora.lora(model.apply, strict=True))(lp, ids)
        assert_close(got, merged, chain_bound(64, 11))
        adapters, base = jlora.split(lp)

        def loss(ad, merge_first):
            p = jlora.combine(ad, base)
            if merge_first:
                return jnp.mean(model.apply(jlora.merge(p), ids) ** 2)
            return jnp.mean(jlora.lora(model.apply, strict=True)(p, ids) ** 2)

        g = jax.jit(jax.grad(loss), static_argnums=1)(adapters, False)
        ref = jax.jit(jax.grad(loss), static_argnums=1)(adapters, True)
    for name in ("up", "down"):
        got_m = g["params"][name]["kernel"].m
        want_m = ref["params"][name]["kernel"].m
        assert_close(
            getattr(got_m, "value", got_m),
            getattr(want_m, "value", want_m),
            chain_bound(64, 22),
        )


def test_a_traced_multiplier_of_a_dora_kernel_gets_the_merged_gradient(key):
    lp = _dora_lw(key)
    x = jax.random.normal(key, (5, D_IN))
    scales = jnp.linspace(0.5, 2.0, D_OUT)

    def fn(p, x, c):
        return x @ (p["kernel"] * c)

    for c in (jnp.float32(1.7), scales, -scales):
        got = jax.grad(lambda c: jnp.sum(jlora.lora(fn, strict=True)(lp, x, c) ** 2))(c)
        want = jax.grad(lambda c: jnp.sum(fn(jlora.merge(lp), x, c) ** 2))(c)
        assert_close(got, want, chain_bound(D_IN + RANK, 6))


def test_shard_map_of_a_row_parallel_dora_kernel_is_dense_and_right(key):
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    lp = _dora_lw(key)
    x = jax.random.normal(key, (4, D_IN))

    def fn(p, x):
        body = lambda k, xs: jax.lax.psum(xs @ k, "x")  # noqa: E731
        spec = (P("x", None), P(None, "x"))
        return jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=P())(p["kernel"], x)

    with jax.set_mesh(mesh):
        want = fn(jlora.merge(lp), x)
        with pytest.warns(UserWarning, match="a DoRA kernel split along inputs"):
            got = jlora.lora(fn)(lp, x)
        with pytest.raises(jlora.RuleError, match="DoRA kernel split along inputs"):
            jlora.lora(fn, strict=True)(lp, x)
    assert_close(got, want, chain_bound(D_IN + RANK, 4))


def test_norms_follow_the_factors_through_combine_split_and_load(key, tmp_path):
    lp = _dora_lw(key)
    w = lp["kernel"].w
    adapters, base = jlora.split(lp)
    trained = jax.tree.map(lambda x: x * 1.1, adapters)  # stands for training steps
    params = jlora.combine(trained, base)  # the norm of the trained factors
    merged = jlora.merge(params)
    assert_close(
        jlora.unmerge(merged, jlora.split(params)[0])["kernel"].w,
        w,
        chain_bound(D_IN + RANK, 4),
    )
    assert jlora.split(trained)[0]["kernel"].norm is trained["kernel"].norm  # no kernel
    jlora.save_adapter(tmp_path / "ad", trained)  # (split's norm, from before training)
    loaded = jlora.load_adapter(tmp_path / "ad", base)
    assert_close(
        jlora.unmerge(merged, jlora.split(loaded)[0])["kernel"].w,
        w,
        chain_bound(D_IN + RANK, 4),
    )


def test_dora_init_places_m_as_the_kernels_output_axes(key):
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    w = jax.device_put(jax.random.normal(key, (6, 4, 3)), NamedSharding(mesh, P(None, "x")))
    cfg = jlora.LoraConfig(
        2, 4, targets="k", use_dora=True, layout={"k": jlora.Layout((0,), (2, 1))}
    )
    lw = jlora.init(key, {"k": w}, cfg)["k"]
    assert lw.m.shape == (3, 4) and lw.m.sharding.spec == P(None, "x")
    want = np.linalg.norm(np.asarray(w, np.float64), axis=0).T
    assert_close(lw.m, want, chain_bound(6, 1))
    with pytest.raises(ValueError, match="use_dora with Fused"):
        jlora.init(
            key,
            {"kernel": jnp.ones((4, 6))},
            jlora.LoraConfig(
                1, 1, use_dora=True, fused={"kernel": jlora.Fused(1, 2, (0,))}
            ),
        )


def test_dora_adapters_on_a_4bit_nnx_base_stack_and_serve_a_mixed_batch(key):
    # The composition the capabilities promise: DoRA adapters, trained on an NF4 base
    # of an NNX model, stacked, one batch served with a different adapter per row.
    base = jlora.quantize(_NNXMLP(nnx.Rngs(0)), "nf4", block_size=8)
    models = {}
    for i in range(3):
        m = nnx.clone(base)
        cfg = jlora.LoraConfig(2 + i, 4.0, use_dora=True)
        jlora.nnx.apply(m, cfg, rngs=nnx.Rngs(10 + i))
        for layer in (m.up, m.down):
            v = layer.kernel_lora_b
            v.set_raw_value(0.2 * jax.random.normal(jax.random.key(i), v.shape))
            g = layer.kernel_lora_m
            g.set_raw_value(g.get_raw_value() * (1.1 + 0.1 * i))
        models[f"t{i}"] = m
    stacked = jlora.stack_adapters(models)
    assert stacked["up"]["kernel"].m.shape == (3, D_OUT)
    graphdef, state = nnx.split(base)
    served = jlora.combine(stacked, state)
    ids = [0, 1, -1, 2, 1]
    x = jax.random.normal(key, (len(ids), D_IN))

    def fn(s, x):
        return nnx.merge(graphdef, s)(x)

    f = jlora.lora(fn, adapter_ids=jnp.asarray(ids), strict=True)
    bound = chain_bound(D_IN + D_OUT + 4, 6)
    plain = {-1: jlora.dequantize(state)}
    for i in sorted(set(ids) - {-1}):
        plain[i] = jlora.merge(
            jlora.dequantize(jlora.combine(jlora.select(stacked, i), state))
        )
    ref = jnp.concatenate([fn(plain[i], x[r : r + 1]) for r, i in enumerate(ids)])
    for y in (f(served, x), jax.jit(f)(served, x)):
        assert_close(y, ref, bound)
    # Each adapter out of the set is the one that went in.
    back = jlora.unstack_adapters(stacked)["t2"]
    assert np.array_equal(back["up"]["kernel"].m, models["t2"].up.kernel_lora_m[...])
