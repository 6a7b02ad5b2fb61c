"""jlora on Flax NNX: fine-tune a small decoder with LoRA, checkpoint the adapter, load it
onto a fresh copy of the base, merge for serving, and generate with a KV cache.

A decoder (token and position `nnx.Embed`, `nnx.MultiHeadAttention` with a KV cache,
an MLP, the token embedding tied as the head through `attend`) is pretrained to count
up by one (`t -> t + 1 mod V`). LoRA on the attention and MLP kernels then teaches it
to count by three, training only the `nnx.LoRAParam` factors with `nnx.Optimizer`. The
adapter is saved with `jlora.save_adapter`, loaded onto a fresh model holding the
pretrained base, merged with `jlora.nnx.merge_and_unload`, and the plain model
generates token by token from its KV cache.

    python examples/nnx_finetune.py [--pretrain-steps 300] [--lora-steps 200]
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jlora

VOCAB, SEQ, D, HEADS = 16, 12, 64, 4


class Block(nnx.Module):
    def __init__(self, rngs):
        self.norm1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 4 * D, rngs=rngs)
        self.down = nnx.Linear(4 * D, D, rngs=rngs)

    def __call__(self, h, mask, decode):
        h = h + self.attn(self.norm1(h), mask=mask, decode=decode)
        return h + self.down(nnx.gelu(self.up(self.norm2(h))))


class Decoder(nnx.Module):
    def __init__(self, rngs, layers=2):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.pos = nnx.Embed(SEQ, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(D, rngs=rngs)

    def __call__(self, ids, positions, decode=False):
        h = self.embed(ids) + self.pos(positions)
        mask = None if decode else nnx.make_causal_mask(ids)
        for block in self.blocks:
            h = block(h, mask, decode)
        return self.embed.attend(self.norm(h))  # the tied head

    def init_cache(self, batch):
        for block in self.blocks:
            block.attn.init_cache((batch, SEQ, D))


def batch(key, step, n=32):
    """Sequences counting by `step` from random starts: inputs and next tokens."""
    start = jax.random.randint(key, (n, 1), 0, VOCAB)
    seq = (start + step * jnp.arange(SEQ + 1)) % VOCAB
    return seq[:, :-1], seq[:, 1:]


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(model, wrt, steps, step_size, lr, seed):
    optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=wrt)
    positions = jnp.arange(SEQ)[None]

    @nnx.jit
    def update(model, optimizer, x, y):
        def loss_fn(model):
            return xent(model(x, positions), y)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    keys = jax.random.split(jax.random.key(seed), steps)
    loss = None
    for k in keys:
        loss = update(model, optimizer, *batch(k, step_size))
    return float(loss)


def generate(model, prompt, n):
    """Greedy decoding from the KV cache, one token per call."""
    model.eval()
    model.init_cache(prompt.shape[0])
    step = nnx.jit(lambda m, t, p: m(t, p, decode=True))
    out, tok = [], prompt
    for i in range(n):
        logits = step(model, tok, jnp.full(tok.shape, i))
        tok = jnp.argmax(logits[:, -1:], axis=-1)
        out.append(tok)
    return jnp.concatenate(out, axis=1)


def accuracy(tokens, prompt, step_size):
    want = (prompt + step_size * jnp.arange(1, tokens.shape[1] + 1)) % VOCAB
    return float(jnp.mean(tokens == want))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--lora-steps", type=int, default=200)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args(argv)

    base = Decoder(nnx.Rngs(0))
    pre = train(base, nnx.Param, args.pretrain_steps, 1, 3e-3, seed=1)
    base_state = nnx.state(base)  # the pretrained base, kept to rebuild it later
    prompt = jnp.arange(8)[:, None]
    base_acc = accuracy(generate(nnx.clone(base), prompt, SEQ - 1), prompt, 3)
    base.train()
    print(f"pretrained (count by 1): loss {pre:.3f}; counting by 3: {base_acc:.0%}")

    config = jlora.LoraConfig(
        args.rank, 2 * args.rank, targets=r"(attn/(query|key|value|out)|up|down)/kernel$"
    )
    model = jlora.nnx.apply(base, config, rngs=nnx.Rngs(2))
    print(jlora.summary(model))
    tuned = train(model, nnx.LoRAParam, args.lora_steps, 3, 3e-3, seed=3)
    lora_tokens = generate(model, prompt, SEQ - 1)
    lora_acc = accuracy(lora_tokens, prompt, 3)
    print(f"LoRA (count by 3): loss {tuned:.3f}; generated correctly: {lora_acc:.0%}")

    with tempfile.TemporaryDirectory() as tmp:
        jlora.save_adapter(f"{tmp}/adapter", model, config)
        fresh = Decoder(nnx.Rngs(0))
        nnx.update(fresh, base_state)
        loaded = jlora.load_adapter(f"{tmp}/adapter", fresh)
    served = jlora.nnx.merge_and_unload(loaded)
    assert not nnx.state(served, nnx.LoRAParam)
    served_tokens = generate(served, prompt, SEQ - 1)
    same = float(jnp.mean(served_tokens == lora_tokens))
    print(
        f"served (loaded onto a fresh base, merged, plain Decoder): generated correctly "
        f"{accuracy(served_tokens, prompt, 3):.0%}, {same:.0%} of tokens as the LoRA model"
    )
    return {"base_acc": base_acc, "lora_acc": lora_acc, "same": same, "loss": tuned}


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("standard"):
        main()
