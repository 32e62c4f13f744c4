"""Tokenizers the trainer can use offline: a built-in character-level one, or a local directory.

The character tokenizer covers printable ASCII (one token per character, unknown characters map to
``<unk>``), with ``<pad>``, ``<eos>`` and a two-role chat template, so the synthetic task and the tests
need nothing from a hub. With a real model, point ``model.name`` (and optionally ``model.tokenizer``) at a
local Hugging Face directory instead.
"""

from __future__ import annotations

import string
from pathlib import Path

from transformers import PreTrainedTokenizerBase

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerBase:
    """One token per printable ASCII character (space and newline included), plus the special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """``"chars"``: the built-in tokenizer; otherwise a local directory holding a tokenizer."""
    if spec == "chars":
        return char_tokenizer()
    from transformers import AutoTokenizer

    if not Path(spec).is_dir():
        raise FileNotFoundError(
            f"tokenizer {spec!r} is not a local directory (no hub access: use 'chars' or a local model directory)"
        )
    tok = AutoTokenizer.from_pretrained(spec)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # generation pads finished rows; the loss mask ignores them
    return tok
