"""What an eager `jlora.lora(fn)(params, x)` costs, against `jax.jit` and plain eager.

    python benchmarks/eager.py [--d 256 --layers 4 --batch 32 --repeats 7]

For three small models (an MLP, the same layers under `lax.scan`, and each layer under
`lax.cond`), each with LoRA r=8 on every kernel, times in one process, candidates
alternating within each repeat after a warm-up round:

- call 1: the first eager call of a signature (trace, interpretation and compilation;
  the eager cache is emptied before it);
- call 10: the tenth eager call of the same signature;
- traced path: an eager call that bypasses the cache (each call traces and interprets
  the jaxpr, the way eager calls ran before the cache);
- jit: a call of `jax.jit(jlora.lora(fn))`, compiled beforehand;
- plain eager: `fn(jlora.merge(params), x)` on the merged params, op by op.

Call 10 and jit are timed at their tenth call in the repeat (the nine before it waited
for); the traced path and plain eager, which repeat the same work on every call (plain
JAX compiles an eager `scan` or `cond` of a new closure each call), at their third.

Reports medians over repeats (each call timed to `block_until_ready`) and the ratio of
call 10 to jit and to plain eager, and writes the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jlora
from jlora import _transform

COLUMNS = ("call 1", "call 10", "traced path", "jit", "plain eager")


def models(d: int, layers: int):
    """`{name: (fn, params)}` for the three models, plain (unadapted) params."""
    keys = jax.random.split(jax.random.key(0), layers)
    ws = jnp.stack([jax.random.normal(k, (d, d)) / d**0.5 for k in keys])
    per_layer = {f"l{i}": {"kernel": ws[i]} for i in range(layers)}

    def mlp(p, x):
        for i in range(layers):
            x = jnp.tanh(x @ p[f"l{i}"]["kernel"])
        return x

    def scan(p, x):
        def layer(h, w):
            return jnp.tanh(h @ w), None

        return jax.lax.scan(layer, x, p["ws"])[0]

    def cond(p, x):
        for i in range(layers):
            w = p[f"l{i}"]["kernel"]
            x = jax.lax.cond(
                x.sum() > 0,
                lambda h, w=w: jnp.tanh(h @ w),
                lambda h, w=w: -jnp.tanh(h @ w),
                x,
            )
        return x

    return {
        "mlp": (mlp, per_layer, None),
        "scan": (scan, {"ws": ws}, {"ws": jlora.Layout((1,), (2,), (0,))}),
        "cond": (cond, per_layer, None),
    }


@contextlib.contextmanager
def traced_path():
    """Eager calls without the cache: each one traces and interprets again."""
    saved = _transform._eager_call
    _transform._eager_call = lambda *args, **kwargs: None
    try:
        yield
    finally:
        _transform._eager_call = saved


def _time(f) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    return time.perf_counter() - t0


def _tenth(f, done: int = 0) -> float:
    """The time of the 10th call of `f` (`done` calls already made), each call waited
    for, so that every candidate is timed in the same state."""
    for _ in range(9 - done):
        jax.block_until_ready(f())
    return _time(f)


def measure(d: int = 256, layers: int = 4, batch: int = 32, repeats: int = 7):
    """Times every candidate on every model.

    Returns:
      `(rows, table)`: per model a dict of median seconds per column, the ratios and
      `traces` (how often `fn` was traced over the 10 cached eager calls of the last
      repeat); `table` is the markdown table.
    """
    x = jax.random.normal(jax.random.key(1), (batch, d))
    rows = []
    for name, (fn, params, layout) in models(d, layers).items():
        cfg = jlora.LoraConfig(8, 16, targets=r"kernel$|ws$", layout=layout)
        lp = jlora.init(jax.random.key(2), params, cfg)
        times, traces = _candidates(fn, lp, x, repeats)
        row = {"model": name, "traces": traces}
        row.update({c: statistics.median(v) for c, v in times.items()})
        row["call 10 / jit"] = row["call 10"] / row["jit"]
        row["call 10 / plain eager"] = row["call 10"] / row["plain eager"]
        row["traced path / plain eager"] = row["traced path"] / row["plain eager"]
        rows.append(row)
    return rows, table(rows)


def _candidates(fn, lp, x, repeats: int):
    """`({column: [seconds per repeat]}, traces in the last repeat's 10 eager calls)`."""
    merged = jlora.merge(lp)
    traces = [0]

    def counted(p, x):
        traces[0] += 1
        return fn(p, x)

    eager = jlora.lora(counted)
    jitted = jax.jit(jlora.lora(fn))
    times = {c: [] for c in COLUMNS}
    for r in range(repeats + 1):  # round 0 is the warm-up
        _transform._EAGER.clear()  # call 1 of a signature
        traces[0] = 0
        got = {"call 1": _time(lambda: eager(lp, x))}
        got["call 10"] = _tenth(lambda: eager(lp, x), done=1)
        n = traces[0]
        with traced_path():  # (every call repeats the same work: the 3rd call)
            got["traced path"] = _tenth(lambda: eager(lp, x), done=7)
        got["jit"] = _tenth(lambda: jitted(lp, x))
        got["plain eager"] = _tenth(lambda: fn(merged, x), done=7)
        if r:
            for c in COLUMNS:
                times[c].append(got[c])
    return times, n


def table(rows) -> str:
    head = ["model", *(f"{c} ms" for c in COLUMNS)]
    head += ["call 10 / jit", "call 10 / plain eager", "traced path / plain eager"]
    head += ["traces in 10 calls"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], *(f"{1e3 * r[c]:.2f}" for c in COLUMNS)]
        cells += [
            f"{r['call 10 / jit']:.3g}",
            f"{r['call 10 / plain eager']:.3g}",
            f"{r['traced path / plain eager']:.3g}",
            str(r["traces"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    rows, text = measure(args.d, args.layers, args.batch, args.repeats)
    dev = jax.devices()[0]
    intro = (
        f"Device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}, "
        f"{os.cpu_count()} host cores. Models: {args.layers} layers of {args.d} x "
        f"{args.d}, batch {args.batch}, float32, LoRA r=8 on every kernel; medians of "
        f"{args.repeats} alternated repeats after a warm-up repeat."
    )
    text = intro + "\n\n" + text
    print(text)
    if not args.no_write:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import run

        command = "python benchmarks/eager.py" + "".join(
            f" --{k} {getattr(args, k)}"
            for k in ("d", "layers", "batch", "repeats")
            if getattr(args, k) != p.get_default(k)
        )
        run.write_section(text, "eager", command)
    return rows


if __name__ == "__main__":
    main()
