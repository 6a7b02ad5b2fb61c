"""Importable pieces of the Alpaca main job (`examples/alpaca.py`).

- `data`: Alpaca-format records, prompt templates, tokenization and loss masks.
- `model`: a GPT-2-architecture causal LM in Flax Linen, with a KV cache for generation.
- `gpt2`: read and write GPT-2 checkpoints in the Hugging Face layout.
- `llama`: a Llama-family model (Llama, Qwen2, Mistral names) and its Hugging Face
  checkpoint loader.
- `world`: the generated pretraining corpus and the shipped instruction sample.
- `base`: pretrain the small embedded base model and cache it on disk.
"""
