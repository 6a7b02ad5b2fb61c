"""Trace and compile time of the benchmark steps, this tree against another revision.

    python benchmarks/trace_compile.py --against REV [--rounds 5] [--layers 4]

`jlora.lora` runs at trace time, so a change to the interpreter shows up in how long
the jitted steps take to trace, lower and compile, not in step time. This checks out
REV in a temporary git worktree and runs the same measurement with each jlora in
fresh processes, alternating (old, new, old, new, ...), after a warm-up process each.
Each process times, for the benchmark GPT (4 x 512, LoRA r=8 on q and v, AdamW):
the lean-route training step, the whole-tree step with `jlora.optimizer`, and
unmerged inference; for each, `jax.jit(f).trace(...)` (Python tracing, including the
interpreter), `.lower()` and `.compile()`, each the median of a few fresh jit objects.
Reports medians over rounds and new/old ratios, and writes docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = ("lean step", "whole-tree step", "inference")
PHASES = ("trace", "lower", "compile")


def child(repeats: int, layers: int = 4) -> dict:
    """Runs in a fresh process whose `jlora` is the one under test."""
    sys.path.insert(0, str(HERE))
    import jax
    import optax
    from gpt import GPT, GPTConfig, next_token_loss

    import jlora

    cfg = GPTConfig(layers=layers)  # the benchmark's 512-wide model
    ids = jax.random.randint(jax.random.key(0), (8, cfg.seq), 0, cfg.vocab)
    model = GPT(cfg)
    params = model.init(jax.random.key(1), ids)["params"]
    lcfg = jlora.LoraConfig(8, 16, targets=r"(query|value)/kernel$")
    lp = jlora.init(jax.random.key(2), params, lcfg)
    adapters, base = jlora.split(lp)
    tx = optax.adamw(1e-4)
    apply = jlora.lora(model.apply)

    def lean(adapters, opt_state, base, ids):
        def loss(ad):
            return next_token_loss(apply({"params": jlora.combine(ad, base)}, ids), ids)

        value, grads = jax.value_and_grad(loss)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, value

    whole_tx = jlora.optimizer(tx)

    def whole(params, opt_state, ids):
        def loss(p):
            return next_token_loss(apply({"params": p}, ids), ids)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = whole_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    def infer(params, ids):
        return apply({"params": params}, ids)

    cases = {
        "lean step": (lean, (adapters, tx.init(adapters), base, ids)),
        "whole-tree step": (whole, (lp, whole_tx.init(lp), ids)),
        "inference": (infer, (lp, ids)),
    }
    out = {}
    with jax.numpy_dtype_promotion("standard"):  # optax's adamw
        for name, (fn, args) in cases.items():
            times = {p: [] for p in PHASES}
            for _ in range(repeats):
                # A fresh function and jit object: JAX caches traces by function.
                jitted = jax.jit(lambda *a, fn=fn: fn(*a))
                t0 = time.perf_counter()
                traced = jitted.trace(*args)
                t1 = time.perf_counter()
                lowered = traced.lower()
                t2 = time.perf_counter()
                lowered.compile()
                t3 = time.perf_counter()
                times["trace"].append(t1 - t0)
                times["lower"].append(t2 - t1)
                times["compile"].append(t3 - t2)
            out[name] = {p: statistics.median(v) for p, v in times.items()}
    out["jlora"] = str(pathlib.Path(jlora.__file__).resolve().parent)
    return out


def run_child(path: str, repeats: int, layers: int = 4) -> dict:
    env = {**os.environ, "PYTHONPATH": path + os.pathsep + os.environ.get("PYTHONPATH", "")}
    got = subprocess.run(
        [sys.executable, __file__, "--child", "--repeats", str(repeats), "--layers",
         str(layers)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result = json.loads(got.stdout.strip().splitlines()[-1])
    assert result["jlora"] == str(pathlib.Path(path, "jlora").resolve()), result["jlora"]
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", help="git revision to compare with")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="jit objects per process")
    p.add_argument("--layers", type=int, default=4, help="GPT layers (default 4)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.repeats, args.layers)))
        return None
    if not args.against:
        p.error("--against REV is required")
    rev = subprocess.run(
        ["git", "rev-parse", "--short", args.against],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        old = os.path.join(tmp, "old")
        subprocess.run(
            ["git", "worktree", "add", "--detach", old, args.against],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        try:
            trees = {"old": old, "new": str(ROOT)}
            for path in trees.values():  # warm-up: imports, disk caches
                run_child(path, 1, args.layers)
            rounds = {k: [] for k in trees}
            for _ in range(args.rounds):
                for k, path in trees.items():
                    rounds[k].append(run_child(path, args.repeats, args.layers))
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", old], cwd=ROOT, check=False
            )
    import jax

    lines = [
        f"jax {jax.__version__}, {os.cpu_count()} host cores; old = {rev}, new = this "
        f"tree; {args.rounds} alternated rounds of fresh processes, each the median of "
        f"{args.repeats} fresh jit objects. GPT {args.layers} x 512, LoRA r=8 on q, v.",
        "",
        "| step | phase | old s (median) | new s (median) | new / old (median of rounds) |",
        "|---|---|---|---|---|",
    ]
    for step in STEPS:
        for phase in PHASES:
            o = [r[step][phase] for r in rounds["old"]]
            n = [r[step][phase] for r in rounds["new"]]
            ratio = statistics.median(b / a for a, b in zip(o, n))
            lines.append(
                f"| {step} | {phase} | {statistics.median(o):.3f} | "
                f"{statistics.median(n):.3f} | {ratio:.3f} |"
            )
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        sys.path.insert(0, str(HERE))
        import run

        run.write_section(
            text,
            "trace-compile",
            f"python benchmarks/trace_compile.py --against {rev} --layers {args.layers}",
        )
    return rounds


if __name__ == "__main__":
    main()
