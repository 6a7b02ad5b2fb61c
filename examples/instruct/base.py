"""The embedded base model: pretrained here on the generated corpus, cached on disk.

`ensure_base(cache_dir, settings)` returns a directory holding a GPT-2 checkpoint in
the Hugging Face layout (`config.json`, `model.safetensors`, `tokenizer.json`), the same
layout `--model-path` loads. The first call trains a byte-level BPE tokenizer and the
model on `world.corpus` and writes the directory; later calls with the same settings
find it and return at once. The directory name is a hash of the settings, so changed
settings train a new base instead of reusing a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import gpt2, world
from .data import DEFAULT_TEMPLATE, Template
from .model import GPT, GPTConfig, init_params

EOS = "<|endoftext|>"
VERSION = 3  # bump when the corpus, tokenizer or training recipe changes


@dataclasses.dataclass(frozen=True)
class BaseSettings:
    """How the embedded base is built; every field is part of the cache key."""

    n_docs: int = 20_000
    vocab_size: int = 1024
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 8
    n_positions: int = 256
    block: int = 96  # covers the prompts of the instruction sample
    batch: int = 16
    steps: int = 4000
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "seed" and not value > 0:
                raise ValueError(f"BaseSettings.{f.name} must be positive, got {value!r}")

    def key(self) -> str:
        blob = json.dumps({"version": VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2's scheme) with `<|endoftext|>` as id 0.

    Unlike GPT-2's, it adds a space before each text it encodes, so a word at the start
    of a response is the same token as the word inside a sentence.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def pretrain(settings: BaseSettings, out_dir: str, *, log=print) -> dict:
    """Train the tokenizer and the model on the corpus; write the checkpoint to `out_dir`.

    Returns a summary: the settings, the first and last training losses, seconds taken.
    """
    from tqdm import tqdm

    s = settings
    start = time.perf_counter()
    docs = world.corpus(s.n_docs, s.seed)
    # The tokenizer also sees the default prompt template, as a tokenizer trained on
    # broad text would have; the model never does.
    t = Template.load(DEFAULT_TEMPLATE)
    tokenizer = train_tokenizer(docs + [t.prompt_input, t.prompt_no_input], s.vocab_size)
    eos = tokenizer.token_to_id(EOS)
    flat = []
    for enc in tokenizer.encode_batch(docs):
        flat.extend(enc.ids + [eos])
    if len(flat) <= s.block:
        raise ValueError(
            f"the corpus of {s.n_docs} documents has {len(flat)} tokens, not more than "
            f"a training window ({s.block}); raise n_docs (--base-docs)"
        )
    flat = np.asarray(flat, np.int32)
    log(
        f"base model: corpus of {s.n_docs} documents, {len(flat):,} tokens, "
        f"vocabulary {tokenizer.get_vocab_size()}"
    )

    cfg = GPTConfig(
        vocab_size=tokenizer.get_vocab_size(),
        n_positions=s.n_positions,
        n_embd=s.n_embd,
        n_layer=s.n_layer,
        n_head=s.n_head,
        eos_token_id=eos,
    )
    model = GPT(cfg)
    params = init_params(cfg, jax.random.key(s.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, s.steps // 10, s.steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, 0.9, 0.95))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1], x[:, 1:]
            ).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(s.seed)
    losses = []
    bar = tqdm(range(s.steps), desc="pretraining the base", unit="step", leave=False)
    with jax.numpy_dtype_promotion("standard"):
        for i in bar:  # windows of `block` tokens from anywhere in the stream
            starts = rng.integers(0, len(flat) - s.block, s.batch)
            x = np.stack([flat[j : j + s.block] for j in starts])
            params, opt_state, loss = step(params, opt_state, jnp.asarray(x))
            if i % 10 == 0 or i == s.steps - 1:
                losses.append(float(loss))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    summary = {
        "settings": dataclasses.asdict(s),
        "version": VERSION,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "seconds": round(time.perf_counter() - start, 1),
    }
    gpt2.save(out_dir, cfg, params, tokenizer)
    with open(os.path.join(out_dir, "pretrain.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(
        f"base model: pretrained {s.steps} steps in {summary['seconds']} s, "
        f"loss {summary['first_loss']:.2f} -> {summary['last_loss']:.2f}"
    )
    return summary


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(root, "jlora", "alpaca-base")


def ensure_base(
    cache_dir: str | None = None, settings: BaseSettings | None = None, *, log=print
) -> str:
    """The cached base model's directory, pretraining it first when it isn't there."""
    settings = settings or BaseSettings()
    path = os.path.join(cache_dir or default_cache_dir(), settings.key())
    if all(os.path.isfile(os.path.join(path, f)) for f in (*gpt2.FILES, "pretrain.json")):
        log(f"base model: cached at {path}")
        return path
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    pretrain(settings, tmp, log=log)
    shutil.rmtree(path, ignore_errors=True)  # an incomplete earlier attempt
    os.replace(tmp, path)  # appears whole or not at all
    log(f"base model: cached at {path}")
    return path
