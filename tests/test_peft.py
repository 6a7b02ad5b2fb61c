"""Hugging Face PEFT adapter directories: `jlora.save_peft` / `jlora.load_peft`.

The oracle is PEFT itself where PyTorch, PEFT and transformers are installed (the
`[torch]` extra; `.ci/run` installs it): adapters exported from JAX give PEFT's model
the logits `jlora.lora` computes, and adapters made by PEFT give jlora PEFT's logits.
Without them, the rules that need no PyTorch are checked against `jlora.merge`: the
file's `scale * B @ A`, read as PyTorch reads it, is the merged kernel's change.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import assert_close, chain_bound, randomize_torch

import jlora
from jlora import _safetensors
from jlora._targets import LORA, walk

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from instruct import gpt2, llama  # noqa: E402
from instruct import model as gpt_model  # noqa: E402

HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "peft", "transformers"))
needs_torch = pytest.mark.skipif(
    not HAVE_TORCH, reason="needs the [torch] extra (torch, peft, transformers)"
)


def randomize(params, key, scale=0.1):
    """Non-zero `a` and `b` everywhere (a fresh `b` is zero, which hides a wrong B)."""
    w = walk(params)
    out = []
    for i, n in enumerate(w.nodes):
        if n.kind == LORA:
            lw = n.value
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            out.append(
                lw.replace(
                    a=(jax.random.normal(ka, lw.a.shape) * scale).astype(lw.a.dtype),
                    b=(jax.random.normal(kb, lw.b.shape) * scale).astype(lw.b.dtype),
                )
            )
        else:
            out.append(n.leaf)
    return w.rebuild(out)


def files_of(path):
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "adapter_model.safetensors"), "rb") as f:
        return cfg, f.read()


def write_peft(path, cfg: dict, tensors: dict):
    os.makedirs(path)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    _safetensors.save(os.path.join(path, "adapter_model.safetensors"), tensors)


def torch_delta(path, module):
    """`scale * B @ A` of one module, as PEFT computes it from the directory."""
    cfg, _ = files_of(path)
    tensors, _ = _safetensors.load(os.path.join(path, "adapter_model.safetensors"))
    a = tensors[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
    b = tensors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
    r = cfg["rank_pattern"].get(module, cfg["r"])
    alpha = cfg["alpha_pattern"].get(module, cfg["lora_alpha"])
    scale = alpha / np.sqrt(r) if cfg["use_rslora"] else alpha / r
    return scale * b @ a


# Without PyTorch -------------------------------------------------------------------------


def test_safetensors_files_round_trip_every_dtype_and_match_the_reference_reader(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "b": rng.normal(size=(3, 5)).astype(np.float32),
        "a": rng.normal(size=(7,)).astype(np.float16),
        "c": rng.normal(size=(2, 2, 2)).astype(ml_dtypes.bfloat16),
        "d": np.arange(6, dtype=np.int64).reshape(2, 3),
    }
    file = str(tmp_path / "t.safetensors")
    _safetensors.save(file, tensors, {"format": "pt"})
    back, meta = _safetensors.load(file)
    assert meta == {"format": "pt"}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    plain = {k: v for k, v in tensors.items() if k != "c"}  # the reader lacks bfloat16
    safetensors_numpy.save_file(plain, str(tmp_path / "ref.safetensors"))
    theirs, _ = _safetensors.load(str(tmp_path / "ref.safetensors"))
    for k, v in plain.items():
        assert np.array_equal(theirs[k], v), k
    with open(file, "r+b") as f:  # a byte range past the end is refused, not read
        f.truncate(os.path.getsize(file) - 4)
    with pytest.raises(ValueError, match="byte range"):
        _safetensors.load(file)


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Embed(11, 8, name="embed")(x)
        x = nn.Dense(8, name="square")(x)
        x = nn.Dense(6, name="wide")(x)
        x = nn.DenseGeneral((2, 3), name="heads")(x)  # kernel [6, 2, 3]
        return nn.Dense(5, name="head")(x.reshape(*x.shape[:-2], 6))


@pytest.fixture(scope="module")
def tiny():
    model = Tiny()
    x = jnp.arange(12).reshape(2, 6) % 11
    params = model.init(jax.random.key(0), x)["params"]
    probe = lambda p: model.apply({"params": p}, x)  # noqa: E731
    return model, params, x, probe


def test_export_is_the_merged_change_in_pytorch_orientation(tiny, tmp_path):
    model, params, x, probe = tiny
    cfg = jlora.LoraConfig(
        2,
        4.0,
        targets=r"(embed/embedding|square/kernel|wide/kernel|heads/kernel)$",
        rank_pattern={"wide": 3},
        alpha_pattern={"heads": 1.5},
        also_train=r"head/kernel$",
    )
    lp = randomize(
        jlora.init(jax.random.key(1), params, cfg, probe=probe), jax.random.key(2)
    )
    out = jlora.save_peft(tmp_path / "ad", lp, cfg)
    pcfg, _ = files_of(out)
    assert pcfg["target_modules"] == ["embed", "heads", "square", "wide"]
    assert pcfg["rank_pattern"] == {"wide": 3} and pcfg["alpha_pattern"] == {"heads": 1.5}
    assert pcfg["modules_to_save"] == ["head"] and pcfg["r"] == 2
    merged = jlora.merge(lp)
    for module, leaf, to_torch in (
        ("square", "kernel", lambda k: k.T),
        ("wide", "kernel", lambda k: k.T),
        ("heads", "kernel", lambda k: k.reshape(6, 6).T),  # outputs (2, 3) flattened
    ):
        # The merged kernel is rounded at its own magnitude: compare base + delta.
        want = to_torch(np.asarray(merged[module][leaf], np.float64))
        base = to_torch(np.asarray(params[module][leaf], np.float64))
        assert_close(base + torch_delta(out, module), want, chain_bound(3, 2))
    tensors, _ = _safetensors.load(os.path.join(out, "adapter_model.safetensors"))
    a = tensors["base_model.model.embed.lora_embedding_A"]  # [r, num_embeddings]
    b = tensors["base_model.model.embed.lora_embedding_B"]  # [dim, r]
    assert a.shape == (2, 11) and b.shape == (8, 2)
    got = np.asarray(params["embed"]["embedding"], np.float64) + 2.0 * (b @ a).T
    assert_close(got, merged["embed"]["embedding"], chain_bound(2, 2))
    head = tensors["base_model.model.head.weight"]  # trained whole, nn.Linear's [out, in]
    assert np.array_equal(head, np.asarray(params["head"]["kernel"]).T)
    # PEFT reads every parameter of a module in modules_to_save: the frozen bias too.
    assert np.array_equal(tensors["base_model.model.head.bias"], params["head"]["bias"])


def test_load_reads_back_exactly_and_resaves_byte_identical(tiny, tmp_path):
    model, params, x, probe = tiny
    cfg = jlora.LoraConfig(2, 4.0, targets=r"(square|wide|heads)/kernel$", use_rslora=True)
    lp = randomize(
        jlora.init(jax.random.key(1), params, cfg, probe=probe), jax.random.key(3)
    )
    jlora.save_peft(tmp_path / "one", lp, cfg)
    back = jlora.load_peft(tmp_path / "one", params, probe=probe)
    for path in ("square", "wide", "heads"):
        want, got = lp[path]["kernel"], back[path]["kernel"]
        assert np.array_equal(got.a, want.a) and np.array_equal(got.b, want.b), path
        assert (
            got.scale == pytest.approx(want.scale, rel=1e-15) and got.layout == want.layout
        )
    jlora.save_peft(tmp_path / "two", back, jlora.read_peft_config(tmp_path / "one"))
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")
    assert np.array_equal(
        jlora.lora(model.apply)({"params": back}, x),
        jlora.lora(model.apply)({"params": lp}, x),
    )


def test_factors_keep_their_dtype(tiny, tmp_path):
    _, params, _, probe = tiny
    cfg = jlora.LoraConfig(2, 4.0, targets=r"wide/kernel$", dtype=jnp.bfloat16)
    lp = randomize(jlora.init(jax.random.key(1), params, cfg), jax.random.key(4))
    jlora.save_peft(tmp_path / "bf", lp, cfg)
    tensors, _ = _safetensors.load(str(tmp_path / "bf" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    back = jlora.load_peft(tmp_path / "bf", params)
    assert back["wide"]["kernel"].a.dtype == jnp.bfloat16
    assert np.array_equal(back["wide"]["kernel"].b, lp["wide"]["kernel"].b)


def test_square_kernel_orientation_follows_init_and_errors_list_every_problem(
    tiny, tmp_path
):
    """A square Flax `kernel` is `[in, out]` by Flax's convention (as `jlora.init`
    takes it): no probe needed. A square kernel whose name gives no orientation needs
    the probe, and the error says how to decide."""
    _, params, _, probe = tiny
    cfg = jlora.LoraConfig(2, 4.0, targets=r"(square|wide)/kernel$")
    lp = randomize(jlora.init(jax.random.key(1), params, cfg), jax.random.key(5))
    jlora.save_peft(tmp_path / "sq", lp, cfg)
    plain = jlora.load_peft(tmp_path / "sq", params)
    ok = jlora.load_peft(tmp_path / "sq", params, probe=probe)
    for got in (plain, ok):
        assert got["square"]["kernel"].layout == lp["square"]["kernel"].layout
        assert np.array_equal(got["square"]["kernel"].a, lp["square"]["kernel"].a)
        assert np.array_equal(got["square"]["kernel"].b, lp["square"]["kernel"].b)

    w = jax.random.normal(jax.random.key(3), (8, 8))
    other = {"proj": {"w": w}}  # stored [out, in], as Equinox's Linear.weight

    def other_probe(p):
        return jnp.ones((2, 8)) @ p["proj"]["w"].T

    ocfg = jlora.LoraConfig(2, 4.0, targets="proj/w$")
    olp = randomize(jlora.init(jax.random.key(1), other, ocfg, probe=other_probe),
                    jax.random.key(6))
    assert olp["proj"]["w"].layout == jlora.Layout((1,), (0,))
    jlora.save_peft(tmp_path / "w", olp, ocfg, probe=other_probe)
    with pytest.raises(ValueError, match=r"proj/w: the kernel \[8, 8\] is square.*"
                       r"not given by their names.*probe="):
        jlora.load_peft(tmp_path / "w", other)
    back = jlora.load_peft(tmp_path / "w", other, probe=other_probe)
    assert np.array_equal(back["proj"]["w"].b, olp["proj"]["w"].b)
    renamed = {"wide/kernel": "model.wide", "square/kernel": "model.square"}
    with pytest.raises(ValueError) as e:
        jlora.load_peft(tmp_path / "sq", params, module_names=renamed)
    assert "  square: no leaf of base_params maps" in str(e.value)
    assert "  wide: no leaf of base_params maps" in str(e.value)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jlora.save_peft(tmp_path / "sq", lp, cfg)


def test_trained_bias_of_an_adapted_module_sits_on_its_base_layer(tiny, tmp_path):
    _, params, _, _ = tiny
    cfg = jlora.LoraConfig(2, 4.0, targets=r"wide/kernel$", train_bias="lora_only")
    lp = randomize(jlora.init(jax.random.key(1), params, cfg), jax.random.key(8))
    trained_bias = jnp.arange(6.0)
    lp["wide"]["bias"] = jlora.Trainable(trained_bias)
    jlora.save_peft(tmp_path / "b", lp, cfg)
    pcfg, _ = files_of(tmp_path / "b")
    tensors, _ = _safetensors.load(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert pcfg["bias"] == "lora_only" and pcfg["modules_to_save"] is None
    assert np.array_equal(tensors["base_model.model.wide.base_layer.bias"], trained_bias)
    back = jlora.load_peft(tmp_path / "b", params)
    assert isinstance(back["wide"]["bias"], jlora.Trainable)
    assert np.array_equal(back["wide"]["bias"].value, trained_bias)


def test_lora_b_that_does_not_fit_the_kernel_is_refused(tiny, tmp_path):
    _, params, _, probe = tiny
    tensors = {
        "base_model.model.square.lora_A.weight": np.ones((2, 8), np.float32),
        "base_model.model.square.lora_B.weight": np.ones((6, 2), np.float32),
    }
    write_peft(str(tmp_path / "t"), {"peft_type": "LORA", "r": 2, "lora_alpha": 2}, tensors)
    with pytest.raises(ValueError, match=r"has 8 outputs; the file's lora_B \[6, 2\]"):
        jlora.load_peft(tmp_path / "t", params, probe=probe)


@pytest.mark.parametrize(
    "field, value",
    [
        ("lora_bias", True),
        ("init_lora_weights", "pissa_niter_4"),
        ("init_lora_weights", "olora"),
        ("init_lora_weights", "corda"),
        ("init_lora_weights", "loftq"),
        ("trainable_token_indices", [1, 2]),
        ("target_parameters", ["experts.gate_up_proj"]),
        ("peft_type", "IA3"),
    ],
)
def test_what_jlora_cannot_load_is_refused_by_field(tiny, tmp_path, field, value):
    _, params, _, _ = tiny
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, field: value}
    tensors = {
        "base_model.model.wide.lora_A.weight": np.ones((2, 8), np.float32),
        "base_model.model.wide.lora_B.weight": np.ones((6, 2), np.float32),
    }
    write_peft(str(tmp_path / "x"), cfg, tensors)
    with pytest.raises(ValueError, match=rf"  {field}: "):
        jlora.load_peft(tmp_path / "x", params)


def _embedding_file(emb):
    """The tensors of a PEFT file adapting the tiny model's embedding, carrying its base
    weights `emb` (as PEFT saves them when the embedding is targeted)."""
    return {
        "base_model.model.embed.lora_embedding_A": np.ones((2, 11), np.float32),
        "base_model.model.embed.lora_embedding_B": np.ones((8, 2), np.float32),
        "base_model.model.embed.base_layer.weight": emb,
    }


def test_base_weights_in_the_file_must_equal_the_base(tiny, tmp_path):
    _, params, _, _ = tiny
    emb = np.asarray(params["embed"]["embedding"])
    tensors = _embedding_file(emb)
    write_peft(
        str(tmp_path / "same"), {"peft_type": "LORA", "r": 2, "lora_alpha": 2}, tensors
    )
    lp = jlora.load_peft(tmp_path / "same", params)
    assert lp["embed"]["embedding"].scale == 1.0
    tensors["base_model.model.embed.base_layer.weight"] = emb + 1
    write_peft(
        str(tmp_path / "other"), {"peft_type": "LORA", "r": 2, "lora_alpha": 2}, tensors
    )
    with pytest.raises(ValueError, match="base weights for embed/embedding that differ"):
        jlora.load_peft(tmp_path / "other", params)


def _wide_tensors(dtype=np.float32):
    rng = np.random.default_rng(0)
    return {
        "base_model.model.wide.lora_A.weight": rng.normal(size=(2, 8)).astype(dtype),
        "base_model.model.wide.lora_B.weight": rng.normal(size=(6, 2)).astype(dtype),
    }


@pytest.mark.parametrize(
    "field, value",
    [
        ("lora_alpha", "16"),
        ("lora_alpha", None),
        ("r", "2"),
        ("r", 2.0),
        ("use_rslora", "yes"),
        ("lora_dropout", 1.5),
        ("rank_pattern", {"wide": "2"}),
        ("alpha_pattern", {"wide": None}),
    ],
)
def test_config_fields_of_the_wrong_type_are_refused_by_name(tiny, tmp_path, field, value):
    _, params, _, _ = tiny
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, field: value}
    write_peft(str(tmp_path / "x"), cfg, _wide_tensors())
    with pytest.raises(ValueError, match=rf"  {field}: {re.escape(repr(value))}; expected"):
        jlora.load_peft(tmp_path / "x", params)


def test_integer_factors_are_refused_and_float64_ones_said_to_become_float32(
    tiny, tmp_path
):
    _, params, _, _ = tiny
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    tensors = {k: np.ones(v.shape, np.int32) for k, v in _wide_tensors().items()}
    write_peft(str(tmp_path / "int"), cfg, tensors)
    with pytest.raises(
        ValueError,
        match=r"  wide: base_model.model.wide.lora_A.weight is int32, .*floating",
    ):
        jlora.load_peft(tmp_path / "int", params)
    tensors = _wide_tensors(np.float64)
    write_peft(str(tmp_path / "f64"), cfg, tensors)
    assert not jax.config.jax_enable_x64
    with pytest.warns(UserWarning, match=r"\['wide/kernel'\] are float64.*as float32"):
        lp = jlora.load_peft(tmp_path / "f64", params)
    a = tensors["base_model.model.wide.lora_A.weight"]
    assert lp["wide"]["kernel"].a.dtype == jnp.float32
    assert np.array_equal(lp["wide"]["kernel"].a, a.T.astype(np.float32))


def test_base_weights_in_the_file_are_compared_with_a_cast_base(tiny, tmp_path):
    """A float32 file's base weights against the bfloat16 cast of that base: the same
    weights (compared in bfloat16); another base in bfloat16 is still refused."""
    _, params, _, _ = tiny
    emb = np.asarray(params["embed"]["embedding"])
    tensors = _embedding_file(emb)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2}
    write_peft(str(tmp_path / "f32"), cfg, tensors)
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    lp = jlora.load_peft(tmp_path / "f32", cast)
    assert lp["embed"]["embedding"].w.dtype == jnp.bfloat16
    other = jax.tree.map(lambda x: x, cast)
    other["embed"]["embedding"] = (params["embed"]["embedding"] + 1).astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="base weights for embed/embedding that differ"):
        jlora.load_peft(tmp_path / "f32", other)


def test_to_torch_must_be_a_rearrangement(tiny, tmp_path):
    _, params, _, _ = tiny
    cfg = jlora.LoraConfig(2, 4.0, targets=r"wide/kernel$")
    lp = jlora.init(jax.random.key(1), params, cfg)
    names = {"wide/kernel": jlora.PeftModule("wide", to_torch=lambda k: 2 * k.T)}
    with pytest.raises(ValueError, match="wide/kernel: to_torch does not rearrange"):
        jlora.save_peft(tmp_path / "bad", lp, cfg, module_names=names)
    assert not os.path.exists(tmp_path / "bad")


def test_a_deleted_directory_is_not_resurrected_from_a_leftover(
    tiny, tmp_path, monkeypatch
):
    """PEFT directories are written by the same crash-safe swap as checkpoints: an old
    copy whose removal failed quietly is garbage once the user deletes the directory."""
    import shutil

    from jlora import _atomic

    _, params, _, _ = tiny
    cfg = jlora.LoraConfig(2, 4.0, targets=r"wide/kernel$")
    lp = randomize(jlora.init(jax.random.key(1), params, cfg), jax.random.key(9))
    path = jlora.save_peft(tmp_path / "ad", lp, cfg)
    with monkeypatch.context() as m:
        m.setattr(_atomic.FS, "rmtree", staticmethod(lambda *a, **k: None))
        jlora.save_peft(path, lp, cfg, overwrite=True)
    assert any(n.startswith(".ad.retired-") for n in os.listdir(tmp_path))
    shutil.rmtree(path)
    with pytest.raises(FileNotFoundError, match="no PEFT adapter directory"):
        jlora.load_peft(path, params)
    jlora.save_peft(path, lp, cfg)  # a fresh save: no "already exists"
    assert sorted(os.listdir(tmp_path)) == ["ad"]
    back = jlora.load_peft(path, params)
    assert np.array_equal(back["wide"]["kernel"].b, lp["wide"]["kernel"].b)


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.3), (3, 4, 5))  # [layer, in, out]
        return jnp.stack([x @ w[i] for i in range(3)])


def test_stacked_kernel_exports_one_module_per_layer(tmp_path):
    model, x = Scanned(), jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    probe = lambda p: model.apply({"params": p}, x)  # noqa: E731
    cfg = jlora.LoraConfig(2, 2.0, targets=r"^w$")
    lp = randomize(
        jlora.init(jax.random.key(1), params, cfg, probe=probe), jax.random.key(6)
    )
    assert lp["w"].layout.stack_axes == (0,)
    with pytest.raises(ValueError, match=r"no '\{layer\}'"):
        jlora.save_peft(tmp_path / "no", lp, cfg, probe=probe)
    names = {"w": "layers.{layer}.proj"}
    with pytest.raises(ValueError, match=r"w: whether it is an embedding"):
        jlora.save_peft(tmp_path / "st", lp, cfg, module_names=names)
    jlora.save_peft(tmp_path / "st", lp, cfg, module_names=names, probe=probe)
    pcfg, _ = files_of(tmp_path / "st")
    assert pcfg["target_modules"] == ["layers.0.proj", "layers.1.proj", "layers.2.proj"]
    merged = np.asarray(jlora.merge(lp)["w"], np.float64)
    for i in range(3):
        got = np.asarray(params["w"][i], np.float64).T
        got = got + torch_delta(tmp_path / "st", f"layers.{i}.proj")
        assert_close(got, merged[i].T, chain_bound(2, 2))  # rounded at |w|
    back = jlora.load_peft(tmp_path / "st", params, module_names=names)
    assert np.array_equal(back["w"].a, lp["w"].a) and np.array_equal(back["w"].b, lp["w"].b)


def _haiku_style():
    """An embedding as Haiku and Equinox name it (`embed/embeddings`), read by a
    gather, and a linear layer's `w`: neither leaf name says which is which."""
    rng = np.random.default_rng(0)
    params = {
        "embed": {"embeddings": jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)},
        "proj": {"w": jnp.asarray(rng.normal(size=(8, 5)) * 0.3, jnp.float32)},
    }
    ids = jnp.asarray(rng.integers(0, 11, (2, 6)))
    return params, ids


def _haiku_forward(lookup):
    def fn(p, ids):
        table = p["embed"]["embeddings"]
        h = table[ids] if lookup == "index" else jnp.take(table, ids, axis=0)
        return h @ p["proj"]["w"]

    return fn


HAIKU_NAMES = {"embed/embeddings": "embed", "proj/w": "proj"}
HAIKU_CFG = jlora.LoraConfig(2, 4.0, targets=r"(embeddings|w)$")


def _haiku_adapted(lookup):
    params, ids = _haiku_style()
    fn = _haiku_forward(lookup)
    probe = lambda p: fn(p, ids)  # noqa: E731
    lp = jlora.init(jax.random.key(1), params, HAIKU_CFG, probe=probe)
    return params, ids, fn, probe, randomize(lp, jax.random.key(2))


@pytest.mark.parametrize("lookup", ["index", "take"])
def test_an_embedding_is_told_by_its_row_lookup_not_by_its_name(tmp_path, lookup):
    params, ids, fn, probe, lp = _haiku_adapted(lookup)
    with pytest.raises(
        ValueError, match=r"embed/embeddings: whether it is an embedding.*probe="
    ):
        jlora.save_peft(tmp_path / "no", lp, HAIKU_CFG, module_names=HAIKU_NAMES)
    assert not os.path.exists(tmp_path / "no")
    out = jlora.save_peft(
        tmp_path / "ad", lp, HAIKU_CFG, module_names=HAIKU_NAMES, probe=probe
    )
    tensors, _ = _safetensors.load(os.path.join(out, "adapter_model.safetensors"))
    assert sorted(tensors) == [
        "base_model.model.embed.lora_embedding_A",
        "base_model.model.embed.lora_embedding_B",
        "base_model.model.proj.lora_A.weight",
        "base_model.model.proj.lora_B.weight",
    ]
    # PEFT's Embedding adds scale * (B @ A).T to the [num_embeddings, dim] table.
    a = tensors["base_model.model.embed.lora_embedding_A"].astype(np.float64)
    b = tensors["base_model.model.embed.lora_embedding_B"].astype(np.float64)
    got = np.asarray(params["embed"]["embeddings"], np.float64) + 2.0 * (b @ a).T
    assert_close(got, jlora.merge(lp)["embed"]["embeddings"], chain_bound(2, 2))
    # Declared instead of probed: the same directory.
    declared = {
        "embed/embeddings": jlora.PeftModule("embed", embedding=True),
        "proj/w": jlora.PeftModule("proj", embedding=False),
    }
    jlora.save_peft(tmp_path / "decl", lp, HAIKU_CFG, module_names=declared)
    assert files_of(tmp_path / "decl") == files_of(out)


def test_a_tied_embedding_is_refused_with_a_probe(tmp_path):
    params, ids = _haiku_style()
    cfg = jlora.LoraConfig(
        2, 4.0, targets=r"embeddings$", layout={"embeddings": jlora.Layout((0,), (1,))}
    )
    lp = randomize(jlora.init(jax.random.key(1), params, cfg), jax.random.key(2))

    def tied(p):  # a row lookup, then decoding with the same table
        table = p["embed"]["embeddings"]
        return table[ids] @ table.T

    with pytest.raises(ValueError, match="both as a row lookup and in a contraction"):
        jlora.save_peft(
            tmp_path / "t", lp, cfg, module_names={"embed/embeddings": "embed"}, probe=tied
        )
    with pytest.raises(TypeError, match="embedding must be True, False or None"):
        jlora.PeftModule("embed", embedding="yes")


def test_fused_module_splits_on_import_and_refuses_unmapped_rows(tmp_path):
    params = {f"{n}": {"kernel": jnp.ones((4, 3)) * i} for i, n in enumerate("qkv")}
    rng = np.random.default_rng(0)
    tensors = {
        "base_model.model.qkv.lora_A.weight": rng.normal(size=(2, 4)).astype(np.float32),
        "base_model.model.qkv.lora_B.weight": rng.normal(size=(9, 2)).astype(np.float32),
    }
    write_peft(str(tmp_path / "f"), {"peft_type": "LORA", "r": 2, "lora_alpha": 2}, tensors)
    all3 = {
        f"{n}/kernel": jlora.PeftModule("qkv", rows=(3 * i, 9)) for i, n in enumerate("qkv")
    }
    lp = jlora.load_peft(tmp_path / "f", params, module_names=all3)
    big_b = tensors["base_model.model.qkv.lora_B.weight"]
    for i, n in enumerate("qkv"):
        assert np.array_equal(
            lp[n]["kernel"].a, tensors["base_model.model.qkv.lora_A.weight"].T
        )
        assert np.array_equal(lp[n]["kernel"].b, big_b[3 * i : 3 * i + 3].T)
    jlora.save_peft(
        tmp_path / "again", lp, jlora.read_peft_config(tmp_path / "f"), module_names=all3
    )
    again, _ = _safetensors.load(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert {k: v.tobytes() for k, v in again.items()} == {
        k: v.tobytes() for k, v in tensors.items()
    }
    two = {k: v for k, v in all3.items() if not k.startswith("k")}
    with pytest.raises(ValueError, match=r"rows \[3, 4, 5\].*no kernel maps to them"):
        jlora.load_peft(tmp_path / "f", params, module_names=two)


def test_fused_export_of_differing_parts_is_a_block_module(tmp_path):
    params = {f"{n}": {"kernel": jnp.zeros((4, 3))} for n in "qkv"}
    cfg = jlora.LoraConfig(2, 2.0, targets=r"(q|v)/kernel$", alpha_pattern={"^v": 6.0})
    lp = randomize(jlora.init(jax.random.key(0), params, cfg), jax.random.key(7))
    names = {
        f"{n}/kernel": jlora.PeftModule("qkv", rows=(3 * i, 9)) for i, n in enumerate("qkv")
    }
    jlora.save_peft(tmp_path / "blk", lp, cfg, module_names=names)
    tensors, _ = _safetensors.load(str(tmp_path / "blk" / "adapter_model.safetensors"))
    assert tensors["base_model.model.qkv.lora_A.weight"].shape == (4, 4)  # rank 2 + 2
    pcfg, _ = files_of(tmp_path / "blk")
    assert pcfg["rank_pattern"] == {"qkv": 4}
    delta = torch_delta(tmp_path / "blk", "qkv")
    merged = jlora.merge(lp)
    want = np.concatenate([np.asarray(merged[n]["kernel"]) for n in "qkv"], axis=1).T
    assert_close(delta, want, chain_bound(4, 2))  # the base is zero


# Against PEFT itself ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_llama():
    if not HAVE_TORCH:
        pytest.skip("needs the [torch] extra (torch, peft, transformers)")
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    tm = transformers.LlamaForCausalLM(hf).eval()
    tensors = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    cfg = llama.LlamaConfig.from_hf(hf.to_dict())
    params = llama.hf_to_params(tensors, cfg)
    model = llama.LlamaForCausalLM(cfg)
    ids = np.random.default_rng(0).integers(0, 96, (2, 16))
    probe = lambda p: model.apply({"params": p}, jnp.asarray(ids))  # noqa: E731
    return tm, model, params, ids, probe, cfg


# Two evaluations of the forward differ by at most a chain of reductions: per layer the
# q/k/v/o, gate/up/down, attention and norm reductions (<= 96 terms), plus the head.
def logits_bound(n_layers):
    return chain_bound(96, 8 * n_layers + 2)


def torch_logits(m, ids):
    import torch

    with torch.no_grad():
        return m(torch.tensor(ids)).logits.numpy()


@needs_torch
def test_llama_port_matches_transformers(torch_llama):
    tm, model, params, ids, _, cfg = torch_llama
    ref = torch_logits(tm, ids)
    assert_close(model.apply({"params": params}, jnp.asarray(ids)), ref, logits_bound(2))
    bad = {k: v for k, v in tm.state_dict().items() if "layers.1.mlp" not in k}
    with pytest.raises(llama.CheckpointError, match="missing: model.layers.1.mlp.up_proj"):
        llama.hf_to_params({k: v.numpy() for k, v in bad.items()}, cfg)


@needs_torch
def test_llama_export_gives_peft_the_same_logits_and_merge(torch_llama, tmp_path):
    import peft

    tm, model, params, ids, _, _ = torch_llama
    cfg = jlora.LoraConfig(
        4,
        8.0,
        targets=r"(q_proj|v_proj|gate_proj)/kernel$|embed_tokens/embedding$",
        rank_pattern={"gate_proj": 2},
        also_train=r"lm_head/kernel$",
    )
    lp = randomize(jlora.init(jax.random.key(1), params, cfg), jax.random.key(2))
    jlora.save_peft(tmp_path / "ad", lp, cfg, task_type="CAUSAL_LM")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tm), str(tmp_path / "ad")).eval()
    ours = jlora.lora(model.apply)({"params": lp}, jnp.asarray(ids))
    assert_close(ours, torch_logits(pm, ids), logits_bound(2))
    merged_torch = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    merged = jlora.merge(lp)
    for name, (path, _, transposed) in llama._table(
        llama.LlamaConfig.from_hf(tm.config.to_dict())
    ).items():
        leaf = merged
        for key in path:
            leaf = leaf[key]
        want = merged_torch[name].T if transposed else merged_torch[name]
        assert_close(leaf, want, chain_bound(4, 2))


@needs_torch
def test_llama_import_of_a_peft_made_adapter(torch_llama, tmp_path):
    import peft

    tm, model, params, ids, probe, _ = torch_llama
    pcfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "embed_tokens",
        ],
        rank_pattern={"q_proj": 8},
        alpha_pattern={"v_proj": 32},
        use_rslora=True,
        modules_to_save=["lm_head"],
        lora_dropout=0.1,
    )
    pm = peft.get_peft_model(copy.deepcopy(tm), pcfg)
    randomize_torch(pm, lambda n: "lora_" in n or "modules_to_save" in n, seed=3)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))  # also writes the embedding's base weights
    lp = jlora.load_peft(tmp_path / "peft", params, probe=probe)
    q = lp["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.rank == 8 and q.scale == pytest.approx(8 / np.sqrt(8)) and q.dropout == 0.1
    ours = jlora.lora(model.apply)({"params": lp}, jnp.asarray(ids))
    assert_close(ours, torch_logits(pm, ids), logits_bound(2))


@pytest.fixture(scope="module")
def torch_gpt2():
    if not HAVE_TORCH:
        pytest.skip("needs the [torch] extra (torch, peft, transformers)")
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2Config(
        vocab_size=96,
        n_positions=32,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=95,
        eos_token_id=95,
        attn_implementation="eager",
    )
    tm = transformers.GPT2LMHeadModel(hf).eval()
    cfg = gpt_model.GPTConfig.from_hf(hf.to_dict())
    tensors = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    params = jax.tree.map(jnp.asarray, gpt2.hf_to_params(tensors, cfg))
    ids = np.random.default_rng(0).integers(0, 96, (2, 16))
    return tm, gpt_model.GPT(cfg), params, ids, cfg


@needs_torch
def test_gpt2_fused_c_attn_both_ways(torch_gpt2, tmp_path):
    import peft

    tm, model, params, ids, cfg = torch_gpt2
    names = gpt2.peft_module_names(cfg)
    # Import: PEFT's c_attn adapter (Conv1D, fan_in_fan_out) adapts query, key and value.
    pm = peft.get_peft_model(
        copy.deepcopy(tm),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
        ),
    )
    randomize_torch(pm, lambda n: "lora_" in n, seed=3)
    pm.eval().save_pretrained(str(tmp_path / "imp"))
    lp = jlora.load_peft(tmp_path / "imp", params, module_names=names)
    assert all(lp["h_1"]["attn"][n]["kernel"].rank == 4 for n in ("query", "key", "value"))
    ours = jlora.lora(model.apply)({"params": lp}, jnp.asarray(ids))
    assert_close(ours, torch_logits(pm, ids), logits_bound(2))
    # Export: query and value with their own factors become one rank-8 c_attn module.
    jcfg = jlora.LoraConfig(4, 8.0, targets=r"(query|value|out)/kernel$")
    lp = randomize(jlora.init(jax.random.key(0), params, jcfg), jax.random.key(1))
    jlora.save_peft(tmp_path / "exp", lp, jcfg, module_names=names, fan_in_fan_out=True)
    exported, _ = files_of(tmp_path / "exp")
    assert exported["rank_pattern"] == {f"transformer.h.{i}.attn.c_attn": 8 for i in (0, 1)}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tm), str(tmp_path / "exp")).eval()
    ours = jlora.lora(model.apply)({"params": lp}, jnp.asarray(ids))
    assert_close(ours, torch_logits(pm, ids), logits_bound(2))
    merged = jlora.merge(lp)
    w = pm.merge_and_unload().state_dict()["transformer.h.0.attn.c_attn.weight"].numpy()
    ours_w = np.concatenate(
        [np.asarray(merged["h_0"]["attn"][n]["kernel"]) for n in ("query", "key", "value")],
        -1,
    )
    assert_close(ours_w, w, chain_bound(8, 2))
    back = jlora.load_peft(tmp_path / "exp", params, module_names=names)
    jlora.save_peft(
        tmp_path / "exp2",
        back,
        jlora.read_peft_config(tmp_path / "exp"),
        module_names=names,
        fan_in_fan_out=True,
    )
    assert files_of(tmp_path / "exp") == files_of(tmp_path / "exp2")


@needs_torch
def test_qwen2_biases_and_a_trained_bias_go_through_peft(tmp_path):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    tm = transformers.Qwen2ForCausalLM(hf).eval()
    # Qwen2 initializes its q/k/v biases to zero: make them count.
    randomize_torch(tm, lambda n: n.endswith("proj.bias"), seed=4)
    cfg = llama.LlamaConfig.from_hf(hf.to_dict() | {"model_type": "qwen2"})
    tensors = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    params = llama.hf_to_params(tensors, cfg)
    model = llama.LlamaForCausalLM(cfg)
    ids = np.random.default_rng(0).integers(0, 96, (2, 12))
    assert_close(
        model.apply({"params": params}, jnp.asarray(ids)),
        torch_logits(tm, ids),
        logits_bound(2),
    )
    jcfg = jlora.LoraConfig(
        4, 8.0, targets=r"(q_proj|v_proj)/kernel$", train_bias="lora_only"
    )
    lp = randomize(jlora.init(jax.random.key(0), params, jcfg), jax.random.key(1))
    q = lp["model"]["layers_0"]["self_attn"]["q_proj"]
    q["bias"] = jlora.Trainable(q["bias"].value + 0.5)  # as if trained
    jlora.save_peft(tmp_path / "q", lp, jcfg)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tm), str(tmp_path / "q")).eval()
    ours = jlora.lora(model.apply)({"params": lp}, jnp.asarray(ids))
    assert_close(ours, torch_logits(pm, ids), logits_bound(2))


@needs_torch
def test_an_embedding_named_embeddings_goes_to_peft_as_an_embedding(tmp_path):
    import peft
    import torch

    params, ids, fn, probe, lp = _haiku_adapted("index")
    jlora.save_peft(tmp_path / "ad", lp, HAIKU_CFG, module_names=HAIKU_NAMES, probe=probe)

    class Torch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(11, 8)
            self.proj = torch.nn.Linear(8, 5, bias=False)

        def forward(self, ids):
            return self.proj(self.embed(ids))

    tm = Torch()
    with torch.no_grad():
        tm.embed.weight.copy_(torch.tensor(np.asarray(params["embed"]["embeddings"])))
        tm.proj.weight.copy_(torch.tensor(np.asarray(params["proj"]["w"]).T))
    pm = peft.PeftModel.from_pretrained(tm, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(np.asarray(ids))).numpy()
    ours = jlora.lora(fn)(lp, ids)
    # Two evaluations of a lookup (plus a rank-2 product) and an 8-term contraction.
    assert_close(ours, theirs, chain_bound(8, 3))
