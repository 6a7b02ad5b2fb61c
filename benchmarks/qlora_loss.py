"""Held-out loss of the main job's LoRA on float32, int8 and NF4 bases, over seeds.

    python benchmarks/qlora_loss.py              # 8 seeds, the embedded base
    python benchmarks/qlora_loss.py --quick      # a tiny base, 1 seed, float and NF4

Runs the main job (`examples/alpaca.py` with its defaults on the embedded base) once
per seed and base, each base with the same seeds. The seed draws the held-out split,
the factors' start and the batches, so the runs of one seed differ only in the base.
The frozen base is the same pretrained model each time; `--quantize` stores its kernels
as int8 or NF4 (double quantization) and the LoRA factors train on top.

Reported per base: the held-out loss after training (mean over seeds, and the range),
the exactly-right answers, and the ratio to the float run of the same seed (geometric
mean, and the range). QLoRA's goal, NF4 within 5% of float, is judged on the mean
losses; the per-seed spread says how far one run can be trusted. Written to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import pathlib
import statistics
import sys
import tempfile

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from run import write_section  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASES = ("float", "int8", "nf4")
QUICK = (
    *("--base-steps", "3", "--base-width", "64", "--base-layers", "1"),
    *("--base-docs", "300", "--steps", "2", "--batch-size", "4"),
    *("--val-set-size", "4", "--score-records", "2", "--max-new-tokens", "2"),
)


def _main_job():
    spec = importlib.util.spec_from_file_location("alpaca", ROOT / "examples" / "alpaca.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run(seeds, bases, extra=(), cache_dir=None, log=print) -> dict:
    """`{base: [(seed, held-out loss, exactly right), ...]}`, one main-job run each."""
    main = _main_job()
    out = {b: [] for b in bases}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for base in bases:
                argv = [
                    *("--output-dir", f"{tmp}/{base}-{seed}", "--fresh"),
                    *("--seed", str(seed), "--num-examples", "0", *extra),
                ]
                if cache_dir is not None:
                    argv += ["--cache-dir", str(cache_dir)]
                if base != "float":
                    argv += ["--quantize", base]
                with jax.numpy_dtype_promotion("standard"):
                    got = main(argv, log=lambda line: None)
                loss, exact = got["val_loss_after"], got["score_after"]["exact"]
                out[base].append((seed, loss, exact))
                log(f"seed {seed} {base}: held-out loss {loss:.4f}, exact {exact:.0%}")
    return out


def table(results: dict) -> tuple[str, dict]:
    """The Markdown table and `{base: {"mean", "ratio"}}` (ratio: the geometric mean of
    the per-seed ratios to float)."""
    floats = {s: loss for s, loss, _ in results["float"]}
    lines = [
        "| base | held-out loss, mean | range over seeds | exactly right, mean | "
        "/ float, per seed (geometric mean) | range | mean / float mean |",
        "|---|---|---|---|---|---|---|",
    ]
    stats = {}
    for base, rows in results.items():
        losses = [loss for _, loss, _ in rows]
        ratios = [loss / floats[s] for s, loss, _ in rows]
        mean = statistics.fmean(losses)
        geo = math.exp(statistics.fmean(math.log(r) for r in ratios))
        stats[base] = {"mean": mean, "ratio": geo}
        exact = statistics.fmean(e for _, _, e in rows)
        lines.append(
            f"| {base} | {mean:.4f} | {min(losses):.4f}–{max(losses):.4f} | "
            f"{exact:.1%} | {geo:.2f} | {min(ratios):.2f}–{max(ratios):.2f} | "
            f"{mean / stats['float']['mean']:.2f} |"
        )
    return "\n".join(lines), stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--bases", default=",".join(BASES), help="float, int8, nf4")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    bases = [b.strip() for b in args.bases.split(",")]
    unknown = sorted(set(bases) - set(BASES))
    if unknown or "float" not in bases:
        p.error(f"--bases: {unknown or bases}; choose from {BASES}, float among them")
    bases = ["float"] + [b for b in bases if b != "float"]
    if args.quick:
        with tempfile.TemporaryDirectory() as cache:
            results = run(range(1), ["float", "nf4"], QUICK, cache_dir=cache)
    else:
        results = run(range(args.seeds), bases)
    text, stats = table(results)
    text = (
        f"The main job (embedded base, its defaults: r=8 on the attention kernels, 600 "
        f"steps) for seeds 0–{len(results['float']) - 1}; "
        f"{jax.devices()[0].platform}, jax {jax.__version__}\n\n{text}"
    )
    print(text)
    if not args.no_write and not args.quick:
        write_section(text, "qlora-loss", "python benchmarks/qlora_loss.py")
    return results, stats


if __name__ == "__main__":
    main(sys.argv[1:])
