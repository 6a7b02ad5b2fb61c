"""Eager calls of `jlora.lora(fn)`: traced and compiled once per signature, not per call.

The oracle for values is the merged model, `fn(jlora.merge(params), x)`; traces are
counted with a counter inside `fn`, compilations with JAX's compile-time event.
"""

import gc
import pathlib
import sys
import weakref

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, chain_bound, perturb

import jlora

D = 8


def adapted(params, cfg, seed=1):
    lp = jlora.init(jax.random.key(seed), params, cfg)
    return perturb(lp, jax.random.key(seed + 1))


def mlp_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "l1": {"kernel": jax.random.normal(k1, (D, D)) * 0.3},
        "l2": {"kernel": jax.random.normal(k2, (D, 4)) * 0.3},
    }
    return adapted(params, jlora.LoraConfig(2, 4))


def stacked_params(seed=0):
    ws = jax.random.normal(jax.random.key(seed), (3, D, D)) * 0.3
    cfg = jlora.LoraConfig(
        2, 4, targets="ws", layout={"ws": jlora.Layout((1,), (2,), (0,))}
    )
    return adapted({"ws": ws}, cfg)


class Counted:
    """`fn` with a count of how often Python runs it (each run is one trace)."""

    def __init__(self, fn):
        self.fn, self.traces = fn, 0

    def __call__(self, *args, **kwargs):
        self.traces += 1
        return self.fn(*args, **kwargs)


def mlp(p, x):
    return jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]


def scan_model(p, x):
    def layer(h, w):
        return jnp.tanh(h @ w), None

    return jax.lax.scan(layer, x, p["ws"])[0]


def cond_model(p, x):
    w = p["l1"]["kernel"]
    h = jax.lax.cond(x.sum() > 0, lambda h: jnp.tanh(h @ w), lambda h: -(h @ w), x)
    return h @ p["l2"]["kernel"]


@jax.jit
def _plain_inner(x, w):
    return jnp.tanh(x @ w)


_options_inner = jax.jit(lambda x, w: jnp.tanh(x @ w), keep_unused=True, inline=False)


def nested_jit_model(p, x):
    h = _options_inner(x, p["l1"]["kernel"])
    return _plain_inner(h, p["l2"]["kernel"])


class compilations:
    """Counts XLA compilations while active (JAX's backend-compile event)."""

    def __enter__(self):
        self.count = 0

        def listener(event, duration, **kwargs):
            if event == "/jax/core/compile/backend_compile_duration":
                self.count += 1

        self._listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)
        return False


def test_five_eager_calls_trace_once_and_equal_the_merged_model():
    lp = mlp_params()
    x = jax.random.normal(jax.random.key(3), (2, D))
    fn = Counted(mlp)
    outs = [jlora.lora(fn)(lp, x) for _ in range(5)]
    assert fn.traces == 1
    ref = mlp(jlora.merge(lp), x)
    for out in outs:
        assert_close(out, ref, chain_bound(k=D, depth=4))


def test_a_new_shape_traces_again_and_an_old_one_does_not():
    lp = mlp_params()
    fn = Counted(mlp)
    lfn = jlora.lora(fn)
    lfn(lp, jnp.ones((2, D)))
    out = lfn(lp, jnp.ones((5, D)))
    assert fn.traces == 2
    assert out.shape == (5, 4)
    lfn(lp, jnp.zeros((2, D)))
    assert fn.traces == 2


def test_changed_scale_traces_again_and_uses_the_new_scale():
    lp = mlp_params()
    x = jax.random.normal(jax.random.key(3), (2, D))
    fn = Counted(mlp)
    jlora.lora(fn)(lp, x)
    lw = lp["l1"]["kernel"]
    rescaled = {**lp, "l1": {"kernel": lw.replace(scale=lw.scale * 3.0)}}
    out = jlora.lora(fn)(rescaled, x)
    assert fn.traces == 2
    ref = mlp(jlora.merge(rescaled), x)
    assert_close(out, ref, chain_bound(k=D, depth=4))
    # (the old scale's value differs from the new one by far more than rounding)
    assert np.max(np.abs(np.asarray(ref - mlp(jlora.merge(lp), x)))) > 1e-2


def test_changed_weights_reuse_the_trace_and_give_their_own_result():
    fn = Counted(mlp)
    x = jax.random.normal(jax.random.key(3), (2, D))
    for seed in range(3):
        lp = mlp_params(seed)
        out = jlora.lora(fn)(lp, x)
        assert_close(out, mlp(jlora.merge(lp), x), chain_bound(k=D, depth=4))
    assert fn.traces == 1


@pytest.mark.parametrize(
    "model, params",
    [
        (scan_model, stacked_params),
        (cond_model, mlp_params),
        (nested_jit_model, mlp_params),
    ],
    ids=["scan", "cond", "nested-jit"],
)
def test_call_like_models_do_not_compile_on_the_second_eager_call(model, params):
    lp = params()
    x = jax.random.normal(jax.random.key(3), (2, D))
    lfn = jlora.lora(model, strict=True)
    with compilations() as first:
        out = lfn(lp, x)
    with compilations() as later:
        outs = [lfn(lp, x) for _ in range(3)]
    assert first.count >= 1
    assert later.count == 0
    ref = model(jlora.merge(lp), x)
    for y in [out, *outs]:
        assert_close(y, ref, chain_bound(k=D, depth=6))


def test_the_cache_keeps_no_argument_alive():
    lp = mlp_params()
    x = jax.random.normal(jax.random.key(3), (2, D))
    jlora.lora(mlp)(lp, x)
    refs = [weakref.ref(leaf) for leaf in jax.tree.leaves(lp) + [x]]
    del lp, x
    gc.collect()
    assert all(r() is None for r in refs)


def test_an_entry_dies_with_its_function_and_what_it_closes_over():
    # A closure over an array is keyed by its identity; its compiled program holds the
    # array as a constant, so the entry must go when the function does.
    lp = mlp_params()

    def closure():
        table = jax.random.normal(jax.random.key(5), (2, 4))
        return (lambda p, x: mlp(p, x) + table), weakref.ref(table)

    fn, table = closure()
    out = jlora.lora(fn)(lp, jnp.ones((2, D)))
    assert_close(out, fn(jlora.merge(lp), jnp.ones((2, D))), chain_bound(k=D, depth=4))
    function = weakref.ref(fn)
    del fn, out
    gc.collect()
    assert function() is None and table() is None


def test_a_fresh_closure_over_equal_values_hits_and_over_new_values_retraces():
    lp = mlp_params()
    x = jax.random.normal(jax.random.key(3), (2, D))
    seen = Counted(None)  # (an object compared by identity: held weakly in the key)

    def make(factor):
        def fn(p, x):
            seen.traces += 1
            return mlp(p, x) * factor

        return fn

    for _ in range(3):  # a new function object each call, closing over equal values
        out = jlora.lora(make(2.0))(lp, x)
    assert seen.traces == 1
    out = jlora.lora(make(-3.0))(lp, x)
    assert seen.traces == 2
    assert_close(out, -3.0 * mlp(jlora.merge(lp), x), chain_bound(k=D, depth=4))


class Model(nn.Module):
    traces = 0  # (a class attribute, not a field)

    @nn.compact
    def __call__(self, x):
        type(self).traces += 1
        return nn.Dense(4)(jnp.tanh(nn.Dense(D)(x)))


def test_a_bound_method_is_keyed_by_its_function_and_instance():
    x = jax.random.normal(jax.random.key(3), (2, D))
    model = Model()
    params = model.init(jax.random.key(0), x)["params"]
    lp = adapted(params, jlora.LoraConfig(2, 4))
    Model.traces = 0
    # `model.apply` is a new bound-method object each time
    outs = [jlora.lora(model.apply)({"params": lp}, x) for _ in range(3)]
    assert Model.traces == 1
    ref = model.apply({"params": jlora.merge(lp)}, x)
    for out in outs:
        assert_close(out, ref, chain_bound(k=D, depth=4))


def test_static_leaves_are_keys_and_unkeyable_ones_run_traced_every_call():
    lp = mlp_params()
    x = jax.random.normal(jax.random.key(3), (2, D))

    def fn(p, x, flag, config):
        y = mlp(p, x) * config.factor
        return -y if flag else y

    class Config:  # compared by identity and mutable: never a cache key
        factor = 2.0

    counted = Counted(fn)
    lfn = jlora.lora(counted)
    config = Config()
    ref = mlp(jlora.merge(lp), x)
    assert_close(lfn(lp, x, True, config), -2.0 * ref, chain_bound(k=D, depth=4))
    config.factor = 5.0
    assert_close(lfn(lp, x, False, config), 5.0 * ref, chain_bound(k=D, depth=4))
    assert counted.traces == 2

    hashable = Counted(lambda p, x, flag: -mlp(p, x) if flag else mlp(p, x))
    for flag in (True, False, True, False):
        out = jlora.lora(hashable)(lp, x, flag)
        assert_close(out, -ref if flag else ref, chain_bound(k=D, depth=4))
    assert hashable.traces == 2  # one per value of the static leaf


def test_plain_params_call_fn_itself_every_time():
    fn = Counted(lambda p, x: x @ p["kernel"])
    params = {"kernel": jnp.ones((3, 2))}
    for _ in range(3):
        out = jlora.lora(fn)(params, jnp.ones((1, 3)))
    assert fn.traces == 3  # run as written: no trace, no compilation
    assert isinstance(out, jax.Array)
    np.testing.assert_array_equal(out, np.full((1, 2), 3.0, np.float32))


def test_dropout_masks_follow_the_key_and_match_the_jitted_call():
    params = {"kernel": jax.random.normal(jax.random.key(0), (16, 16))}
    lp = jlora.init(jax.random.key(1), params, jlora.LoraConfig(4, 4, dropout=0.5))
    lp = perturb(lp, jax.random.key(2))
    fn = Counted(lambda p, x: x @ p["kernel"])
    x = jax.random.normal(jax.random.key(3), (4, 16))
    k1, k2 = jax.random.key(10), jax.random.key(11)
    a = jlora.lora(fn, rng=k1)(lp, x)
    b = jlora.lora(fn, rng=k1)(lp, x)
    c = jlora.lora(fn, rng=k2)(lp, x)
    assert fn.traces == 1  # the key is an argument of the compiled call
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    jitted = jax.jit(jlora.lora(fn, rng=k2))(lp, x)  # the traced path
    assert_close(c, jitted, chain_bound(k=16, depth=2))
    no_dropout = jlora.lora(fn)(lp, x)
    assert_close(no_dropout, x @ jlora.merge(lp)["kernel"], chain_bound(k=16, depth=2))


def test_under_an_outer_transformation_the_call_is_traced_as_before():
    lp = mlp_params()
    x = jax.random.normal(jax.random.key(3), (2, D))
    adapters, base = jlora.split(lp)
    fn = Counted(mlp)

    def loss(ad):
        return jlora.lora(fn)(jlora.combine(ad, base), x).sum()

    def loss_ref(ad):
        return mlp(jlora.merge(jlora.combine(ad, base)), x).sum()

    for _ in range(2):
        g = jax.grad(loss)(adapters)
    assert fn.traces == 2  # eager grad: one trace per call, no cached program
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(jax.grad(loss_ref)(adapters))):
        assert_close(got, want, chain_bound(k=D, depth=9))


def test_the_benchmark_runs_and_its_cached_calls_trace_once():
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    import eager

    rows, text = eager.measure(d=8, layers=2, batch=2, repeats=1)
    assert {r["model"] for r in rows} == {"mlp", "scan", "cond"}
    for r in rows:
        assert r["traces"] == 1, r  # 10 cached eager calls, one trace
        for column in ("call 1", "call 10", "jit", "plain eager"):
            assert r[column] > 0
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "model" and "call 10 / jit" in header
    assert lines[1].startswith("|---")
    assert len(lines) == 2 + len(rows)
