"""The benchmark GPT in PyTorch with Hugging Face PEFT LoRA: the cross-framework row.

Same architecture as `gpt.GPT` (pre-LayerNorm blocks, separate query/key/value
projections, tanh GELU, learned positions, untied LM head), same LoRA config (r, alpha
= 2r, no dropout, query and value), same AdamW (lr 1e-4, weight decay 1e-4), same token
ids. Installed only with the `[torch]` extra; `available()` says whether it is.
"""

from __future__ import annotations

import importlib.util


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "peft"))


def device_for(jax_platform: str) -> str:
    """PyTorch's device for a run where JAX is on `jax_platform`."""
    import torch

    return "cuda" if jax_platform == "gpu" and torch.cuda.is_available() else "cpu"


def make_candidate(
    cfg,
    rank: int,
    ids_np,
    dtype_name: str = "float32",
    device: str = "cpu",
    use_dora: bool = False,
) -> dict:
    """A candidate for `run.bench_train`: `run(n)` takes n optimizer steps.

    `device` is "cpu" or "cuda" (where JAX runs on a GPU, the benchmark passes "cuda"
    when PyTorch sees one too). Returns a dict with `run`, `n_train` (trainable
    parameters), `opt_bytes` (AdamW state bytes after a step), `threads` (PyTorch's
    intra-op thread count) and `device`. `use_dora`: PEFT's DoRA instead of LoRA.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    d, heads = cfg.d, cfg.heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.query, self.key = nn.Linear(d, d), nn.Linear(d, d)
            self.value, self.out = nn.Linear(d, d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, _ = x.shape
            h = self.ln1(x)

            def split(y):
                return y.view(b, t, heads, d // heads).transpose(1, 2)

            q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(att.transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab, d)
            self.pos = nn.Parameter(torch.randn(cfg.seq, d) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.layers))
            self.ln = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, cfg.vocab)

        def forward(self, ids):
            x = self.embed(ids) + self.pos[: ids.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln(x))

    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["query", "value"],
        bias="none",
        use_dora=use_dora,
    )
    model = get_peft_model(GPT().to(device=device, dtype=dtype), lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4)
    ids = torch.tensor(ids_np, dtype=torch.long, device=device)

    def step():
        logits = model(ids)[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def run(n: int):
        for _ in range(n):
            loss = step()
        return loss.item()  # waits for the device: the steps are done when this returns

    run(1)
    opt_bytes = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    return {
        "run": run,
        "n_train": sum(p.numel() for p in trainable),
        "opt_bytes": opt_bytes,
        "threads": torch.get_num_threads(),
        "device": device,
    }
