"""Smoke tests: each example runs end to end and reaches its stated result."""

import importlib.util
import pathlib

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_lora_fixes_the_shifted_task_and_merge_agrees():
    with jax.numpy_dtype_promotion("standard"):  # optax's adam is not strict-clean
        base_loss, lora_loss, gap = _load("quickstart").main([])
    assert lora_loss < 0.5 * base_loss
    assert gap <= 1e-4
