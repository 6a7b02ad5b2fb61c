"""The model and training loop that tests/test_multiprocess.py runs in several JAX
processes and, as its reference, in one process."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora

CFG = jlora.LoraConfig(4, 8, train_bias="lora_only")
LR, STEPS = 0.05, 3


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(96, name="up")(x))
        return nn.Dense(32, name="down")(h)


def data():
    """Base params and a batch as host arrays, the same in every process."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (16, 32)))
    y = np.asarray(jax.random.normal(jax.random.key(1), (16, 32)))
    params = MLP().init(jax.random.key(2), x)["params"]
    return jax.tree.map(np.asarray, params), x, y


def param_specs():
    """FSDP: each kernel's first axis over every device; biases replicated."""
    return {
        "up": {"kernel": P("fsdp", None), "bias": P()},
        "down": {"kernel": P("fsdp", None), "bias": P()},
    }


def train(base, x, y, mesh):
    """LoRA on the sharded base, plain SGD (its error stays bounded by the gradients').

    Returns the adapters, the losses and the initial adapted params.
    """
    lp = jlora.init(jax.random.key(5), base, CFG)
    adapters, frozen = jlora.split(lp)
    tx = optax.sgd(LR)
    apply = jlora.lora(MLP().apply, strict=True)

    def step(adapters, opt_state, frozen, x, y):
        def loss_fn(ad):
            out = apply({"params": jlora.combine(ad, frozen)}, x)
            return jnp.mean((out - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        jlora.adapter_specs(lp),
        is_leaf=lambda s: isinstance(s, P),
    )
    step = jax.jit(step, out_shardings=(shardings, None, None))
    opt_state = tx.init(adapters)
    losses = []
    for _ in range(STEPS):
        adapters, opt_state, loss = step(adapters, opt_state, frozen, x, y)
        losses.append(float(loss))
    return adapters, losses, lp
