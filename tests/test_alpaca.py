"""The Alpaca main job: templates, data checks, loss masks, the GPT-2 loader, generation,
and a 2-step end-to-end run of `examples/alpaca.py`."""

from __future__ import annotations

import json
import math
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, chain_bound

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from instruct import base, gpt2, world  # noqa: E402
from instruct.data import (  # noqa: E402
    DataError,
    Template,
    batch_at,
    encode,
    load_records,
    masked_loss,
    train_val_split,
)
from instruct.model import GPT, GPTConfig, generate, init_params  # noqa: E402

# --- templates -------------------------------------------------------------------------


def test_default_template_is_the_legacy_alpaca_prompt_exactly():
    t = Template.load()
    assert t.prompt("Add the numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that "
        "provides further context. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n"
        "### Response:"
    )
    assert t.prompt("Name a color.") == (
        "Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nName a color.\n\n"
        "### Response:"
    )
    assert t.response_split == "### Response:"
    assert t.response(t.prompt("Name a color.") + " Red.") == "Red."
    assert t.response(t.prompt("Name a color.") + " Red.\n\n### Response: Blue.") == "Red."


def test_template_placeholders_in_the_data_are_not_reformatted():
    t = Template.load()
    assert "{input}" in t.prompt("Explain {input} in Python.")


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_custom_template_and_its_errors(tmp_path):
    good = {
        "description": "short",
        "prompt_input": "Q: {instruction} | {input}\nA:",
        "prompt_no_input": "Q: {instruction}\nA:",
        "response_split": "A:",
    }
    t = Template.load(_write(tmp_path, "t.json", good))
    assert t.prompt("hi", "x") == "Q: hi | x\nA:" and t.response("Q: hi\nA: yes") == "yes"
    cases = {
        "lacks field(s) ['response_split']": {
            k: v for k, v in good.items() if k != "response_split"
        },
        "'prompt_input' must be a string": dict(good, prompt_input=3),
        "'prompt_no_input' lacks {instruction}": dict(good, prompt_no_input="Q:\nA:"),
        "placeholder other than": dict(good, prompt_no_input="{instruction} {extra}\nA:"),
        "does not contain response_split": dict(good, response_split="###"),
    }
    for message, obj in cases.items():
        with pytest.raises(
            DataError,
            match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)"),
        ):
            Template.load(_write(tmp_path, "bad.json", obj))


# --- data ------------------------------------------------------------------------------


def test_data_errors_name_the_record_and_field(tmp_path):
    with pytest.raises(DataError, match="not valid JSON: .* line 2"):
        load_records(_write(tmp_path, "a.json", '[\n{"instruction": }]'))
    with pytest.raises(DataError, match="has no records"):
        load_records(_write(tmp_path, "b.json", []))
    with pytest.raises(DataError, match="must hold a JSON list"):
        load_records(_write(tmp_path, "c.json", {"instruction": "x"}))
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "missing.json"))
    records = [
        {"instruction": "a", "input": "", "output": "b"},
        {"instruction": "a", "output": "b"},
        {"instruction": "a", "input": "", "output": 7},
        "not a record",
    ]
    with pytest.raises(DataError) as err:
        load_records(_write(tmp_path, "d.json", records))
    text = str(err.value)
    assert "3 bad record(s)" in text
    assert "record 1: missing field 'input'" in text
    assert "record 2: field 'output' must be a string, got int" in text
    assert "record 3: expected an object, got str" in text


def chars(text):  # a tokenizer simple enough to reason about: one id per character
    return [ord(c) for c in text]


def test_loss_mask_covers_the_output_and_eos_only():
    t = Template.load()
    rec = {"instruction": "Say hi.", "input": "", "output": "hi"}
    prompt = t.prompt("Say hi.")
    enc = encode([rec], t, chars, cutoff_len=1000, eos_id=0, pad_to=1)
    n = len(prompt)
    assert enc.ids[0].tolist() == chars(prompt) + chars("hi") + [0]
    assert enc.mask[0].tolist() == [0.0] * n + [1.0, 1.0, 1.0]
    assert enc.lengths.tolist() == [n + 3]

    no_eos = encode([rec], t, chars, cutoff_len=1000, eos_id=0, add_eos=False, pad_to=1)
    assert no_eos.ids[0].tolist() == chars(prompt + "hi")
    everything = encode(
        [rec], t, chars, cutoff_len=1000, eos_id=0, train_on_inputs=True, pad_to=1
    )
    assert everything.mask[0].tolist() == [0.0] + [1.0] * (n + 2)

    # Truncation keeps the first cutoff_len tokens; padding is EOS with mask 0.
    cut = encode([rec], t, chars, cutoff_len=n + 1, eos_id=0, pad_to=8)
    assert cut.ids.shape[1] % 8 == 0 and cut.ids.shape[1] >= n + 1
    assert cut.ids[0, : n + 1].tolist() == chars(prompt + "h")
    assert cut.mask[0].sum() == 1 and cut.mask[0, n] == 1
    assert (cut.ids[0, n + 1 :] == 0).all()


def test_records_whose_prompt_fills_cutoff_len_are_dropped_and_counted():
    t = Template.load()
    short = {"instruction": "x", "input": "", "output": "y"}
    long = {"instruction": "x" * 500, "input": "", "output": "y"}
    n_short = len(t.prompt("x"))
    enc = encode([short, long, long], t, chars, cutoff_len=n_short + 5, eos_id=0)
    assert enc.dropped == 2 and len(enc.ids) == 1
    with pytest.raises(DataError, match="all 2 records were dropped"):
        encode([long, long], t, chars, cutoff_len=n_short + 5, eos_id=0)


def test_masked_loss_is_the_mean_cross_entropy_of_the_target_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 0, 0, 1]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    terms = [-logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(5) if mask[b, t]]
    np.testing.assert_allclose(masked_loss(logits, ids, mask), np.mean(terms), rtol=1e-5)


def test_split_and_batches_are_deterministic_and_cover_each_epoch():
    records = [{"instruction": str(i), "input": "", "output": "o"} for i in range(10)]
    train, val = train_val_split(records, 3, seed=1)
    assert len(train) == 7 and len(val) == 3
    assert sorted(r["instruction"] for r in train + val) == [str(i) for i in range(10)]
    assert train_val_split(records, 0.2, seed=1)[1] == train_val_split(records, 2, 1)[1]
    with pytest.raises(DataError, match="at least one record must remain"):
        train_val_split(records, 10)
    enc = encode(records, Template.load(), chars, cutoff_len=1000, eos_id=0)
    first = [batch_at(enc, s, 5)[0] for s in range(2)]  # one epoch of two batches
    rows = {tuple(r) for b in first for r in b.tolist()}
    assert len(rows) == 10  # every record once
    np.testing.assert_array_equal(batch_at(enc, 1, 5)[0], first[1])  # resumable


def test_shipped_sample_teaches_a_format_the_corpus_never_shows():
    records = load_records(world.SAMPLE_PATH)
    assert len(records) >= 300
    assert all(world.ANSWER.match(r["output"]) for r in records)
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)
    corpus = " ".join(world.corpus(2000))
    assert "answer" in corpus and "The answer is" not in corpus
    assert world.score(
        ["The answer is red.", "red", "The answer is blue."],
        ["The answer is red.", "The answer is red.", "x"],
    ) == {"format": 2 / 3, "exact": 1 / 3}
    split = world.score(
        ["The answer is red.", "The answer is six.", "The answer is two."],
        ["The answer is red.", "The answer is five.", "The answer is two."],
        [True, False, False],
    )
    assert (split["exact_input"], split["n_input"]) == (1.0, 1)
    assert (split["exact_world"], split["n_world"]) == (0.5, 2)


# What each instruction kind asks, as the sentence of the input that answers it
# ({arg}: the person or thing named in the instruction; the answer is the group).
_COLOR = "(?:" + "|".join(world.COLORS) + ")"
_ANSWERED_BY = {
    "thing": r"{arg} has an? " + _COLOR + r" (\w+)\.",
    "city": r"{arg} lives in (\w+)\.",
    "job": r"{arg} works as an? (\w+)\.",
    "animal": r"{arg} saw an? (\w+)\.",
    "person": r"(\w+) has an? " + _COLOR + r" {arg}\.",
}
_WORDS = {
    "thing": world.THINGS, "city": world.CITIES, "job": world.JOBS,
    "animal": world.ANIMALS, "person": world.NAMES,
}  # fmt: skip


def _wording(ask: str) -> str:
    """A regex for a `KINDS` wording, its slot ({name}, {thing} or {x}) a group."""
    return re.sub(r"\\\{\w+\\\}", r"(\\w+)", re.escape(ask))


def _asked(instruction: str) -> tuple[str, str]:
    """(kind, the person, thing or number asked about), from the `KINDS` wordings."""
    found = []
    for kind, (asks, _, _) in world.KINDS.items():
        for ask in asks:
            if m := re.fullmatch(_wording(ask), instruction):
                found.append((kind, m.group(1)))
    assert len(found) == 1, (instruction, found)
    return found[0]


def test_sample_answers_follow_from_the_prompt_and_ask_no_question_twice():
    records = load_records(world.SAMPLE_PATH)
    assert records == world.sample()  # the shipped file is what the generator writes
    asked = []
    for r in records:
        kind, arg = _asked(r["instruction"])
        answer = r["output"].removeprefix("The answer is ").removesuffix(".")
        if kind in ("after", "before"):  # counting: no input, one step from the number
            i = world.NUMBERS.index(arg)
            assert r["input"] == "", r
            assert answer == world.NUMBERS[i + (1 if kind == "after" else -1)], r
            asked.append((kind, arg))
            continue
        # The input is about the person asked about (or, asking who has a thing, about
        # one person) and states the asked fact once; the answer is that fact, and no
        # other word of its kind is in the input.
        sentences = re.findall(r"[^.]+\.", r["input"])
        assert 2 <= len(sentences) <= 3, r
        assert len({s.split()[0] for s in sentences}) == 1, r
        fact = _ANSWERED_BY[kind].format(arg=arg)
        hits = [m.group(1) for s in sentences if (m := re.fullmatch(fact, s.strip()))]
        assert hits == [answer], r
        words = re.findall(r"\w+", r["input"])
        assert {w for w in words if w in _WORDS[kind]} == {answer}, r
        asked.append((kind, arg, answer))
    # New instances, not repeats: no two records ask the same thing in other words or
    # with other facts beside it, so any held-out record is one training never saw.
    assert len(set(asked)) == len(records)
    kinds = {a[0] for a in asked}
    assert len(kinds) >= 5 and {"after", "before"} <= kinds
    assert sum(a[0] in ("after", "before") for a in asked) >= 30
    with pytest.raises(ValueError, match=r"sample\(n=1500\).* only 1396 records"):
        world.sample(1500)  # more than the world's different questions


def test_corpus_quizzes_ask_first_and_reply_from_the_facts_in_other_words():
    docs = world.corpus(3000)
    text = " ".join(docs)
    for asks, _, _ in world.KINDS.values():  # the sample's wordings are new to the base
        for ask in asks:
            assert not re.search(_wording(ask), text), ask
    questions = {  # a corpus question, and the kind of fact that answers it
        r"What does (\w+) have\?": "thing",
        r"Where does (\w+) live\?": "city",
        r"What does (\w+) work as\?": "job",
        r"What did (\w+) see\?": "animal",
        r"Who has the (\w+)\?": "person",
    }
    quizzes = [d for d in docs if "Reply:" in d]
    assert 0.4 < len(quizzes) / len(docs) < 0.8
    kinds = set()
    for d in quizzes:  # a question first, the facts, the reply last
        question, rest = d.split("? ", 1)
        question += "?"
        body, reply = rest.rsplit(" Reply: ", 1)
        reply = reply.removesuffix(".")
        assert "?" not in body, d
        if m := re.fullmatch(r"What comes (after|before) (\w+)\?", question):
            i = world.NUMBERS.index(m.group(2))
            assert reply == world.NUMBERS[i + (1 if m.group(1) == "after" else -1)], d
            kinds.add(m.group(1))
            continue
        found = [
            (m, kind) for q, kind in questions.items() if (m := re.fullmatch(q, question))
        ]
        assert len(found) == 1, d
        m, kind = found[0]
        answers = set(re.findall(_ANSWERED_BY[kind].format(arg=m.group(1)), body))
        # The reply is what the facts say (two people given the same thing would make
        # a "Who has" quiz ambiguous: then it is one of them).
        assert reply in answers, d
        kinds.add(kind)
    assert len(kinds) == len(questions) + 2


# --- the GPT-2 loader and a NumPy reference of GPT-2 -----------------------------------


def _gelu_new(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_gpt2(t: dict, hf_config: dict, ids: np.ndarray) -> np.ndarray:
    """GPT-2's forward pass straight from the Hugging Face tensors (`Conv1D`: x @ W + b
    with W stored [in, out]; `c_attn` holds query, key and value side by side)."""
    t = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in t.items()}
    n_head, eps = hf_config["n_head"], hf_config["layer_norm_epsilon"]
    seq = ids.shape[-1]
    x = t["wte.weight"][ids] + t["wpe.weight"][np.arange(seq)]
    causal = np.tril(np.ones((seq, seq), bool))
    d = t["wte.weight"].shape[1] // n_head

    def heads(a):  # [..., T, H * d] -> [..., H, T, d]
        return a.reshape(*a.shape[:-1], n_head, d).swapaxes(-2, -3)

    for i in range(hf_config["n_layer"]):
        p = f"h.{i}."
        h = _layer_norm(x, t[p + "ln_1.weight"], t[p + "ln_1.bias"], eps)
        qkv = h @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
        q, k, v = np.split(qkv, 3, axis=-1)
        scores = heads(q) @ heads(k).swapaxes(-1, -2) / math.sqrt(d)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        y = (probs @ heads(v)).swapaxes(-2, -3).reshape(x.shape)
        x = x + y @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
        h = _layer_norm(x, t[p + "ln_2.weight"], t[p + "ln_2.bias"], eps)
        h = _gelu_new(h @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"])
        x = x + h @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
    x = _layer_norm(x, t["ln_f.weight"], t["ln_f.bias"], eps)
    return x @ t["wte.weight"].T


HF_CONFIG = {
    "model_type": "gpt2",
    "vocab_size": 300,
    "n_positions": 32,
    "n_embd": 24,
    "n_layer": 2,
    "n_head": 3,
    "n_inner": None,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def _hf_tensors(cfg: dict, seed: int = 0, prefix: str = "transformer."):
    """Random tensors with Hugging Face GPT-2 names and layouts, and the buffers a real
    checkpoint carries."""
    rng = np.random.default_rng(seed)
    d, v, n = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]

    def r(*shape, scale=0.2):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    t = {
        "wte.weight": r(v, d),
        "wpe.weight": r(n, d),
        "ln_f.weight": 1 + r(d),
        "ln_f.bias": r(d),
    }
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        t.update(
            {
                p + "ln_1.weight": 1 + r(d),
                p + "ln_1.bias": r(d),
                p + "attn.c_attn.weight": r(d, 3 * d),
                p + "attn.c_attn.bias": r(3 * d),
                p + "attn.c_proj.weight": r(d, d),
                p + "attn.c_proj.bias": r(d),
                p + "ln_2.weight": 1 + r(d),
                p + "ln_2.bias": r(d),
                p + "mlp.c_fc.weight": r(d, 4 * d),
                p + "mlp.c_fc.bias": r(4 * d),
                p + "mlp.c_proj.weight": r(4 * d, d),
                p + "mlp.c_proj.bias": r(d),
                p + "attn.bias": np.tril(np.ones((1, 1, n, n), np.float32)),
                p + "attn.masked_bias": np.array(-1e4, np.float32),
            }
        )
    t = {prefix + k: val for k, val in t.items()}
    t["lm_head.weight"] = t[prefix + "wte.weight"].copy()
    return t


@pytest.fixture(scope="module")
def tokenizer():
    return base.train_tokenizer(world.corpus(200), 300)


def _write_gpt2(path, tensors, cfg, tokenizer):
    import safetensors.numpy

    path.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    tokenizer.save(str(path / "tokenizer.json"))
    return str(path)


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_gpt2_loader_matches_a_numpy_reference_of_gpt2(tmp_path, tokenizer, prefix):
    tensors = _hf_tensors(HF_CONFIG, prefix=prefix)
    path = _write_gpt2(tmp_path / "gpt2", tensors, HF_CONFIG, tokenizer)
    cfg, params, tok = gpt2.load(path)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (2, 24, 3)
    ids = np.array([tok.encode("Mia has a red cup. Tom lives in Oslo.").ids[:20]] * 2)
    ours = GPT(cfg).apply({"params": params}, jnp.asarray(ids))
    # float32 against a float64 reference: 2 layers of width 24 (MLP 96), each with two
    # layer norms, q/k/v, scores, softmax, values, out and two MLP dots, plus the final
    # norm and the tied head; tanh/exp count as one more rounding step each.
    ref = numpy_gpt2(tensors, HF_CONFIG, ids)
    assert_close(ours, ref, chain_bound(k=96, depth=2 * 12 + 4))
    # And the same after a write in this project's layout and a read back.
    again = gpt2.load(gpt2.save(str(tmp_path / "again"), cfg, params, tok))[1]
    assert jax.tree.all(jax.tree.map(np.array_equal, again, params))


def test_gpt2_loader_errors_name_files_and_tensors(tmp_path, tokenizer):
    good = _hf_tensors(HF_CONFIG)
    with pytest.raises(gpt2.CheckpointError, match="lacks model.safetensors"):
        path = _write_gpt2(tmp_path / "a", good, HF_CONFIG, tokenizer)
        (tmp_path / "a" / "model.safetensors").unlink()
        gpt2.load(path)
    with pytest.raises(gpt2.CheckpointError, match="not a directory"):
        gpt2.load(str(tmp_path / "nowhere"))

    bad = dict(good)
    bad["transformer.h.1.mlp.c_fc.weight"] = bad["transformer.h.1.mlp.c_fc.weight"][:, :10]
    del bad["transformer.ln_f.bias"]
    with pytest.raises(gpt2.CheckpointError) as err:
        gpt2.load(_write_gpt2(tmp_path / "b", bad, HF_CONFIG, tokenizer))
    assert "h.1.mlp.c_fc.weight has shape (24, 10), the config implies (24, 96)" in str(
        err.value
    )
    assert "missing tensor ln_f.bias" in str(err.value)

    untied = dict(good, **{"lm_head.weight": good["lm_head.weight"] + 1})
    with pytest.raises(gpt2.CheckpointError, match="only tied heads load"):
        gpt2.load(_write_gpt2(tmp_path / "c", untied, HF_CONFIG, tokenizer))
    wrong_depth = dict(HF_CONFIG, n_layer=3)
    with pytest.raises(gpt2.CheckpointError, match="missing tensor h.2.attn.c_attn"):
        gpt2.load(_write_gpt2(tmp_path / "d", good, wrong_depth, tokenizer))
    no_heads = {k: v for k, v in HF_CONFIG.items() if k != "n_head"}
    with pytest.raises(gpt2.CheckpointError, match=r"config keys \['n_head'\]"):
        gpt2.load(_write_gpt2(tmp_path / "e", good, no_heads, tokenizer))


# --- generation ------------------------------------------------------------------------


def test_cached_generation_equals_greedy_decoding_by_full_recompute():
    cfg = GPTConfig(
        vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, eos_token_id=0
    )
    params = init_params(cfg, jax.random.key(3))
    params = jax.tree.map(lambda x: x * 20 if x.ndim == 2 else x, params)  # sharper
    model = GPT(cfg)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    got = generate(model.apply, params, cfg, prompts, max_new_tokens=6)

    @jax.jit
    def last_logits(seq, n):  # no cache, no left padding: the whole sequence, recomputed
        return model.apply({"params": params}, seq)[0, n - 1]

    for prompt, new in zip(prompts, got):
        seq = list(prompt)
        for _ in range(6):
            padded = jnp.array([seq + [0] * (16 - len(seq))])  # causal: padding is unseen
            nxt = int(jnp.argmax(last_logits(padded, len(seq))))
            if nxt == cfg.eos_token_id:
                break
            seq.append(nxt)
        assert new == seq[len(prompt) :]
    with pytest.raises(ValueError, match="exceeds the model's n_positions"):
        generate(model.apply, params, cfg, prompts, max_new_tokens=30)


# --- the script, end to end ------------------------------------------------------------


def test_alpaca_main_job_two_steps_end_to_end(tmp_path):
    import importlib.util

    import jlora

    spec = importlib.util.spec_from_file_location("alpaca", ROOT / "examples" / "alpaca.py")
    alpaca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alpaca)
    lines = []
    data = tmp_path / "sample.json"
    data.write_text(pathlib.Path(world.SAMPLE_PATH).read_text())
    argv = [
        "--data",
        str(data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output-dir",
        str(tmp_path / "run"),
        "--base-steps",
        "3",
        "--base-width",
        "32",
        "--base-layers",
        "1",
        "--base-docs",
        "300",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--val-set-size",
        "4",
        "--score-records",
        "2",
        "--max-new-tokens",
        "2",
        "--save-every",
        "1",
        "--eval-every",
        "1",
        "--num-examples",
        "2",
    ]
    with jax.numpy_dtype_promotion("standard"):
        out = alpaca.main(argv, log=lines.append)
    text = "\n".join(lines)
    assert "pretrained 3 steps" in text and "### Instruction:" in text
    assert "on 4 kernels at learning rate 0.002;" in text  # the embedded base's rate
    heads = [line.strip() for line in lines]
    for source in ("in the input", "from what the base knows"):  # a line each, twice
        assert sum(h.startswith(f"exactly right, answer {source}:") for h in heads) == 2
    assert [s for s, _ in out["history"]["eval"]] == [1, 2]
    assert all(math.isfinite(v) for v in (out["val_loss_before"], out["val_loss_after"]))
    # Merged vs factored logits: rounding only. One block of width 32: reductions of at
    # most max(4 x 32, 256 positions) terms; q, k, v, scores, softmax, values, out, two
    # MLP dots, the tied head, and two extra dots each for the adapted q, k, v and out.
    assert out["merge_gap"] <= chain_bound(k=256, depth=18) * out["merge_scale"]
    assert len(out["responses"]) == 2
    # The saved adapters load back onto the base (read from the cached checkpoint).
    base_dir = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    _, base_params, _ = gpt2.load(str(base_dir))
    loaded = jlora.load_adapter(out["adapter_dir"], base_params)
    assert len(jlora.summary(loaded).adapted) == 4  # the attention kernels of one layer

    # A second run finds the cached base and resumes from the last checkpoint.
    lines.clear()
    with jax.numpy_dtype_promotion("standard"):
        alpaca.main([*argv, "--steps", "3"], log=lines.append)
    text = "\n".join(lines)
    assert "base model: cached at" in text and "pretrained" not in text
    assert "resumed from the checkpoint of step 2" in text
    with pytest.raises(SystemExit, match="other settings \\(lora_r\\)"):
        alpaca.main([*argv, "--lora-r", "4"], log=lines.append)
    with pytest.raises(SystemExit, match="other settings \\(learning_rate\\)"):
        alpaca.main([*argv, "--learning-rate", "1e-3"], log=lines.append)
    # The same path with other contents is other data, not a run to resume.
    data.write_text(json.dumps(load_records(world.SAMPLE_PATH)[:-1]))
    with pytest.raises(SystemExit, match=r"other settings \(data \(sha256\)\)"):
        alpaca.main(argv, log=lines.append)


def test_alpaca_main_job_on_an_nf4_base(tmp_path):
    import importlib.util

    import jlora

    spec = importlib.util.spec_from_file_location("alpaca", ROOT / "examples" / "alpaca.py")
    alpaca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alpaca)
    lines = []
    argv = [
        *("--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run")),
        *("--base-steps", "3", "--base-width", "64", "--base-layers", "1"),
        *("--base-docs", "300", "--steps", "2", "--batch-size", "4"),
        *("--val-set-size", "4", "--score-records", "2", "--max-new-tokens", "2"),
        *("--eval-every", "1", "--num-examples", "0", "--quantize", "nf4"),
    ]
    with jax.numpy_dtype_promotion("standard"):
        out = alpaca.main(argv, log=lines.append)
    # q, k, v, out and the two MLP kernels of the one block (the embedding stays float)
    assert "base: 6 kernels stored as nf4" in lines
    assert all(math.isfinite(v) for v in (out["val_loss_before"], out["val_loss_after"]))
    assert [s for s, _ in out["history"]["eval"]] == [1, 2]
    # served = merged into the dequantized kernels; the transform dequantizes at each
    # use: the same function, rounded twice (see the float run's test for the chain)
    assert out["merge_gap"] <= chain_bound(k=256, depth=18) * out["merge_scale"]
    is_q = lambda x: isinstance(x, jlora.Quantized)  # noqa: E731
    leaves = jax.tree.leaves(out["params"], is_leaf=is_q)
    assert sum(isinstance(x, jlora.Quantized) for x in leaves) == 6
    with pytest.raises(SystemExit, match="other settings \\(quantize\\)"):
        alpaca.main([*argv[:-2], "--quantize", "int8"], log=lines.append)


def test_embedded_base_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="BaseSettings.n_docs must be positive"):
        base.BaseSettings(n_docs=0)
    with pytest.raises(ValueError, match="not more than a training window .* raise n_docs"):
        base.pretrain(base.BaseSettings(n_docs=1, block=200), str(tmp_path / "base"))
