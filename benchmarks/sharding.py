"""Per-device memory of sharded LoRA training: FSDP over 8 devices vs replicated.

    python benchmarks/sharding.py

Runs examples/sharded_training.py's steps (8 simulated CPU devices where no
accelerators are present) and writes the compiled steps' memory analysis into
docs/benchmarks.md. Step time on simulated devices of one CPU is no speed claim, so
only bytes are reported.
"""

import os
import pathlib
import sys

# 8 simulated devices on a CPU-only machine; must be set before jax is imported.
_flags = os.environ.get("XLA_FLAGS", "")
if "host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
import run  # noqa: E402
import sharded_training  # noqa: E402


def main():
    rep, fsdp, mem = sharded_training.main([])
    cfg = "GPT 2 x 256, 4 heads, seq 64, batch 8, vocab 1024, float32; LoRA r=8 on q, v"
    lines = [
        f"Device: {run.device_line()}. Model: {cfg}; AdamW, lean route.",
        "",
        "| layout | per-device argument bytes (params + adapters + optimizer state + batch)"
        " | per-device temp bytes |",
        "|---|---|---|",
    ]
    for name, m in mem.items():
        lines.append(
            f"| {name} | {m.argument_size_in_bytes:,} | {m.temp_size_in_bytes:,} |"
        )
    gap = max(abs(a - b) for a, b in zip(rep, fsdp))
    lines += ["", f"Losses over {len(rep)} steps agree to {gap:.1e} (replicated vs FSDP)."]
    text = "\n".join(lines)
    print(text)
    run.write_section(text, "sharding-memory", "python benchmarks/sharding.py")


if __name__ == "__main__":
    main()
