"""An offline word-level tokenizer with BOS/EOS/PAD and a chat template, for tests and the TRL example.

Pairs with ``vigor.testing.tiny_model(vocab=len(tokenizer))``: no hub access anywhere. Plain-text encoding
prepends ``<bos>`` (so code that forgets TRL's ``add_special_tokens=True`` gets different ids), and the chat
template renders ``<bos> <|user|> ... <|end|> <|assistant|>``.
"""

from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_WORDS = "what is the sum of and plus minus times answer question number think step by so a b c x y z yes no"
WORDS = (*"0123456789", *"+-*=?.,", *_WORDS.split(" "))

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` over ``SPECIAL_TOKENS + ROLE_TOKENS + WORDS`` (unknown words map to ``<unk>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ROLE_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )
