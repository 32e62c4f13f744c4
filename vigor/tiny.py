"""Tiny random-weight models of several families, a character tokenizer, and GRPO-shaped random batches.

No hub access is needed: models are built from configs, the tokenizer from printable ASCII. The CLI
(``vigor verify``, ``vigor score`` without a model), the trainer's ``tiny-<family>`` models, the TRL example,
the tests and the benchmarks use them; also handy for checking the engine on one's own machine.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FAMILIES = ("qwen2", "qwen2-untied", "llama", "qwen3", "gemma", "gpt2")

# Layer shapes of real checkpoints (random weights here): hidden, intermediate, heads, kv heads, vocab, tied.
PRESETS = {
    "qwen2.5-0.5b": dict(hidden=896, intermediate=4864, heads=14, kv_heads=2, vocab=151936, layers=24, tied=True),
    "qwen2.5-1.5b": dict(hidden=1536, intermediate=8960, heads=12, kv_heads=2, vocab=151936, layers=28, tied=True),
    "qwen2.5-7b": dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064, layers=28, tied=False),
}


def preset_config(name: str, *, layers: int | None = None, vocab: int | None = None):
    """A Qwen2 config with the layer shapes of ``name`` (fewer layers / a smaller vocab on request)."""
    import transformers as tf

    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}': choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    return tf.Qwen2Config(
        vocab_size=vocab or p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=layers or p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        tie_word_embeddings=p["tied"],
        max_position_embeddings=32768,
    )


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


MOE_FAMILIES = ("qwen3-moe", "qwen2-moe", "mixtral", "gpt-oss")


def moe_config(
    family: str, *, experts: int = 4, top_k: int = 2, vocab: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4
):
    """A transformers mixture-of-experts config of ``family`` with small dimensions."""
    import transformers as tf

    decoder = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
    )
    expert = 8 * (hidden * 5 // 64 + 1)  # not a power of two on purpose; 16-byte rows for torch._grouped_mm
    if family == "qwen3-moe":
        return tf.Qwen3MoeConfig(
            **decoder, head_dim=hidden // heads, moe_intermediate_size=expert, num_experts=experts,
            num_experts_per_tok=top_k, intermediate_size=hidden * 2,
        )  # fmt: skip
    if family == "qwen2-moe":
        return tf.Qwen2MoeConfig(
            **decoder, moe_intermediate_size=expert, shared_expert_intermediate_size=hidden + 4, num_experts=experts,
            num_experts_per_tok=top_k, intermediate_size=hidden * 2,
        )  # fmt: skip
    if family == "mixtral":
        return tf.MixtralConfig(
            **decoder, intermediate_size=expert, num_local_experts=experts, num_experts_per_tok=top_k
        )
    if family == "gpt-oss":
        return tf.GptOssConfig(
            **decoder, head_dim=hidden // heads, intermediate_size=expert, num_local_experts=experts,
            num_experts_per_tok=top_k, sliding_window=8,
        )  # fmt: skip
    raise ValueError(f"unknown MoE family '{family}': choose one of {MOE_FAMILIES}")


def random_model(config, *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu", attn="eager") -> nn.Module:
    """A random-weight causal LM from ``config``, built directly in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


def tiny_model(family: str = "qwen2", *, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes) -> nn.Module:
    return random_model(tiny_config(family, **sizes), seed=seed, dtype=dtype)


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


SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>")
BOS = "<bos>"  # appended after the characters, so that every other id is the same with or without it
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(*, bos: bool = False) -> PreTrainedTokenizerBase:
    """One token per printable ASCII character (space and newline included; others map to ``<unk>``), plus
    ``<pad>``, ``<eos>`` and role tokens for a chat template (``<|role|>content`` lines).

    ``bos=True`` adds a ``<bos>`` token that plain-text encoding prepends (with ``add_special_tokens``, as
    most real tokenizers do) and the chat template starts with, so that code forgetting either shows up as
    different ids; the trainer's default (``"chars"``) has none.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars, *([BOS] if bos else [])])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        **({"bos_token": BOS} if bos else {}),
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
    )
    tok.chat_template = ("{{ bos_token }}" if bos else "") + CHAT_TEMPLATE
    return tok
