"""Tiny random-weight models of several families and GRPO-shaped random batches.

No hub access is needed: models are built from configs. Used by the tests, ``vigor verify`` and the
benchmarks; also handy for users checking the engine on their own machine.
"""

from __future__ import annotations

import torch
from torch import nn

FAMILIES = ("qwen2", "qwen2-untied", "llama", "qwen3", "gemma", "gpt2")


def tiny_config(family: str, *, vocab: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4):
    """A transformers config of ``family`` with small dimensions (all from the real architectures)."""
    import transformers as tf

    decoder = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3 // 2 + 2,  # not a power of two on purpose
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
    )
    if family in ("qwen2", "qwen2-untied"):
        return tf.Qwen2Config(**decoder, tie_word_embeddings=family == "qwen2")
    if family == "llama":
        return tf.LlamaConfig(**decoder, tie_word_embeddings=False)
    if family == "qwen3":
        return tf.Qwen3Config(**decoder, head_dim=hidden // heads, tie_word_embeddings=True)
    if family == "gemma":
        return tf.GemmaConfig(**decoder, head_dim=hidden // heads)
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=512,
            bos_token_id=0,
            eos_token_id=1,
        )
    raise ValueError(f"unknown family '{family}': choose one of {FAMILIES}")


def tiny_model(family: str = "qwen2", *, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **sizes), attn_implementation="eager")
    return model.to(dtype).eval()


def group_batch(
    vocab: int,
    groups: int = 2,
    group_size: int = 4,
    prompt_lengths: tuple[int, int] = (3, 8),
    completion_lengths: tuple[int, int] = (1, 12),
    *,
    seed: int = 0,
    empty_completion: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, loss_mask)`` shaped like a GRPO batch: ``groups`` prompts, each
    repeated ``group_size`` times, left-padded to a common prompt width, followed by completions of
    ragged length right-padded to a common width. ``empty_completion`` makes the last completion empty."""
    lengths = torch.Generator().manual_seed(seed)
    tokens = torch.Generator().manual_seed(seed + 1)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=lengths))
    prompts = [torch.randint(0, vocab, (draw(*prompt_lengths),), generator=tokens) for _ in range(groups)]
    completions = [
        torch.randint(0, vocab, (draw(*completion_lengths),), generator=tokens) for _ in range(groups * group_size)
    ]
    if empty_completion:
        completions[-1] = completions[-1][:0]
    width_p = max(len(p) for p in prompts)
    width_c = max(1, max(len(c) for c in completions))
    size = groups * group_size
    input_ids = torch.zeros(size, width_p + width_c, dtype=torch.int64)
    attention = torch.zeros_like(input_ids)
    loss = torch.zeros_like(input_ids)
    for i, comp in enumerate(completions):
        prompt = prompts[i // group_size]
        start = width_p - len(prompt)
        input_ids[i, start:width_p] = prompt
        input_ids[i, width_p : width_p + len(comp)] = comp
        attention[i, start : width_p + len(comp)] = 1
        loss[i, width_p : width_p + len(comp)] = 1
    return input_ids.to(device), attention.to(device), loss.to(device)
