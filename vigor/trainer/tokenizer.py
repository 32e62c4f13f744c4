"""Tokenizers the trainer can use offline: the built-in character-level one (:func:`vigor.tiny.char_tokenizer`,
``"chars"``), so the synthetic task and the tests need nothing from a hub, or a local directory. With a real
model, point ``model.name`` (and optionally ``model.tokenizer``) at a local Hugging Face directory.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from vigor.tiny import char_tokenizer


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
