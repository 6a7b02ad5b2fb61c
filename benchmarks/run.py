"""jlora benchmarks: training step, inference and compile time, side by side.

    python benchmarks/run.py            # GPT 4 x 512, seq 128, batch 8, LoRA r=8 on q, v
    python benchmarks/run.py --quick    # small models, for a smoke run (< 1 minute)

Training is measured on two models: GPT 4 x 512 and a larger GPT 12 x 768 (same seq,
batch and LoRA); inference, checkpoints and the merge on the first.

Candidates, one jitted AdamW step each, same model, data and dtypes, timed in one
process, alternating, after warm-up; medians over rounds and ratios to full fine-tuning:
  full          gradients over every parameter
  jlora         jlora.lora(model.apply), gradients over jlora.split adapters only (lean)
  hand-written  a Linen module with explicit lora_a / lora_b, gradients over them only
  jlora whole-tree  gradients over the whole adapted tree + jlora.optimizer, donated
  materialized  gradients through model.apply(jlora.merge(params))
  qwix          qwix.LoraProvider on the same Linen model (when qwix is installed)
  nnx.LoRALinear  flax.nnx.LoRALinear on q, v of the same model written in NNX
  pytorch+peft  the same model in PyTorch with PEFT LoRA (with the [torch] extra)
  floor         the frozen model's backprop with no weight gradient at all (one trainable
                vector at the embedding): no LoRA can beat it
The tables are printed and written into docs/benchmarks.md between markers for this
platform (cpu or gpu), so the file holds only numbers this command produced.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import torch_peft  # noqa: E402
from gpt import GPT, GPTConfig, make_nnx_gpt, next_token_loss  # noqa: E402

import jlora  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MIN_ROUND_S = 0.25  # each timed round of a candidate lasts at least this long


def _block(tree):
    jax.block_until_ready(tree)
    return tree


def make_step(loss_fn, tx):
    """A jitted step over `(trainable, opt_state, frozen, ids)`; donates the first two."""

    def step(trainable, opt_state, frozen, ids):
        value, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1))


def alternate(cands: dict, rounds: int, reference: str) -> int:
    """Times candidates `{name: {"run": run(n), "times": []}}` in one process: two
    warm-up steps each, then `rounds` rounds, each running every candidate in turn
    (the order rotated per round) for as many steps as make `reference` last
    `MIN_ROUND_S`; appends each round's time per step to `times`. Returns the steps."""
    names = list(cands)
    for c in cands.values():
        c["run"](2)
    t0 = time.perf_counter()
    cands[reference]["run"](1)
    steps = max(1, math.ceil(MIN_ROUND_S / (time.perf_counter() - t0)))
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            cands[name]["run"](steps)
            cands[name]["times"].append((time.perf_counter() - t0) / steps)
    return steps


def lean_lora_candidate(model, params, config, ids, tx=None) -> dict:
    """The lean LoRA step of `model` (adapters differentiated, the base an argument)
    on `params` adapted with `config`: one jitted AdamW step, the adapters and the
    optimizer state donated. Returns `run(n)` (n steps, then waits), `mem` (the
    compiled step's memory analysis) and `frozen` (the base it runs on)."""
    adapters, frozen = jlora.split(jlora.init(jax.random.key(2), params, config))
    apply = jlora.lora(model.apply)

    def loss_fn(ad, frozen, ids):
        return next_token_loss(apply({"params": jlora.combine(ad, frozen)}, ids), ids)

    return stepping(loss_fn, adapters, frozen, ids, tx)


def stepping(loss_fn, trainable, frozen, ids, tx=None) -> dict:
    """`make_step(loss_fn, tx)` compiled for these arguments and kept stepping:
    `run(n)` takes n steps (then waits), `mem` is the compiled step's memory analysis,
    `frozen` the base it runs on. `tx` defaults to AdamW(1e-4)."""
    tx = optax.adamw(1e-4) if tx is None else tx
    jitted = make_step(loss_fn, tx)
    state = [trainable, tx.init(trainable)]
    mem = jitted.lower(state[0], state[1], frozen, ids).compile().memory_analysis()

    def run(n):
        for _ in range(n):
            state[0], state[1], loss = jitted(state[0], state[1], frozen, ids)
        jax.block_until_ready(loss)

    return dict(run=run, mem=mem, frozen=frozen)


def bench_args(doc: str, batch: int = 8) -> argparse.ArgumentParser:
    """The arguments the side benchmarks share: `--quick`, `--rounds`, `--batch`,
    `--no-write`."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--no-write", action="store_true")
    return p


def build(cfg: GPTConfig, rank: int, batch: int):
    key = jax.random.key(0)
    ids = jax.random.randint(key, (batch, cfg.seq), 0, cfg.vocab)
    model = GPT(cfg)
    params = model.init(jax.random.key(1), ids)["params"]
    lcfg = jlora.LoraConfig(rank, 2 * rank, targets=r"(query|value)/kernel$")
    adapters, base = jlora.split(jlora.init(jax.random.key(2), params, lcfg))
    apply = jlora.lora(model.apply)

    hand = GPT(cfg, hand_lora_rank=rank)
    flat = traverse_util.flatten_dict(hand.init(jax.random.key(1), ids)["params"])
    hand_train = traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if k[-1].startswith("lora_")}
    )
    hand_frozen = traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if not k[-1].startswith("lora_")}
    )

    def merge_dicts(a, b):
        return traverse_util.unflatten_dict(
            {**traverse_util.flatten_dict(a), **traverse_util.flatten_dict(b)}
        )

    losses = {
        "full": (
            lambda p, _, x: next_token_loss(model.apply({"params": p}, x), x),
            params,
            None,
        ),
        "jlora": (
            lambda ad, base, x: next_token_loss(
                apply({"params": jlora.combine(ad, base)}, x), x
            ),
            adapters,
            base,
        ),
        "hand-written": (
            lambda t, f, x: next_token_loss(
                hand.apply({"params": merge_dicts(t, f)}, x), x
            ),
            hand_train,
            hand_frozen,
        ),
        "materialized": (
            lambda ad, base, x: next_token_loss(
                model.apply({"params": jlora.merge(jlora.combine(ad, base))}, x), x
            ),
            adapters,
            base,
        ),
        "jlora whole-tree": (
            lambda p, _, x: next_token_loss(apply({"params": p}, x), x),
            jlora.combine(adapters, base),
            None,
        ),
        **_qwix_candidate(model, cfg, rank, ids, merge_dicts),
        **_nnx_lora_candidate(cfg, rank),
        "floor": (
            lambda d, p, x: next_token_loss(model.apply({"params": p}, x, d), x),
            jnp.zeros((cfg.d,), cfg.dtype),
            params,
        ),
    }
    return model, params, ids, losses, (adapters, base)


def _qwix_candidate(model, cfg, rank, ids, merge_dicts):
    """qwix's LoRA on the same model, gradients over its lora params only (if installed)."""
    try:
        import qwix
    except ImportError:
        return {}
    provider = qwix.LoraProvider(
        module_path=r".*(query|value)", rank=rank, alpha=2.0 * rank
    )
    lora_model = qwix.apply_lora_to_model(model, provider)
    flat = traverse_util.flatten_dict(lora_model.init(jax.random.key(1), ids)["params"])
    train = traverse_util.unflatten_dict({k: v for k, v in flat.items() if "lora" in k[-1]})
    frozen = traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if "lora" not in k[-1]}
    )
    return {
        "qwix": (
            lambda t, f, x: next_token_loss(
                lora_model.apply({"params": merge_dicts(t, f)}, x), x
            ),
            train,
            frozen,
        )
    }


def _nnx_lora_candidate(cfg, rank):
    """`flax.nnx.LoRALinear` on q, v of the NNX twin; gradients over LoRAParam only."""
    from flax import nnx

    graphdef, lora_state, rest = nnx.split(make_nnx_gpt(cfg, rank), nnx.LoRAParam, ...)

    def loss(lora_state, rest, x):
        return next_token_loss(nnx.merge(graphdef, lora_state, rest)(x), x)

    return {"nnx.LoRALinear": (loss, lora_state, rest)}


def bench_train(cfg, rank, batch, rounds, steps_per_round, torch=False, only=None):
    """Time one AdamW step of each candidate (or of those named in `only`)."""
    model, params, ids, losses, _ = build(cfg, rank, batch)
    tx = optax.adamw(1e-4)
    cands = {}
    for name, (loss_fn, trainable, frozen) in losses.items():
        if only is not None and name not in only:
            continue
        # The whole-tree route: gradients over every leaf, jlora.optimizer, donated.
        cand_tx = jlora.optimizer(tx) if name == "jlora whole-tree" else tx
        step = make_step(loss_fn, cand_tx)
        trainable = jax.tree.map(jnp.copy, trainable)
        opt_state = cand_tx.init(trainable)
        t0 = time.perf_counter()
        compiled = step.lower(trainable, opt_state, frozen, ids).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        state = [trainable, opt_state]

        def run(n, step=step, state=state, frozen=frozen):
            for _ in range(n):
                state[0], state[1], _ = step(state[0], state[1], frozen, ids)
            _block(state)

        run(2)  # warm-up
        opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state[1]))
        # Trainable leaves: jlora's adapters for the whole-tree route, else every leaf.
        n_train = sum(x.size for x in jax.tree.leaves(jlora.split(state[0])[0])) or sum(
            x.size for x in jax.tree.leaves(state[0])
        )
        cands[name] = dict(
            run=run,
            compile_s=compile_s,
            temp=getattr(mem, "temp_size_in_bytes", 0),
            times=[],
            opt_bytes=opt_bytes,
            n_train=n_train,
        )
    if torch and (only is None or "pytorch+peft" in only):
        c = torch_peft.make_candidate(
            cfg,
            rank,
            np.asarray(ids),
            jnp.dtype(cfg.dtype).name,
            torch_peft.device_for(jax.devices()[0].platform),
        )
        c["run"](1)  # warm-up (one more step than the one make_candidate took)
        cands["pytorch+peft"] = dict(c, compile_s=None, temp=None, times=[])
    names = list(cands)
    # Size rounds by time, not by count: on a GPU a step takes ~1 ms, and a round of a
    # few steps would time Python dispatch and the final sync instead of the step.
    t0 = time.perf_counter()
    cands["full"]["run"](1)
    steps_per_round = max(
        steps_per_round, math.ceil(MIN_ROUND_S / (time.perf_counter() - t0))
    )
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            c = cands[name]
            t0 = time.perf_counter()
            c["run"](steps_per_round)
            c["times"].append((time.perf_counter() - t0) / steps_per_round)
    n_total = sum(x.size for x in jax.tree.leaves(params))
    return cands, n_total, steps_per_round


def _q(xs, q):
    return float(np.percentile(xs, q))


def bench_inference(cfg, rank, batches, rounds):
    rows = []
    for batch in batches:
        model, params, ids, _, (adapters, base) = build(cfg, rank, batch)
        lp = jlora.combine(adapters, base)
        fwd_base = jax.jit(lambda p, x, m=model: m.apply({"params": p}, x))
        fwd_lora = jax.jit(lambda p, x, m=model: jlora.lora(m.apply)({"params": p}, x))
        for f, p in ((fwd_base, params), (fwd_lora, lp)):
            for _ in range(3):
                _block(f(p, ids))
        times = {"base": [], "lora": []}
        t0 = time.perf_counter()
        _block(fwd_base(params, ids))
        reps = max(5, math.ceil(MIN_ROUND_S / (time.perf_counter() - t0)))
        for _ in range(rounds):
            for name, f, p in (("base", fwd_base, params), ("lora", fwd_lora, lp)):
                t0 = time.perf_counter()
                for _ in range(reps):
                    out = f(p, ids)
                _block(out)
                times[name].append((time.perf_counter() - t0) / reps)
        ratios = [lo / b for lo, b in zip(times["lora"], times["base"])]
        # Merged params must hit the base's compiled executable.
        fwd_base(jlora.merge(lp), ids)
        cache_hit = fwd_base._cache_size() == 1
        assert cache_hit, "merged params missed the base's jit cache"
        rows.append(
            (
                batch,
                statistics.median(times["base"]),
                statistics.median(times["lora"]),
                statistics.median(ratios),
                _q(ratios, 25),
                _q(ratios, 75),
                cache_hit,
            )
        )
    return rows


def _dir_bytes(path):
    return sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
    )


def bench_checkpoint(cfg, rank, rounds):
    """Adapter checkpoint vs full-params checkpoint: bytes on disk, save and load time."""
    import shutil
    import tempfile

    import orbax.checkpoint as ocp

    _, params, _, _, (adapters, base) = build(cfg, rank, 1)
    lp = jlora.combine(adapters, base)
    root = tempfile.mkdtemp(prefix="jlora-bench-")
    times = {
        k: []
        for k in (
            "adapter save",
            "adapter load",
            "peft save",
            "peft load",
            "full save",
            "full load",
        )
    }

    def names(path):  # Dense kernels are [in, out]: PyTorch's [out, in] is the transpose
        return jlora.PeftModule(jlora.default_module_name(path), to_torch=np.transpose)

    sizes = {}
    try:
        for r in range(rounds):
            a_dir, f_dir = os.path.join(root, f"a{r}"), os.path.join(root, f"f{r}")
            p_dir = os.path.join(root, f"p{r}")
            t0 = time.perf_counter()
            jlora.save_peft(p_dir, lp, module_names=names)
            times["peft save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _block(jlora.load_peft(p_dir, params, module_names=names))
            times["peft load"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jlora.save_adapter(a_dir, lp)
            times["adapter save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with ocp.StandardCheckpointer() as c:
                c.save(f_dir, params)
                c.wait_until_finished()
            times["full save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _block(jlora.load_adapter(a_dir, params))
            times["adapter load"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with ocp.StandardCheckpointer() as c:
                _block(c.restore(f_dir, jax.eval_shape(lambda p: p, params)))
            times["full load"].append(time.perf_counter() - t0)
            sizes = {
                "adapter": _dir_bytes(a_dir),
                "peft": _dir_bytes(p_dir),
                "full": _dir_bytes(f_dir),
            }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return sizes, {k: statistics.median(v) for k, v in times.items()}


def bench_merge(n_kernels, dim, rank, rounds):
    """`jit(jlora.merge, donate)` on a big tree vs a memory-bound floor, and peak memory.

    The floor is a donated elementwise pass over the same kernels (each read once and
    written once, as merge must); peak extra memory is output - aliased + temp bytes
    from XLA's memory analysis, with and without donation.
    """
    rng = np.random.default_rng(0)
    host = {
        f"k{i}": rng.standard_normal((dim, dim), dtype=np.float32) for i in range(n_kernels)
    }
    cfg = jlora.LoraConfig(rank, 2 * rank, targets="k")
    template = jlora.init(jax.random.key(0), jax.tree.map(jnp.asarray, host), cfg)
    template = jax.tree.map(np.asarray, template)

    def fresh():
        return jax.tree.map(jnp.asarray, template)

    merge_d = jax.jit(jlora.merge, donate_argnums=0)
    floor_d = jax.jit(lambda t: jax.tree.map(lambda x: x * 2.0, t), donate_argnums=0)
    kernels = {k: v.w for k, v in template.items()}
    stats = {
        "donated": merge_d.lower(fresh()).compile().memory_analysis(),
        "not donated": jax.jit(jlora.merge).lower(fresh()).compile().memory_analysis(),
    }
    # Eager `jlora.merge` runs one compiled computation per kernel: its peak extra
    # memory is the largest kernel's output plus that computation's temporaries.
    lw = template["k0"]
    one = (
        jlora._merge.merge_kernel.lower(
            jnp.asarray(lw.w),
            jnp.asarray(lw.a),
            jnp.asarray(lw.b),
            layout=lw.layout,
            scale=lw.scale,
        )
        .compile()
        .memory_analysis()
    )
    stats["eager (per kernel)"] = one
    _block(merge_d(fresh()))
    _block(floor_d(jax.tree.map(jnp.asarray, kernels)))
    _block(jlora.merge(fresh()))
    t_merge, t_floor, t_eager = [], [], []
    for _ in range(rounds):
        args = _block(fresh())  # host-to-device copies are async: finish them first
        t0 = time.perf_counter()
        _block(merge_d(args))
        t_merge.append(time.perf_counter() - t0)
        args = _block(jax.tree.map(jnp.asarray, kernels))
        t0 = time.perf_counter()
        _block(floor_d(args))
        t_floor.append(time.perf_counter() - t0)
        args = _block(fresh())
        t0 = time.perf_counter()
        _block(jlora.merge(args))
        t_eager.append(time.perf_counter() - t0)
        del args
    total = n_kernels * dim * dim * 4
    largest_product = dim * dim * 4
    return {
        "bytes": total,
        "merge_s": statistics.median(t_merge),
        "floor_s": statistics.median(t_floor),
        "eager_s": statistics.median(t_eager),
        "largest_product": largest_product,
        "extra": {
            k: m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
            for k, m in stats.items()
        },
    }


def device_line():
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    return (
        f"{d.platform} ({kind}), {len(jax.devices())} device(s), jax {jax.__version__}, "
        f"{os.cpu_count()} host cores, {platform.machine()}"
    )


def _ratio_line(label, num, den):
    r = [a / b for a, b in zip(num, den)]
    med, q1, q3 = statistics.median(r), _q(r, 25), _q(r, 75)
    return f"{label}: median {med:.3f} (IQR {q1:.3f}–{q3:.3f})"


def train_table(args, cfg, cands, n_total, steps):
    """The training-step table of one model, and the ratios the targets are about."""
    full = cands["full"]["times"]
    lines = [
        f"Model: GPT {cfg.layers} x {cfg.d}, {cfg.heads} heads, seq {cfg.seq}, batch "
        f"{args.batch}, vocab {cfg.vocab}, {jnp.dtype(cfg.dtype).name}, {n_total:,} "
        f"parameters; LoRA r={args.rank} on query and value; AdamW. {args.rounds} "
        f"alternated rounds of {steps} steps (rounds of >= {MIN_ROUND_S} s) after "
        "warm-up.",
        "",
        "| candidate | step ms (median) | ratio to full (median of per-round ratios) "
        "| ratio IQR | trace+compile s | compile ratio | temp MiB | trainable params "
        "| optimizer-state bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in cands.items():
        ratios = [t / f for t, f in zip(c["times"], full)]
        iqr = f"{_q(ratios, 25):.3f}–{_q(ratios, 75):.3f}"
        share = 100 * c["n_train"] / n_total
        if c["compile_s"] is None:  # PyTorch: eager, no XLA memory analysis
            compile_cols = "n/a | n/a | n/a"
        else:
            compile_cols = (
                f"{c['compile_s']:.2f} | {c['compile_s'] / cands['full']['compile_s']:.2f}"
                f" | {c['temp'] / 2**20:.1f}"
            )
        lines.append(
            f"| {name} | {1e3 * statistics.median(c['times']):.1f} | "
            f"{statistics.median(ratios):.3f} | {iqr} | {compile_cols} | "
            f"{c['n_train']:,} ({share:.3f}%) | {c['opt_bytes']:,} |"
        )
    jl = cands["jlora"]["times"]
    lines += [
        "",
        _ratio_line("jlora / hand-written", jl, cands["hand-written"]["times"])
        + "; "
        + _ratio_line("jlora / floor", jl, cands["floor"]["times"])
        + ".",
    ]
    if "pytorch+peft" in cands:
        import peft
        import torch

        c = cands["pytorch+peft"]
        lines += [
            "",
            _ratio_line(
                f"PyTorch {torch.__version__} + PEFT {peft.__version__} on "
                f"{c['device']} ({c['threads']} intra-op threads) step / jlora step",
                c["times"],
                jl,
            )
            + "; the PyTorch model is the same architecture, LoRA config, AdamW and "
            "token ids (benchmarks/torch_peft.py), run eagerly.",
        ]
    return lines


def render(args, main, inf_rows, ckpt=None, merge_row=None, large=None):
    """`main` and `large`: `(cfg, cands, n_total, steps_per_round)` of a model."""
    cfg, cands, n_total, _ = main
    lines = [f"Device: {device_line()}.", "", *train_table(args, *main)]
    if large is not None:
        lines += ["", "Larger model:", "", *train_table(args, *large)]
    lines += [
        "",
        f"Inference, GPT {cfg.layers} x {cfg.d} (median of {args.rounds} alternated "
        "rounds):",
        "",
        "| inference batch | base ms | unmerged LoRA ms | LoRA / base (median) | IQR "
        "| merged params hit base's jit cache |",
        "|---|---|---|---|---|---|",
    ]
    for batch, b, lo, r, q1, q3, hit in inf_rows:
        lines.append(
            f"| {batch} | {1e3 * b:.1f} | {1e3 * lo:.1f} | {r:.3f} | "
            f"{q1:.3f}–{q3:.3f} | {'yes' if hit else 'NO'} |"
        )
    if merge_row is not None:
        m = merge_row
        lines += [
            "",
            f"`jax.jit(jlora.merge, donate_argnums=0)` on {m['bytes'] / 2**30:.2f} GiB of "
            f"float32 kernels (r={args.rank}): {m['merge_s']:.3f} s; memory-bound floor "
            f"(a donated elementwise pass, same bytes read and written) "
            f"{m['floor_s']:.3f} s = {2 * m['bytes'] / m['floor_s'] / 1e9:.1f} GB/s; "
            f"merge / floor {m['merge_s'] / m['floor_s']:.2f}. Peak extra memory "
            f"(output − aliased + temp, XLA memory analysis): donated "
            f"{m['extra']['donated'] / 2**20:.1f} MiB, not donated "
            f"{m['extra']['not donated'] / 2**20:.1f} MiB; the largest kernel's "
            f"float32 product is {m['largest_product'] / 2**20:.1f} MiB.",
            "",
            f"Eager `jlora.merge(params)` (the serving line; not donated, so the "
            f"merged kernels are new arrays): {m['eager_s']:.3f} s, one compiled "
            f"computation per kernel; peak extra memory beyond the merged outputs is "
            f"that computation's temporaries, "
            f"{m['extra']['eager (per kernel)'] / 2**20 - m['largest_product'] / 2**20:.1f}"
            f" MiB (XLA memory analysis; the kernel itself is "
            f"{m['largest_product'] / 2**20:.1f} MiB).",
        ]
    if ckpt is not None:
        sizes, t = ckpt
        lines += [
            "",
            "| checkpoint (orbax, medians) | bytes on disk | save s | load s |",
            "|---|---|---|---|",
            f"| adapters (`jlora.save_adapter` / `load_adapter`) | {sizes['adapter']:,} | "
            f"{t['adapter save']:.3f} | {t['adapter load']:.3f} |",
            f"| adapters as PEFT (`jlora.save_peft` / `load_peft`, safetensors) | "
            f"{sizes['peft']:,} | {t['peft save']:.3f} | {t['peft load']:.3f} |",
            f"| full params (`StandardCheckpointer`) | {sizes['full']:,} | "
            f"{t['full save']:.3f} | {t['full load']:.3f} |",
            "",
            f"Adapter checkpoint / full checkpoint: {sizes['adapter'] / sizes['full']:.4f} "
            f"of the bytes (trainable fraction {cands['jlora']['n_train'] / n_total:.4f}).",
        ]
    return "\n".join(lines)


def write_section(text, tag, command):
    path = ROOT / "docs" / "benchmarks.md"
    body = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"<!-- {tag} -->\nCommand: `{command}`\n\n{text}\n<!-- /{tag} -->"
    pattern = re.compile(rf"<!-- {tag} -->.*?<!-- /{tag} -->", re.S)
    body = (
        pattern.sub(lambda _: block, body)
        if pattern.search(body)
        else (body.rstrip() + "\n\n" + block + "\n")
    )
    path.write_text(body)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model, few rounds")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="steps per round and candidate")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--no-large", action="store_true", help="skip the larger model")
    p.add_argument(
        "--no-torch", action="store_true", help="skip PyTorch + PEFT even if installed"
    )
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    if args.quick:
        cfg = GPTConfig(vocab=512, d=64, heads=4, layers=1, seq=32, dtype=dtype)
        large_cfg = GPTConfig(vocab=512, d=96, heads=4, layers=3, seq=32, dtype=dtype)
        args.rounds, args.steps = min(args.rounds, 3), 1
    else:
        cfg = GPTConfig(dtype=dtype)
        large_cfg = GPTConfig(d=768, heads=12, layers=12, dtype=dtype)
    torch = not args.no_torch and torch_peft.available()
    with jax.numpy_dtype_promotion("standard"):
        cands, n_total, steps = bench_train(
            cfg, args.rank, args.batch, args.rounds, args.steps, torch
        )
        main_row = (cfg, cands, n_total, steps)
        large = None
        if not args.no_large:
            # One step per round: a step of the larger model takes seconds on a CPU.
            # --quick, a smoke run, times the candidates the targets name.
            only = ("full", "jlora", "hand-written", "floor") if args.quick else None
            large = (
                large_cfg,
                *bench_train(large_cfg, args.rank, args.batch, args.rounds, 1, torch, only),
            )
        inf_rows = bench_inference(cfg, args.rank, (1, args.batch), args.rounds)
        ckpt = bench_checkpoint(cfg, args.rank, 3)
        # >= 1 GiB of kernels in the full run; 16 MiB in --quick.
        merge_row = (
            bench_merge(4, 1024, args.rank, 3)
            if args.quick
            else bench_merge(16, 4096, args.rank, 3)
        )
    text = render(args, main_row, inf_rows, ckpt, merge_row, large)
    print(text)
    if not args.no_write:
        tag = f"{jax.devices()[0].platform}-{args.dtype}" + ("-quick" if args.quick else "")
        command = "python benchmarks/run.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        write_section(text, tag, command.strip())
    return {
        "cands": cands,
        "large": None if large is None else large[1],
        "inference": inf_rows,
        "checkpoint": ckpt,
        "merge": merge_row,
    }


if __name__ == "__main__":
    main()
