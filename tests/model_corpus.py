"""The model corpus: tiny random-weight causal LMs of many transformers families, each with the outcome
the engine owes it: ``exact`` (within fp32 1e-4 of an independent per-sample reference) or ``refused``
(``vigor.UnsupportedModuleError`` naming the reason). A number that disagrees with the reference is
never an acceptable outcome.

``python -m tests.model_corpus --markdown`` runs the corpus and prints the table of
docs/model-families.md (``--out docs/model-families.md`` writes it); ``--worklist`` adds the expected
status and the engine's full message (tests/corpus_report_main.md).
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

if __package__:
    from .corpus_reference import Outcome, judge
else:
    from corpus_reference import Outcome, judge

SEED = 0
VOCAB = 160
LAYOUTS = ("left", "right")  # left-padded prompts + right-padded completions | right padding only


@dataclass(frozen=True)
class CorpusEntry:
    name: str
    build: Callable[[], nn.Module]
    status: str  # "exact" | "refused": what the engine owes this model with its default settings
    reason: str = ""  # why it is refused (shown in docs/model-families.md)
    match: str = ""  # regex the refusal message must match (case-insensitive): it names the culprit


def _from_config(config_name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as tf

        # special tokens inside the tiny vocabulary (the defaults of several families are not)
        config = getattr(tf, config_name)(**{"bos_token_id": 1, "eos_token_id": 2, **kwargs})
        torch.manual_seed(SEED)
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return model.eval()

    return build


def _decoder(config_name: str, **overrides) -> Callable[[], nn.Module]:
    """A Llama-style config: 2 layers, hidden 32, 4 heads (2 KV heads), intermediate 50."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=50,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return _from_config(config_name, **kwargs)


def _with_lora(build: Callable[[], nn.Module], **lora) -> Callable[[], nn.Module]:
    def wrapped() -> nn.Module:
        from peft import LoraConfig, get_peft_model

        base = build()
        torch.manual_seed(SEED + 1)
        # init_lora_weights=False: random B as well as A, so that lora_A has a non-zero gradient
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)
        return get_peft_model(base, config).eval()

    return wrapped


_MAMBA = dict(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, time_step_rank=4)
_MAMBA_MATCH = r"A_log|\bD\b|conv1d|Mixer"

CORPUS: tuple[CorpusEntry, ...] = (
    CorpusEntry("llama", _decoder("LlamaConfig", tie_word_embeddings=False), "exact"),
    CorpusEntry(
        "llama-lora",
        _with_lora(_decoder("LlamaConfig"), target_modules=["q_proj", "v_proj", "down_proj"]),
        "exact",
    ),
    CorpusEntry("mistral", _decoder("MistralConfig", sliding_window=8), "exact"),
    CorpusEntry("qwen2-tied", _decoder("Qwen2Config", tie_word_embeddings=True), "exact"),
    CorpusEntry("qwen2-untied", _decoder("Qwen2Config", tie_word_embeddings=False), "exact"),
    CorpusEntry("qwen3", _decoder("Qwen3Config", head_dim=8, tie_word_embeddings=True), "exact"),
    CorpusEntry("gemma", _decoder("GemmaConfig", head_dim=8), "exact"),
    CorpusEntry("gemma2", _decoder("Gemma2Config", head_dim=8, sliding_window=8), "exact"),
    CorpusEntry("gemma3-text", _decoder("Gemma3TextConfig", head_dim=8, sliding_window=8), "exact"),
    CorpusEntry("phi", _decoder("PhiConfig", partial_rotary_factor=0.5), "exact"),
    CorpusEntry("phi3", _decoder("Phi3Config", pad_token_id=0), "exact"),
    CorpusEntry(
        "gpt2", _from_config("GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64), "exact"
    ),
    CorpusEntry(
        "gpt-j",
        _from_config("GPTJConfig", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
        "exact",
    ),
    CorpusEntry(
        "gpt-neo",
        _from_config(
            "GPTNeoConfig",
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
            max_position_embeddings=64,
        ),
        "exact",
    ),
    CorpusEntry(
        "gpt-neox",
        _decoder("GPTNeoXConfig", intermediate_size=64, rotary_pct=0.25, num_key_value_heads=None),
        "exact",
    ),
    CorpusEntry(
        "gpt-bigcode",
        _from_config("GPTBigCodeConfig", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "exact",
    ),
    CorpusEntry(
        "opt",
        _from_config(
            "OPTConfig",
            vocab_size=VOCAB,
            hidden_size=32,
            word_embed_proj_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            max_position_embeddings=64,
        ),
        "exact",
    ),
    CorpusEntry(
        "biogpt",
        _from_config(
            "BioGptConfig",
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        "exact",
    ),
    CorpusEntry("bloom", _from_config("BloomConfig", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4), "exact"),
    CorpusEntry(
        "falcon-old",
        _decoder("FalconConfig", new_decoder_architecture=False, alibi=True, num_kv_heads=None),
        "exact",
    ),
    CorpusEntry(
        "falcon-new",
        _decoder("FalconConfig", new_decoder_architecture=True, alibi=False, num_kv_heads=2),
        "exact",
    ),
    CorpusEntry("stablelm", _decoder("StableLmConfig", partial_rotary_factor=0.25), "exact"),
    CorpusEntry("olmo", _decoder("OlmoConfig", pad_token_id=0), "exact"),
    CorpusEntry("olmo2", _decoder("Olmo2Config", pad_token_id=0), "exact"),
    CorpusEntry(
        "granite",
        _decoder(
            "GraniteConfig",
            embedding_multiplier=4.0,
            logits_scaling=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.2,
        ),
        "exact",
    ),
    CorpusEntry("starcoder2", _decoder("Starcoder2Config", intermediate_size=64), "exact"),
    CorpusEntry(
        "mpt",
        _from_config(
            "MptConfig", vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64
        ),
        "exact",
    ),
    CorpusEntry(
        "codegen",
        _from_config("CodeGenConfig", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
        "exact",
    ),
    CorpusEntry("cohere", _decoder("CohereConfig", logit_scale=0.5, pad_token_id=0), "exact"),
    CorpusEntry(
        "mixtral",
        _decoder(
            "MixtralConfig", intermediate_size=36, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
        ),
        "exact",
    ),
    CorpusEntry(
        "qwen3-moe",
        _decoder(
            "Qwen3MoeConfig",
            head_dim=8,
            moe_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            intermediate_size=48,
        ),
        "exact",
    ),
    CorpusEntry(
        "qwen2-moe",
        _decoder(
            "Qwen2MoeConfig",
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=4,
            num_experts_per_tok=2,
            intermediate_size=48,
        ),
        "exact",
    ),
    CorpusEntry(
        "gpt-oss",
        _decoder(
            "GptOssConfig",
            head_dim=8,
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
        ),
        "refused",
        reason="attention sinks (a learned per-head logit in the softmax) have no rule; experts and router are exact",
        match=r"sinks",
    ),
    CorpusEntry(
        "recurrent-gemma",
        _from_config(
            "RecurrentGemmaConfig",
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            lru_width=32,
            attention_window_size=16,
            block_types=("recurrent", "attention"),
            pad_token_id=0,
        ),
        "refused",
        reason="RG-LRU parameters and the temporal Conv1d have no rule",
        match=r"rg_lru|recurrent_param|input_gate|Rglru|conv_1d|Conv1d",
    ),
    CorpusEntry(
        "mamba",
        _from_config("MambaConfig", **_MAMBA),
        "refused",
        reason="Mamba mixer parameters (A_log, D, conv1d) have no rule",
        match=_MAMBA_MATCH,
    ),
    CorpusEntry(
        "falcon-mamba",
        _from_config("FalconMambaConfig", **_MAMBA),
        "refused",
        reason="Mamba mixer parameters (A_log, D, conv1d) have no rule",
        match=_MAMBA_MATCH,
    ),
)

BY_NAME = {e.name: e for e in CORPUS}


def pad_id(model: nn.Module) -> int:
    """The id padded positions hold: the model's pad token when it has one in range, else 0."""
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    vocab = model.get_input_embeddings().weight.shape[0]
    return pad if isinstance(pad, int) and 0 <= pad < vocab else 0


def corpus_batch(
    vocab: int, layout: str, *, pad: int = 0, groups: int = 2, group_size: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, loss_mask)``: ``groups`` prompts of different lengths, each with
    ``group_size`` completions of ragged lengths; the last completion of the first group is empty (no
    loss token). ``layout`` ``left``: prompts left-padded to a common width, completions right-padded
    after it (TRL's layout). ``right``: each prompt + completion starts at column 0, right-padded."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got '{layout}'")
    gen = torch.Generator().manual_seed(seed)
    prompt_lengths = [3 + 2 * g for g in range(groups)]  # all different, so left padding is real
    prompts = [torch.randint(0, vocab, (n,), generator=gen) for n in prompt_lengths]
    completions = []
    for i in range(groups * group_size):
        n = 0 if i == group_size - 1 else int(torch.randint(2, 8, (1,), generator=gen))
        completions.append(torch.randint(0, vocab, (n,), generator=gen))
    width_p = max(prompt_lengths)
    width_c = max(len(c) for c in completions)
    width = width_p + width_c
    size = groups * group_size
    ids = torch.full((size, width), pad, dtype=torch.int64)
    attn = torch.zeros(size, width, dtype=torch.int64)
    loss = torch.zeros(size, width, dtype=torch.int64)
    for i, comp in enumerate(completions):
        prompt = prompts[i // group_size]
        start = width_p - len(prompt) if layout == "left" else 0
        mid = start + len(prompt)
        ids[i, start:mid] = prompt
        ids[i, mid : mid + len(comp)] = comp
        attn[i, start : mid + len(comp)] = 1
        loss[i, mid : mid + len(comp)] = 1
    return ids, attn, loss


_MODELS: dict[str, nn.Module] = {}


def corpus_model(name: str) -> nn.Module:
    """The entry's model, built once per process (entries are pure functions of the seed)."""
    if name not in _MODELS:
        _MODELS[name] = BY_NAME[name].build()
    return _MODELS[name]


def run_entry(entry: CorpusEntry, layout: str, **engine_kw) -> Outcome:
    model = corpus_model(entry.name)
    ids, attn, loss = corpus_batch(model.get_input_embeddings().weight.shape[0], layout, pad=pad_id(model))
    return judge(model, ids, attn, loss, **engine_kw)


def _err(outcome: Outcome, *, split: bool = False) -> str:
    if outcome.status not in ("exact", "wrong") or not math.isfinite(outcome.max_err):
        return "-"
    if split:  # the worklist: norms / worst parameter
        return f"{outcome.norm_err:.1e} / {outcome.param_err:.1e}"
    return f"{outcome.max_err:.1e}"


def _status(outcomes: list[Outcome]) -> str:
    """One word for several layouts: the worst of them."""
    order = ("crash", "wrong", "refused", "exact")
    return min((o.status for o in outcomes), key=order.index)


def _note(outcomes: list[Outcome], width: int) -> str:
    notes = []
    for layout, o in zip(LAYOUTS, outcomes, strict=True):
        if o.status == "wrong":
            notes.append(f"{layout}: worst `{o.worst_param}`")
        elif o.status in ("refused", "crash") and o.message not in notes:
            notes.append(o.message)
    text = "; ".join(notes).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 3] + "..."


def markdown_table(results: dict[str, list[Outcome]], fallback: dict[str, list[Outcome]] | None = None) -> str:
    """The docs table; with ``fallback`` (outcomes of the refused entries with ``fallback=True``) the
    worklist: expected vs observed, norms / worst-parameter errors and full messages."""
    if fallback is None:
        lines = [
            "| family | status | max rel err (left pad) | max rel err (right pad) | reason if refused |",
            "|---|---|---|---|---|",
        ]
        for name, outcomes in results.items():
            status = _status(outcomes)
            reason = BY_NAME[name].reason if status == "refused" else _note(outcomes, 160)
            lines.append(f"| {name} | {status} | {' | '.join(_err(o) for o in outcomes)} | {reason} |")
        return "\n".join(lines) + "\n"
    lines = [
        "| family | expected | observed | rel err left (norms / worst param) | rel err right | message "
        "| with fallback=True |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, outcomes in results.items():
        errs = " | ".join(_err(o, split=True) for o in outcomes)
        fb = fallback.get(name)
        fb_text = "" if fb is None else f"{_status(fb)} {' / '.join(_err(o) for o in fb)} {_note(fb, 200)}".strip()
        lines.append(
            f"| {name} | {BY_NAME[name].status} | {_status(outcomes)} | {errs} | {_note(outcomes, 400)} | {fb_text} |"
        )
    return "\n".join(lines) + "\n"


def _run_safely(entry: CorpusEntry, layout: str, **engine_kw) -> Outcome:
    """``run_entry``, with a failure of the model or the reference itself reported as a crash."""
    try:
        return run_entry(entry, layout, **engine_kw)
    except Exception as err:
        return Outcome("crash", message=f"outside the engine: {type(err).__name__}: {err}".replace("\n", " ")[:400])


def _provenance() -> str:
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (
        f"commit {commit}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{platform.machine()} CPU, float32"
    )


HEADER = """# Model families

Generated by `python -m tests.model_corpus --markdown --out docs/model-families.md` ({provenance}); do not
edit by hand. Every family is a tiny random-weight model of the real architecture (2 layers, hidden
32, vocabulary {vocab}; `tests/model_corpus.py`), scored on 2 groups x 3 completions, one of them
empty, in two layouts: left-padded prompts + right-padded ragged completions (TRL's layout), and right
padding only. The error is the largest relative error against an independent per-sample autograd
reference (`tests/corpus_reference.py`), over the norms and over each parameter's squared norms; `exact`
means within 1e-4 in float32. `refused` means `vigor.UnsupportedModuleError` (pass `fallback=True` for
an exact, slow, per-sample autograd of the refused parameters). `tests/test_model_corpus.py` holds the
engine to this table's expectations.

"""


WORKLIST_HEADER = """# The corpus against the engine

Generated by `python -m tests.model_corpus --worklist` ({provenance}). Expected: what the engine owes
the family (`tests/model_corpus.py`); observed: what it did, the worse of the two layouts (left-padded
prompts + right-padded completions, right padding only). Errors are relative to an independent
per-sample reference: the norms' largest, then the worst parameter's squared norm (relative to that
parameter's largest value); exact means both within 1e-4. Refused families are also run with
`fallback=True`, which is documented as exact.

"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--markdown", action="store_true", help="print the docs/model-families.md table")
    mode.add_argument("--worklist", action="store_true", help="expected vs observed, with the full messages")
    parser.add_argument("--out", help="also write the output to this file (atomically)")
    parser.add_argument("--only", help="comma-separated family names (default: the whole corpus)")
    args = parser.parse_args(argv)
    names = [e.name for e in CORPUS] if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown families {unknown}; the corpus has {sorted(BY_NAME)}")
    from tqdm import tqdm

    results, fallback = {}, {}
    for name in tqdm(names, desc="corpus", file=sys.stderr):
        entry = BY_NAME[name]
        results[name] = [_run_safely(entry, layout) for layout in LAYOUTS]
        if args.worklist and entry.status == "refused":
            fallback[name] = [_run_safely(entry, layout, fallback=True) for layout in LAYOUTS]
    if args.worklist:
        text = WORKLIST_HEADER.format(provenance=_provenance()) + markdown_table(results, fallback)
    else:
        text = HEADER.format(provenance=_provenance(), vocab=VOCAB) + markdown_table(results)
    print(text, end="")
    if args.out:
        from vigor.atomic import write_text

        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
