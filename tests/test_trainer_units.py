"""The trainer's pieces on cases worked out by hand: the GRPO loss, gradient accumulation, completion
masks, the LR schedule, configuration errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

from vigor.tiny import char_tokenizer, tiny_model
from vigor.trainer.config import ConfigError, GRPOSettings, config_from_dict, load_config, parse_overrides
from vigor.trainer.grpo import completion_logprobs, grpo_loss
from vigor.trainer.loop import lr_factor
from vigor.trainer.sampling import assemble, completion_masks

# -- the GRPO loss -------------------------------------------------------------------------------------------


def test_clipped_surrogate_by_hand():
    # row 0: A = +1, ratios 1.5 (clipped to 1.2) and 1.0; row 1: A = -1, ratio 1.5 (not clipped: min picks 1.5)
    logp = torch.log(torch.tensor([[1.5, 1.0], [1.5, 1.0]]))
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    cfg = GRPOSettings(epsilon=0.2)
    # per-token losses: row 0 (-1.2, -1.0), row 1 (+1.5, masked)
    grpo = grpo_loss(logp, old, None, adv, mask, cfg, denominator=2)
    assert grpo.loss.item() == pytest.approx(((-1.2 - 1.0) / 2 + 1.5 / 1) / 2)
    assert grpo.clipped_tokens == 1.0  # only row 0's first token hit the clip
    token = grpo_loss(logp, old, None, adv, mask, GRPOSettings(epsilon=0.2, loss_type="token"), denominator=3)
    assert token.loss.item() == pytest.approx((-1.2 - 1.0 + 1.5) / 3)
    high = grpo_loss(logp, old, None, adv, mask, GRPOSettings(epsilon=0.2, epsilon_high=0.6), denominator=2)
    assert high.loss.item() == pytest.approx(((-1.5 - 1.0) / 2 + 1.5) / 2) and high.clipped_tokens == 0.0


def test_kl_term_by_hand():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    cfg = GRPOSettings(kl_coef=0.1)
    parts = grpo_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 1), cfg, denominator=1)
    kl = 0.5 - math.log(0.5) - 1  # exp(ref - logp) - (ref - logp) - 1 with ref - logp = log(1/2)
    assert parts.kl_sum == pytest.approx(kl) and parts.loss.item() == pytest.approx(0.1 * kl)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, logp, None, torch.zeros(1), torch.ones(1, 1), cfg, denominator=1)


@pytest.mark.parametrize("loss_type", ["grpo", "token"])
def test_gradient_accumulation_equals_the_full_batch(loss_type):
    model = tiny_model("qwen2", vocab=40, hidden=32, layers=2).train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (5, 9), generator=gen)
    attn = torch.ones_like(ids)
    mask = torch.zeros(5, 6, dtype=torch.bool)
    for b, n in enumerate([6, 1, 0, 4, 3]):  # ragged, one completion without loss tokens
        mask[b, :n] = True
    adv = torch.randn(5, generator=gen)
    cfg = GRPOSettings(loss_type=loss_type, kl_coef=0.0)
    denominator = 5.0 if loss_type == "grpo" else float(mask.sum())

    def grads(chunks):
        model.zero_grad()
        for rows in chunks:
            logp = completion_logprobs(model, ids[rows], attn[rows], 3, temperature=0.7).logp
            perturbed_old = logp.detach() - 0.1  # ratios away from 1, so the clip is exercised
            grpo_loss(logp, perturbed_old, None, adv[rows], mask[rows], cfg, denominator).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    full = grads([slice(0, 5)])
    accumulated = grads([slice(0, 2), slice(2, 4), slice(4, 5)])
    for a, b in zip(full, accumulated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in full)


def test_completion_logprobs_use_the_sampling_temperature():
    model = tiny_model("qwen2", vocab=40, hidden=32, layers=1)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    stats = completion_logprobs(model, ids, torch.ones_like(ids), 4, temperature=0.5)
    logits = model(input_ids=ids).logits[:, 3:-1].float() / 0.5
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, 4:, None]).squeeze(-1)
    torch.testing.assert_close(stats.logp, want)
    assert stats.entropy.shape == (2, 3) and (stats.entropy > 0).all()


# -- completions and masks -------------------------------------------------------------------------------------

EOS = 1


def test_completion_masks_end_at_the_first_eos():
    comp = torch.tensor([[5, 6, EOS, 7], [EOS, 0, 0, 0], [5, 6, 7, 8], [5, EOS, EOS, 0]])
    mask, truncated = completion_masks(comp, [EOS])
    assert mask.int().tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]
    _, truncated = completion_masks(comp, [EOS, 8])  # several EOS ids (e.g. <|im_end|> and <|endoftext|>)
    assert truncated.tolist() == [False, False, False, False]


@pytest.mark.parametrize("mask_truncated", [True, False])
def test_assemble_masks_truncated_completions(mask_truncated):
    tok = char_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    prompt = torch.tensor([[pad, a], [a, a]])
    prompt_attn = torch.tensor([[0, 1], [1, 1]])
    comp = torch.tensor([[b, eos, pad], [b, b, b]])
    ro = assemble(prompt, prompt_attn, comp, [eos], tok, group_size=2, mask_truncated=mask_truncated)
    assert ro.input_ids.tolist() == [[pad, a, b, eos, pad], [a, a, b, b, b]]
    assert ro.attention_mask.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    second = [False, False, True, True, True] if not mask_truncated else [False] * 5
    assert ro.loss_mask.tolist() == [[False, False, True, True, False], second]
    assert ro.truncated.tolist() == [False, True] and ro.lengths.tolist() == [2, 3]
    assert ro.texts == ["b", "bbb"] and ro.completion_mask.shape == (2, 3)


def test_char_tokenizer_round_trips_and_has_a_chat_template():
    tok = char_tokenizer()
    text = "Ann has 12 apples.\nHow many? 3 * 4 = 12"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|user|>2+2?\n<|assistant|>"
    assert tok("é")["input_ids"] == [tok.unk_token_id]


def test_char_tokenizer_with_bos_only_adds_the_bos():
    """Guards the one tokenizer's two variants (the trainer's default, the TRL tests' with BOS): with
    ``bos=True`` plain text gets ``<bos>`` only when special tokens are asked for, the chat template starts
    with it, and every other token keeps the default's id (so the tiny model's vocabulary is one more)."""
    plain, with_bos = char_tokenizer(), char_tokenizer(bos=True)
    text = "what is 1 + 2 ?\n"
    assert plain.bos_token_id is None and len(with_bos) == len(plain) + 1
    assert with_bos(text)["input_ids"] == [with_bos.bos_token_id, *plain(text)["input_ids"]]
    assert with_bos(text, add_special_tokens=False)["input_ids"] == plain(text)["input_ids"]
    assert with_bos.decode(with_bos(text)["input_ids"], skip_special_tokens=True) == text
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    chats = [t.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) for t in (plain, with_bos)]
    assert chats[1] == "<bos>" + chats[0] and chats[0] == "<|system|>be brief\n<|user|>2+2?\n<|assistant|>"


# -- the LR schedule -----------------------------------------------------------------------------------------


def test_lr_schedules_by_hand():
    cfg = config_from_dict({"run": {"steps": 5}, "optim": {"schedule": "cosine", "warmup_steps": 1}})
    # warm-up step 0: 1/2; then progress (s - 1) / 4 over the cosine
    want = [0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert [lr_factor(s, cfg) for s in range(5)] == pytest.approx(want)
    cfg = config_from_dict({"run": {"steps": 4}, "optim": {"schedule": "linear"}})
    assert [lr_factor(s, cfg) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lr_factor(3, config_from_dict({"run": {"steps": 4}})) == 1.0


# -- configuration -------------------------------------------------------------------------------------------


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  steps: 7\noptim:\n  lr: 1e-4\nrewards:\n  weights: {vigor: 1.0}\n")
    cfg = load_config(path, ["optim.lr=3e-3", "rewards.weights.random=0.5", "eval.max_new_tokens=null"])
    assert cfg.run.steps == 7 and cfg.optim.lr == 3e-3  # YAML reads "1e-4" as a string: floats accept it
    assert cfg.rewards.weights == {"vigor": 1.0, "random": 0.5}
    assert load_config(path).optim.lr == 1e-4
    assert parse_overrides(["a.b=[1, 2]", "c=x"]) == {"a": {"b": [1, 2]}, "c": "x"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"sampling": {"group_sise": 4}},
            r"unknown setting 'sampling.group_sise' \(did you mean 'sampling.group_size'\?\)",
        ),
        ({"run": {"stepz": 4}}, r"unknown setting 'run.stepz' \(did you mean 'run.steps'\?\)"),
        ({"run": {"steps": "many"}}, r"run.steps must be an integer, got str 'many'"),
        ({"run": {"steps": 2.5}}, r"run.steps must be an integer"),
        ({"optim": {"lr": "fast"}}, r"optim.lr must be a number, got 'fast'"),
        ({"lora": {"enabled": "yes"}}, r"lora.enabled must be true or false"),
        ({"lora": {"target_modules": "q_proj"}}, r"lora.target_modules must be a list"),
        ({"sampling": 3}, r"sampling must be a mapping of settings"),
        ({"sampling": {"group_size": 0}}, r"sampling.group_size must be >= 1, got 0"),
        ({"sampling": {"top_p": 1.5}}, r"sampling.top_p must be in \(0, 1\]"),
        ({"sampling": {"temperature": 0}}, r"sampling.temperature must be > 0"),
        ({"grpo": {"loss_type": "dapo"}}, r"grpo.loss_type must be grpo or token, got 'dapo'"),
        ({"optim": {"schedule": "step"}}, r"optim.schedule must be constant, linear or cosine"),
        ({"rewards": {"weights": {"vigour": 1.0}}}, r"rewards.weights.vigour is not a reward"),
        ({"rewards": {"weights": {"vigor": 0.0}}}, r"must give some reward a non-zero weight"),
        ({"rewards": {"params": "("}}, r"rewards.params is not a valid regular expression"),
        ({"rewards": {"weights": {"math": 1.0}}, "data": {"answer_column": None}}, r"data.answer_column is required"),
        ({"model": {"hidden": 30, "heads": 4}}, r"model.hidden must be a multiple of model.heads"),
        ({"compute": {"device": "gpu"}}, r"compute.device must be auto, cpu or cuda"),
        ({"compute": {"precision": "fp16"}}, r"compute.precision must be float32 or bfloat16"),
        ({"rewards": {"backend": "gpu"}}, r"rewards.backend must be auto, torch, triton, cpp, cuda or null"),
        ({"data": {"task": None}}, r"data.train_file is required when data.task is null"),
    ],
)
def test_bad_configs_name_the_problem(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_bad_config_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)
    bad.write_text("sampling:\n  group_size: -1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: sampling.group_size must be >= 1, got -1"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        load_config(None, ["run.steps"])
    with pytest.raises(ConfigError, match=r"'run\.steps' is not a section"):
        load_config(None, ["run.steps=3", "run.steps.x=1"])


# -- files and checkpoints -----------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    """Guards resuming: weights, AdamW's moments (not just its step count), the LR schedule and the RNG come
    back as saved; a checkpoint of another architecture or a directory without one is refused by name."""
    from vigor.trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    def setup(seed):
        model = tiny_model("qwen2", seed=seed, vocab=40, hidden=32, layers=1)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
        opt.step()
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)

    model, opt, sched = setup(0)
    sched.step()
    where = save_checkpoint(tmp_path, 7, model, opt, sched, config_from_dict({}))
    rng_after_save = torch.rand(3)
    other, opt2, sched2 = setup(1)
    moments = ("exp_avg", "exp_avg_sq")
    # the other run's optimizer also took one step (so "step == 1" alone would prove nothing), from other
    # weights: its moments differ until they are restored
    assert not torch.equal(
        opt2.state[next(other.parameters())]["exp_avg"], opt.state[next(model.parameters())]["exp_avg"]
    )
    assert load_checkpoint(where, other, opt2, sched2) == 7
    for (n, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q), n
        for key in moments:
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), (n, key)
    assert sched2.get_last_lr() == sched.get_last_lr() and opt2.state_dict()["state"][0]["step"] == 1
    assert torch.equal(torch.rand(3), rng_after_save)  # the RNG continues where the saved run was
    bigger = tiny_model("qwen2", vocab=40, hidden=32, layers=2)
    with pytest.raises(
        CheckpointError, match=r"does not fit this model's trainable parameters: missing \['model\.layers\.1"
    ):
        load_checkpoint(where, bigger, torch.optim.AdamW(bigger.parameters()), sched2)
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        load_checkpoint(tmp_path, other, opt2, sched2)


def _number_settings(cls=None, prefix=""):
    """Every float-valued setting of the config (scalars and the reward weights' mapping), by dotted key."""
    import dataclasses
    import typing

    from vigor.trainer.config import TrainConfig

    cls = cls or TrainConfig
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _number_settings(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is dict and typing.get_args(tp)[1] is float:
            out.append(f"{prefix}{f.name}.vigor")
        elif float in (tp, *typing.get_args(tp)):
            out.append(f"{prefix}{f.name}")
    return out


def test_the_walk_finds_the_number_settings():
    keys = _number_settings()
    assert {"optim.lr", "optim.eps", "rewards.weights.vigor", "grpo.epsilon_high", "sampling.top_p"} <= set(keys)


@pytest.mark.parametrize("key", _number_settings())
@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "1e999"])
def test_every_number_setting_must_be_finite(key, text):
    """Guards against a config that trains to NaN and exits 0: `optim.lr: .inf` or
    `rewards.weights.vigor: .nan` used to pass validation."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number, got"):
        load_config(None, [f"{key}={text}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.eps=-1", r"optim.eps must be > 0, got -1.0"),
        ("optim.eps=0", r"optim.eps must be > 0"),
        ("lora.alpha=0", r"lora.alpha must be > 0"),
        ("run.seed=-1", r"run.seed must be in \[0, 2\*\*32\)"),
        ("optim.lr=-1e-3", r"optim.lr must be in \(0, 1\]"),
        ("optim.lr=1e38", r"optim.lr must be in \(0, 1\]"),  # used to overflow inside AdamW
        ("grpo.kl_coef=-0.1", r"grpo.kl_coef must be >= 0"),
    ],
)
def test_out_of_range_numbers_are_refused_in_one_line(override, message):
    """Guards settings that used to end in a torch traceback (`optim.eps: -1`) or a silent no-op."""
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_read_metrics_skips_only_a_torn_last_line(tmp_path, capsys):
    """Guards resume after power loss: a torn last line is skipped (and reported), a bad line before the
    last is an error naming it."""
    from vigor.trainer.data import DataError
    from vigor.trainer.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    assert f"{path}:3: skipped a torn last line" in capsys.readouterr().err
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a metrics record"):
        read_metrics(path)
