"""Test setup: 8 fake CPU devices and strict dtype promotion for every test."""

import os

# 8 simulated CPU devices for the sharding tests. The tests check values, HLO and buffer
# sizes, not speed: XLA's CPU backend compiles without LLVM optimizations (about 40%
# less compile time, which is most of the suite's time; numerics stay IEEE float32).
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
# Oracle comparisons need true float32 products; GPUs default to TF32 for float32 dots.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key():
    return jax.random.key(0)


# Path strings: jlora now names paths with `jax.tree_util.keystr(keys, simple=True,
# separator="/")`. They are stored in checkpoint metadata, so every path the suite
# produces is also computed the way jlora 0.1 did, and any difference fails the run.
def _legacy_path_string(keys) -> str:
    def key_str(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return "/".join(key_str(k) for k in keys)


_PATHS_SEEN: set = set()
_PATHS_DIFFERENT: list = []


def _record_paths():
    from jlora import _targets

    original = _targets.path_string

    def recording(keys):
        got = original(keys)
        legacy = _legacy_path_string(keys)
        _PATHS_SEEN.add(got)
        if got != legacy:
            _PATHS_DIFFERENT.append((got, legacy))
        return got

    _targets.path_string = recording


_record_paths()


@pytest.fixture(autouse=True)
def _path_strings_as_in_jlora_01():
    """Fails the test in which a path string differs from jlora 0.1's (per test, so
    that it holds in every worker process of a parallel run)."""
    before = len(_PATHS_DIFFERENT)
    yield
    new = _PATHS_DIFFERENT[before:]
    assert not new, f"path strings differ from jlora 0.1's: {new[:10]}"


def pytest_terminal_summary(terminalreporter):
    if _PATHS_SEEN:  # (a parallel run's controller runs no test; its workers check)
        terminalreporter.write_line(
            f"path strings: {len(_PATHS_SEEN)} distinct paths, "
            f"{len(_PATHS_DIFFERENT)} different from jlora 0.1's"
        )
