"""Alpaca-format data: records, prompt templates, tokenization, loss masks, batches.

A dataset is a JSON list of `{"instruction", "input", "output"}` records (`input` may be
empty). A template is a JSON object with `description`, `prompt_input`,
`prompt_no_input` and `response_split`; the prompt of a record is its template filled
in, and the training text is the prompt followed by the output (and EOS).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

FIELDS = ("instruction", "input", "output")
TEMPLATE_FIELDS = ("description", "prompt_input", "prompt_no_input", "response_split")
DEFAULT_TEMPLATE = os.path.join(
    os.path.dirname(__file__), os.pardir, "data", "templates", "alpaca_legacy.json"
)


class DataError(ValueError):
    """Bad data or template files; the message names the file, record and field."""


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{what} file {path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{what} file {path!r} is not valid JSON: {e.msg} at line {e.lineno}, "
            f"column {e.colno}"
        ) from None


@dataclasses.dataclass(frozen=True)
class Template:
    """A prompt template. `prompt()` fills it; `response()` splits generated text."""

    description: str
    prompt_input: str
    prompt_no_input: str
    response_split: str

    def __post_init__(self):
        for name in TEMPLATE_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise DataError(
                    f"template field {name!r} must be a string, got "
                    f"{type(getattr(self, name)).__name__}"
                )
        for name, needs in (
            ("prompt_input", ("{instruction}", "{input}")),
            ("prompt_no_input", ("{instruction}",)),
        ):
            text = getattr(self, name)
            for placeholder in needs:
                if placeholder not in text:
                    raise DataError(f"template field {name!r} lacks {placeholder}")
            try:
                text.format(instruction="", input="")
            except (KeyError, IndexError, ValueError) as e:
                raise DataError(
                    f"template field {name!r} has a placeholder other than {{instruction}}"
                    f" and {{input}} ({e!r}); write a literal brace as {{{{ or }}}}"
                ) from None
        if not self.response_split:
            raise DataError("template field 'response_split' must not be empty")
        for name in ("prompt_input", "prompt_no_input"):
            if self.response_split not in getattr(self, name):
                raise DataError(
                    f"template field {name!r} does not contain response_split "
                    f"{self.response_split!r}, so responses could not be split off"
                )

    @classmethod
    def load(cls, path: str = DEFAULT_TEMPLATE) -> Template:
        raw = _read_json(path, "template")
        if not isinstance(raw, dict):
            raise DataError(f"template file {path!r} must hold a JSON object")
        missing = [k for k in TEMPLATE_FIELDS if k not in raw]
        if missing:
            raise DataError(f"template file {path!r} lacks field(s) {missing}")
        try:
            return cls(**{k: raw[k] for k in TEMPLATE_FIELDS})
        except DataError as e:
            raise DataError(f"template file {path!r}: {e}") from None

    def prompt(self, instruction: str, input: str = "") -> str:
        """The prompt for a record: `prompt_input` when `input` is non-empty."""
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def response(self, text: str) -> str:
        """The response in a generated text: what follows the first `response_split`, up
        to a second one if the model wrote it again, stripped."""
        parts = text.split(self.response_split)
        return (parts[1] if len(parts) > 1 else text).strip()


def load_records(path: str) -> list[dict[str, str]]:
    """Read and check an Alpaca-format JSON file.

    Raises:
      DataError: the file is missing, not JSON, not a non-empty list, or a record is
        not an object, lacks a field, or has a non-string field (index and field named).
    """
    raw = _read_json(path, "data")
    if not isinstance(raw, list):
        raise DataError(
            f"data file {path!r} must hold a JSON list of records, got {type(raw).__name__}"
        )
    if not raw:
        raise DataError(f"data file {path!r} has no records")
    return check_records(raw, path)


def check_records(records: list, where: str = "data") -> list[dict[str, str]]:
    """Validate records; every problem is listed by record index and field."""
    problems = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            problems.append(f"record {i}: expected an object, got {type(rec).__name__}")
            continue
        for field in FIELDS:
            if field not in rec:
                problems.append(f"record {i}: missing field {field!r}")
            elif not isinstance(rec[field], str):
                problems.append(
                    f"record {i}: field {field!r} must be a string, got "
                    f"{type(rec[field]).__name__}"
                )
    if problems:
        shown = problems[:20] + (
            [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        )
        raise DataError(f"{where}: {len(problems)} bad record(s):\n  " + "\n  ".join(shown))
    return [{f: rec[f] for f in FIELDS} for rec in records]


def train_val_split(records: list, val_size: int | float, seed: int = 0):
    """Shuffle with `seed` and hold out `val_size` records (a count, or a fraction)."""
    n = len(records)
    n_val = int(round(val_size * n)) if isinstance(val_size, float) else int(val_size)
    if not 0 <= n_val < n:
        raise DataError(
            f"val_size={val_size!r} holds out {n_val} of {n} records; at least one "
            "record must remain for training"
        )
    order = np.random.default_rng(seed).permutation(n)
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


@dataclasses.dataclass
class Encoded:
    """Token ids `[n, width]` padded with EOS, the loss mask (1 = a target token), the
    unpadded lengths, and how many records were dropped for not fitting `cutoff_len`."""

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    dropped: int


def encode(
    records: list[dict[str, str]],
    template: Template,
    tokenize,
    *,
    cutoff_len: int,
    eos_id: int,
    add_eos: bool = True,
    train_on_inputs: bool = False,
    pad_to: int = 8,
) -> Encoded:
    """Tokenize records into fixed-width arrays with a loss mask.

    The prompt and the output are tokenized separately and concatenated, so the
    boundary between them is exact; EOS is appended to the output when `add_eos`.
    The sequence is truncated to `cutoff_len`. With `train_on_inputs=False` the prompt
    tokens are masked out of the loss. A record whose prompt alone takes
    `cutoff_len` tokens or more has no output token left to learn: it is dropped and
    counted in `dropped`.

    Args:
      tokenize: `str -> list[int]`.
      pad_to: the width is the longest kept sequence rounded up to a multiple of this.

    Raises:
      DataError: when every record is dropped.
    """
    if cutoff_len < 2:
        raise DataError(f"cutoff_len must be at least 2, got {cutoff_len}")
    seqs, masks, dropped = [], [], 0
    for rec in records:
        prompt = tokenize(template.prompt(rec["instruction"], rec["input"]))
        output = tokenize(rec["output"]) + ([eos_id] if add_eos else [])
        if len(prompt) >= cutoff_len:
            dropped += 1
            continue
        ids = (prompt + output)[:cutoff_len]
        mask = [
            0 if (i < len(prompt) and not train_on_inputs) else 1 for i in range(len(ids))
        ]
        mask[0] = 0  # nothing predicts the first token
        seqs.append(ids)
        masks.append(mask)
    if not seqs:
        raise DataError(
            f"cutoff_len={cutoff_len} is shorter than every prompt: all {len(records)} "
            "records were dropped; raise --cutoff-len"
        )
    width = -(-max(map(len, seqs)) // pad_to) * pad_to
    ids = np.full((len(seqs), width), eos_id, np.int32)
    mask = np.zeros((len(seqs), width), np.float32)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = s
        mask[i, : len(m)] = m
    return Encoded(ids, mask, np.array([len(x) for x in seqs], np.int32), dropped)


def batch_at(data: Encoded, step: int, batch_size: int, seed: int = 0):
    """Batch number `step` of a shuffled, endless pass over `data`.

    Returns `(ids, mask, n_tokens)`, `n_tokens` being the unpadded token count.
    Each epoch has its own permutation (from `seed` and the epoch number), so the data
    position of a run is just its step count: resuming at step `s` continues the stream.
    """
    n = len(data.ids)
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(n)
    idx = np.resize(order[i * batch_size :], batch_size)  # wraps when n < batch_size
    return data.ids[idx], data.mask[idx], int(data.lengths[idx].sum())


def masked_loss(logits, ids, mask):
    """Mean next-token cross-entropy over the target tokens (`mask[:, t] == 1`)."""
    import jax.numpy as jnp
    import optax

    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:]
    )
    m = mask[:, 1:]
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)
