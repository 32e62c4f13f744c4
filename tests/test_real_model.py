"""The engine on real pretrained weights: SmolLM2-135M-Instruct (30 Llama layers, GQA, tied embeddings,
vocabulary 49152), on completions the model itself sampled from chat prompts.

Random-weight models have flat, structureless activations; trained weights have outlier features, peaked
softmaxes and a real tied head, which is where an approximation or a missed path would show. Each check is
against the per-completion autograd oracle. The model comes from the 'real' extra (``vigor.pretrained``);
kept to one small batch so the module runs in about a minute on 2 cores.
"""

from __future__ import annotations

import pytest
import torch

import vigor
import vigor_kernels as vk
from vigor.trainer.config import SamplingSettings
from vigor.trainer.sampling import sample_rollouts

FP32_RTOL = 1e-4
BF16_RTOL = 2e-2
GROUP_SIZE = 2
MAX_NEW = 8
QUESTIONS = ("What is 12 + 35?", "Name one colour of the rainbow.")
CPU_BACKENDS = ("torch", "cpp")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-30)).max())


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM

    from vigor.trainer.tokenizer import load_tokenizer

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    return model, load_tokenizer(str(smollm2_path))


@pytest.fixture(scope="module")
def rollouts(smollm2):
    """GROUP_SIZE completions per chat prompt sampled at temperature 1, each then cut to its own length
    (real text, ragged as GRPO batches are: 2 to MAX_NEW tokens, right-padded)."""
    model, tokenizer = smollm2
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in QUESTIONS
    ]
    cfg = SamplingSettings(group_size=GROUP_SIZE, max_new_tokens=MAX_NEW, mask_truncated_completions=False)
    torch.manual_seed(0)
    r = sample_rollouts(model, tokenizer, prompts, cfg, device=torch.device("cpu"), add_special_tokens=False)
    ids, attn, loss = r.input_ids.clone(), r.attention_mask.clone(), r.loss_mask.clone()
    lengths = torch.linspace(MAX_NEW, 2, ids.shape[0]).round().long()
    for b, n in enumerate(lengths.tolist()):
        n = min(n, int(loss[b].sum()))  # a completion that ended early keeps its own end
        cut = r.prompt_width + n
        ids[b, cut:], attn[b, cut:], loss[b, cut:] = tokenizer.pad_token_id, 0, False
    return ids, attn, loss


@pytest.fixture(scope="module")
def oracle_fp32(smollm2, rollouts):
    return vigor.oracle_grad_norms(smollm2[0], *rollouts)


def require_backend(backend: str) -> None:
    status = vk.available_backends()[backend]
    if not status.available:
        pytest.skip(f"backend {backend}: {status}")


def test_real_weights_and_chat_template_are_what_we_expect(smollm2, rollouts):
    """Guards the fixture itself: a real instruct model (tied head, chat template, sensible loss), not
    random weights, and completions that vary in length, so the exactness tests below test something."""
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    ids, attn, loss = rollouts
    counts = loss.sum(1)
    assert (counts > 0).all() and len(set(counts.tolist())) > 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits[loss[:, 1:]], ids[:, 1:][loss[:, 1:]])
    # its own samples at temperature 1 cost about the entropy (a random model: ln 49152 = 10.8)
    assert float(nll) < 4.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_full_parameters_fp32_match_oracle(smollm2, rollouts, oracle_fp32, backend):
    """Every parameter (tied embedding/head included) on real weights: within 1e-4 of the oracle."""
    require_backend(backend)
    got = vigor.per_sample_grad_norms(smollm2[0], *rollouts, backend=backend)
    assert (oracle_fp32 > 0).all()
    assert rel_err(got, oracle_fp32) <= FP32_RTOL, (got, oracle_fp32)


@pytest.fixture(scope="module")
def lora_model_and_oracle(smollm2, rollouts):
    """peft LoRA adapters on attention and MLP projections of the real model (B made non-zero, so that
    the adapters' gradients are not the degenerate B = 0 case), and the oracle's norms over them."""
    peft = pytest.importorskip("peft")
    import copy

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = peft.get_peft_model(copy.deepcopy(smollm2[0]), config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model, vigor.oracle_grad_norms(model, *rollouts)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lora_adapters_fp32_match_oracle(lora_model_and_oracle, rollouts, backend):
    """theta = the LoRA adapters only, on real weights: within 1e-4 of the oracle."""
    require_backend(backend)
    model, want = lora_model_and_oracle
    got = vigor.per_sample_grad_norms(model, *rollouts, backend=backend)
    assert (want > 0).all()
    assert rel_err(got, want) <= FP32_RTOL, (got, want)


def test_bf16_within_tolerance_and_same_ranking(smollm2, rollouts):
    """The real model cast to bfloat16: the engine (default CPU backend) within 2e-2 of the oracle on the
    same bf16 model, and the same order inside each group for every pair the tolerance cannot blur.
    bfloat16 matmuls are emulated on CPUs without bf16 units (several times slower), so theta is the last
    two blocks and the final norm: the backward stops there, the forward is the whole bf16 model."""
    import copy

    model = copy.deepcopy(smollm2[0]).to(torch.bfloat16)
    last = model.config.num_hidden_layers - 1
    top = (f"model.layers.{last - 1}.", f"model.layers.{last}.", "model.norm.")
    names = [n for n, _ in model.named_parameters() if n.startswith(top)]
    got = vigor.per_sample_grad_norms(model, *rollouts, params=names)
    want = vigor.oracle_grad_norms(model, *rollouts, params=names)
    assert (want > 0).all()
    assert rel_err(got, want) <= BF16_RTOL, (got, want)
    for g in range(len(QUESTIONS)):
        e, o = got[g * GROUP_SIZE : (g + 1) * GROUP_SIZE], want[g * GROUP_SIZE : (g + 1) * GROUP_SIZE]
        for i in range(GROUP_SIZE):
            for j in range(GROUP_SIZE):
                if o[i] > o[j] * (1 + 2 * BF16_RTOL):
                    assert e[i] > e[j], (g, i, j, e, o)


def test_shipped_smollm2_config_finds_the_converted_model(smollm2_path, tmp_path):
    """``model.name: smollm2`` (configs/smollm2-lora.yaml) names the converted copy, not a directory called
    smollm2: the trainer's source check accepts it and the tokenizer loads from it (the slow training test
    runs the whole config)."""
    from pathlib import Path

    from vigor.trainer import load_config
    from vigor.trainer.model import build_tokenizer, check_model_source, model_dir

    config = Path(__file__).resolve().parent.parent / "configs" / "smollm2-lora.yaml"
    cfg = load_config(config, [f"run.dir={tmp_path / 'run'}"])
    assert cfg.model.name == "smollm2" and not Path("smollm2").exists()
    assert check_model_source(cfg) is None and Path(model_dir(cfg)) == smollm2_path
    assert build_tokenizer(cfg).chat_template
