"""Model presets shaped like Qwen2.5 models (random weights), SmolLM2-135M-Instruct (real weights), and
GRPO-shaped ragged batches.

No weights are downloaded: a preset is a Qwen2 config with the real model's widths, heads and
vocabulary; ``layers`` and ``vocab`` may be reduced (the benchmark records both the real and the used
values). Qwen2 has biases on q/k/v and none elsewhere, RMSNorm weights, and ties the embedding to the LM
head in the 0.5B and 1.5B models (not in 7B).

``smollm2-135m`` is the real pretrained model (Llama architecture, 30 layers, tied embeddings), from the
'real' extra (``vigor.pretrained.smollm2_dir``): its vocabulary cannot be reduced; ``layers`` keeps the
first layers; its untied twin (Opacus) carries the embedding's values in a separate LM head matrix.

Completion lengths are drawn like real GRPO groups: log-normal with median ``T_max / 2`` and
``sigma = 0.6``, rounded and clipped to ``[1, T_max]``. With that spread about 12% of the group reaches
``T_max`` (completions truncated at the length cap, as a fraction of samples always are in GRPO runs
on math) and the shortest are a few times shorter than the median. ``fixed`` makes every completion
``T_max`` long (the worst case for padding-free kernels, the best case for padded ones).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vigor.tiny import PRESETS as REAL_SHAPES

LENGTH_DISTS = ("lognormal", "fixed")
LOGNORMAL_MEDIAN_FRACTION = 0.5
LOGNORMAL_SIGMA = 0.6


@dataclass(frozen=True)
class ModelPreset:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int  # depth of the real model
    vocab: int  # vocabulary of the real model
    tied: bool  # input embedding tied to the LM head
    # mixture of experts (Qwen3-MoE architecture) when experts > 0: routed experts per layer, experts
    # per token, each expert's intermediate width, and the attention head width
    experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    head_dim: int = 0
    weights: str | None = None  # "smollm2": real pretrained weights (vigor.pretrained); None: random Qwen2


PRESETS = {
    # the real models' shapes, from the package's table (vigor.tiny.PRESETS)
    **{
        name: ModelPreset(
            name, s["hidden"], s["intermediate"], s["heads"], s["kv_heads"], s["layers"], s["vocab"], s["tied"]
        )
        for name, s in REAL_SHAPES.items()
    },
    # Seconds-long smoke runs of the same code path (tests): same structure, toy widths.
    "tiny": ModelPreset("tiny", 64, 176, 4, 2, 2, 512, True),
    "tiny-untied": ModelPreset("tiny-untied", 64, 176, 4, 2, 2, 512, False),
    "smollm2-135m": ModelPreset("smollm2-135m", 576, 1536, 9, 3, 30, 49152, True, weights="smollm2"),
    # Qwen3-30B-A3B's layer widths (hidden 2048, 32 heads of 128, 4 KV heads, experts 768 wide) with 8
    # experts, 2 per token, instead of 128 and 8: the same share of experts per token would leave a
    # CPU-sized batch with a handful of tokens per expert
    "qwen3-moe-small": ModelPreset("qwen3-moe-small", 2048, 6144, 32, 4, 48, 151936, False, 8, 2, 768, 128),
}


@dataclass(frozen=True)
class ModelSpec:
    """A preset as actually built: possibly fewer layers, a smaller vocabulary, untied."""

    preset: ModelPreset
    layers: int
    vocab: int
    tied: bool

    @classmethod
    def of(
        cls, preset: ModelPreset, layers: int | None = None, vocab: int | None = None, untie: bool = False
    ) -> ModelSpec:
        if layers is not None and not 1 <= layers <= preset.layers:
            raise ValueError(f"--layers must be in [1, {preset.layers}] for {preset.name}, got {layers}")
        if vocab is not None and not 2 <= vocab <= preset.vocab:
            raise ValueError(f"--vocab must be in [2, {preset.vocab}] for {preset.name}, got {vocab}")
        if preset.weights and vocab not in (None, preset.vocab):
            raise ValueError(f"{preset.name} has real weights: its vocabulary ({preset.vocab}) cannot be reduced")
        return cls(preset, layers or preset.layers, vocab or preset.vocab, preset.tied and not untie)

    def untied(self) -> ModelSpec:
        return ModelSpec(self.preset, self.layers, self.vocab, False)

    def config(self):
        from transformers import AutoConfig, Qwen2Config, Qwen3MoeConfig

        p = self.preset
        if p.weights:
            return AutoConfig.from_pretrained(
                real_weights_dir(p), num_hidden_layers=self.layers, tie_word_embeddings=self.tied
            )
        common = dict(
            vocab_size=self.vocab,
            hidden_size=p.hidden,
            intermediate_size=p.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=p.heads,
            num_key_value_heads=p.kv_heads,
            max_position_embeddings=32768,
            tie_word_embeddings=self.tied,
            attention_dropout=0.0,  # Opacus scores in train() mode: no dropout anywhere
            rms_norm_eps=1e-6,
        )
        if p.experts:
            return Qwen3MoeConfig(
                **common,
                moe_intermediate_size=p.expert_intermediate,
                num_experts=p.experts,
                num_experts_per_tok=p.top_k,
                head_dim=p.head_dim,
            )
        return Qwen2Config(**common)

    def describe(self) -> dict:
        p = self.preset
        return {
            **asdict(p),
            "used_layers": self.layers,
            "used_vocab": self.vocab,
            "used_tied": self.tied,
            "reduced": self.layers < p.layers or self.vocab < p.vocab,
        }

    def label(self) -> str:
        parts = [self.preset.name]
        if self.layers < self.preset.layers:
            parts.append(f"{self.layers}/{self.preset.layers} layers")
        if self.vocab < self.preset.vocab:
            parts.append(f"vocab {self.vocab}")
        if self.preset.tied and not self.tied:
            parts.append("untied")
        return ", ".join(parts)


def build_model(
    spec: ModelSpec, *, dtype: torch.dtype, device: torch.device, attn: str = "sdpa", seed: int = 0
) -> nn.Module:
    """The causal LM of ``spec`` on ``device``, in eval mode: random weights initialized directly there, or
    a preset's real weights (the first ``spec.layers`` layers)."""
    from transformers import AutoModelForCausalLM

    if spec.preset.weights:
        return _real_model(spec, dtype=dtype, device=device, attn=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(spec.config(), attn_implementation=attn, dtype=dtype)
    return model.eval()


def real_weights_dir(preset: ModelPreset):
    from vigor.pretrained import smollm2_dir

    if preset.weights != "smollm2":
        raise ValueError(f"{preset.name}: no real weights named {preset.weights!r}")
    return smollm2_dir("float32")


def _real_model(spec: ModelSpec, *, dtype: torch.dtype, device: torch.device, attn: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        real_weights_dir(spec.preset), config=spec.config(), dtype=dtype, attn_implementation=attn,
        output_loading_info=True,
    )  # fmt: skip
    # untied: the head is absent from the checkpoint (stored once, tied); it gets the embedding's values
    missing = set(info["missing_keys"]) - ({"lm_head.weight"} if not spec.tied else set())
    if missing:
        raise ValueError(f"{spec.preset.name}: weights missing from the checkpoint: {sorted(missing)[:4]}")
    if not spec.tied:
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    return model.to(device).eval()


def completion_lengths(n: int, t_max: int, dist: str, generator: torch.Generator) -> list[int]:
    """``n`` completion lengths in ``[1, t_max]`` (see the module docstring for the distributions)."""
    if dist == "fixed":
        return [t_max] * n
    if dist != "lognormal":
        raise ValueError(f"length distribution must be one of {LENGTH_DISTS}, got '{dist}'")
    normal = torch.randn(n, generator=generator, dtype=torch.float64)
    raw = torch.exp(math.log(LOGNORMAL_MEDIAN_FRACTION * t_max) + LOGNORMAL_SIGMA * normal)
    return [int(v) for v in raw.round().clamp(1, t_max).tolist()]


@dataclass(frozen=True)
class GrpoBatch:
    input_ids: torch.Tensor  # [B, P + T_max]
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    prompt_lengths: list[int]  # one per group
    completion_lengths: list[int]  # one per sequence

    def describe(self) -> dict:
        return {
            "shape": list(self.input_ids.shape),
            "prompt_lengths": self.prompt_lengths,
            "completion_lengths": self.completion_lengths,
            "loss_tokens": sum(self.completion_lengths),
            "padded_tokens": self.input_ids.numel(),
            "attended_tokens": int(self.attention_mask.sum()),
        }


def grpo_batch(
    vocab: int,
    *,
    groups: int,
    group_size: int,
    prompt_len: int,
    t_max: int,
    dist: str = "lognormal",
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> GrpoBatch:
    """``groups`` prompts, each followed by ``group_size`` sampled completions: prompts left-padded to
    a common width (the first group's prompt has ``prompt_len`` tokens, the others between half and all
    of it), completions of ragged length right-padded to ``t_max``."""
    if groups < 1 or group_size < 1 or prompt_len < 1 or t_max < 1:
        raise ValueError("groups, group_size, prompt_len and t_max must all be >= 1")
    gen = torch.Generator().manual_seed(seed)
    shortest = max(1, prompt_len // 2)
    others = [int(torch.randint(shortest, prompt_len + 1, (1,), generator=gen)) for _ in range(groups - 1)]
    prompts = [prompt_len, *others]
    lengths = completion_lengths(groups * group_size, t_max, dist, gen)
    size, width = groups * group_size, prompt_len + t_max
    input_ids = torch.randint(0, vocab, (size, width), generator=gen)
    attention = torch.zeros(size, width, dtype=torch.int64)
    loss = torch.zeros(size, width, dtype=torch.int64)
    for i, n in enumerate(lengths):
        start = prompt_len - prompts[i // group_size]
        attention[i, start : prompt_len + n] = 1
        loss[i, prompt_len : prompt_len + n] = 1
    # Rows of one group share their prompt; padding holds token 0.
    for g in range(groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        input_ids[rows, :prompt_len] = input_ids[g * group_size, :prompt_len]
    input_ids = input_ids * attention
    return GrpoBatch(input_ids.to(device), attention.to(device), loss.to(device), prompts, lengths)
