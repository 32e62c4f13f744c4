"""The TRL bridge inside a real trl.GRPOTrainer (CPU, tiny random Qwen2, offline character tokenizer with BOS).

Each run records, at every reward call, the trainer's weights, the rewards TRL received, TRL's own padded
prompt/completion tensors and its advantages; the rewards are then recomputed through ``vigor.vigor_rewards``
on a fresh model holding those weights and TRL's token ids.
"""

from __future__ import annotations

import ast
import os
import runpy
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from trl import GRPOConfig, GRPOTrainer

import vigor
import vigor.integrations.trl as bridge
from vigor.integrations.trl import SelfCertaintyReward, VigorReward, vigor_stats
from vigor.rewards import rank_shape, self_certainty_scores, shape_vigor
from vigor.tiny import char_tokenizer, group_batch, tiny_model

G = 4
TOKENIZER = char_tokenizer(bos=True)  # with <bos>: TRL must add special tokens as it does for real models
EOS = TOKENIZER.eos_token_id
PLAIN = ["what is 1 + 2 ?", "what is the sum of 3 and 4 ?", "x plus y", "think step by step"]
CHAT = [
    [{"role": "user", "content": "what is 1 + 2 ?"}],
    [{"role": "system", "content": "think step by step"}, {"role": "user", "content": "a times b"}],
    [{"role": "user", "content": "x plus y"}],
    [{"role": "user", "content": "yes or no ?"}],
]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.3)


def fresh_model(peft: bool = False):
    model = tiny_model("qwen2", vocab=len(TOKENIZER))
    return get_peft_model(model, LoraConfig(**LORA)) if peft else model


def grpo_config(tmp_path: Path, **overrides) -> GRPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=8,
        num_generations=G,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-2,  # large enough that step 2 scores a visibly different policy
        logging_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


class Recorder:
    """Spies on one trainer: weights at reward time, what TRL received, TRL's tensors, the bridge's batch."""

    def __init__(self, trainer: GRPOTrainer, reward) -> None:
        self.steps: list[dict] = []
        self.index = trainer.reward_funcs.index(reward)
        calculate, generate = trainer._calculate_rewards, trainer._generate_and_score_completions
        build = reward._batch

        def spy_calculate(inputs, prompts, completions, completion_ids):
            state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            received = calculate(inputs, prompts, completions, completion_ids)
            self.steps.append({"state": state, "received": received[:, self.index].clone(), **self._pending})
            return received

        def spy_generate(inputs):
            out = generate(inputs)
            keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
            self.steps[-1].update({k: out[k].detach().clone() for k in keys})
            return out

        def spy_build(*args, **kwargs):
            self._pending = {"bridge": build(*args, **kwargs)}
            return self._pending["bridge"]

        self._pending: dict = {}
        trainer._calculate_rewards = spy_calculate
        trainer._generate_and_score_completions = spy_generate
        reward._batch = spy_build


def trl_tensors(step: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, loss_mask exactly as GRPOTrainer built them for its policy forward."""
    ids = torch.cat([step["prompt_ids"], step["completion_ids"]], 1)
    attention = torch.cat([step["prompt_mask"], step["completion_mask"]], 1)
    loss = torch.cat([torch.zeros_like(step["prompt_mask"]), step["completion_mask"]], 1)
    return ids, attention, loss


def run(tmp_path, reward, dataset, *, peft: bool = False, **config) -> tuple[GRPOTrainer, Recorder]:
    trainer = GRPOTrainer(
        model=fresh_model(),
        reward_funcs=reward,
        args=grpo_config(tmp_path, **config),
        train_dataset=Dataset.from_list([{"prompt": p} for p in dataset]),
        processing_class=TOKENIZER,
        peft_config=LoraConfig(**LORA) if peft else None,
    )
    recorder = Recorder(trainer, reward)
    trainer.train()
    assert len(recorder.steps) == 2
    return trainer, recorder


def check_vigor_run(trainer: GRPOTrainer, recorder: Recorder, *, peft: bool) -> list[vigor.VigorScores]:
    """The rewards TRL received are vigor_rewards on TRL's token ids under the weights at reward time; TRL's
    advantages are those of docs/reward.md#group-advantage; the logged norm statistics are those of the
    recomputed norms."""
    logs = [h for h in trainer.state.log_history if "vigor/invalid_fraction" in h]
    assert len(logs) == 2
    assert any(not torch.equal(a, b) for a, b in zip(*(s["state"].values() for s in recorder.steps), strict=True))
    recomputed = []
    for step, log in zip(recorder.steps, logs, strict=True):
        ids, attention, loss = trl_tensors(step)
        built = step["bridge"]
        assert torch.equal(built.input_ids, ids) and torch.equal(built.attention_mask, attention)
        assert torch.equal(built.loss_mask, loss)
        model = fresh_model(peft)
        model.load_state_dict(step["state"])
        scores = vigor.vigor_rewards(model, ids, attention, loss, G)
        torch.testing.assert_close(step["received"], scores.rewards, rtol=0, atol=1e-6)
        torch.testing.assert_close(step["advantages"], vigor.group_advantages(scores.rewards, G), rtol=0, atol=1e-6)
        norms = scores.norms[scores.valid].double()
        assert norms.numel() and bool((norms > 0).all())
        assert log["vigor/grad_norm_mean"] == pytest.approx(float(norms.mean()), rel=1e-5)
        assert log["vigor/grad_norm_min"] == pytest.approx(float(norms.min()), rel=1e-5)
        assert log["vigor/grad_norm_max"] == pytest.approx(float(norms.max()), rel=1e-5)
        assert log["vigor/invalid_fraction"] == pytest.approx(float((~scores.valid).float().mean()))
        recomputed.append(scores)
    return recomputed


def test_vigor_reward_plain_text_prompts(tmp_path):
    reward = VigorReward()
    trainer, recorder = run(tmp_path, reward, PLAIN)
    check_vigor_run(trainer, recorder, peft=False)
    # TRL tokenizes plain prompts with the tokenizer's special tokens: every prompt starts with <bos>
    for step in recorder.steps:
        first_tokens = step["prompt_ids"].gather(1, step["prompt_mask"].argmax(1, keepdim=True))
        assert first_tokens.unique().tolist() == [TOKENIZER.bos_token_id]


def test_vigor_reward_conversational_prompts_with_chat_template(tmp_path):
    reward = VigorReward()
    trainer, recorder = run(tmp_path, reward, CHAT)
    check_vigor_run(trainer, recorder, peft=False)
    assistant = TOKENIZER.convert_tokens_to_ids("<|assistant|>")
    for step in recorder.steps:
        assert bool((step["prompt_ids"][:, -1] == assistant).all())  # the generation prompt closes every prompt


def test_vigor_reward_with_peft_scores_the_adapters(tmp_path):
    reward = VigorReward()
    trainer, recorder = run(tmp_path, reward, PLAIN, peft=True)
    assert isinstance(trainer.model, PeftModel)
    # TRL's default gradient checkpointing installs input-require-grads hooks: the bridge must neutralize them
    assert trainer.model.get_input_embeddings()._forward_hooks
    scores = check_vigor_run(trainer, recorder, peft=True)
    # theta = the adapters: the per-completion autograd oracle agrees on the first step's norms
    model = fresh_model(peft=True)
    model.load_state_dict(recorder.steps[0]["state"])
    oracle = vigor.oracle_grad_norms(model, *trl_tensors(recorder.steps[0]))
    torch.testing.assert_close(scores[0].norms, oracle, rtol=1e-4, atol=1e-7)


def test_vigor_reward_ranks_masked_truncated_completions_last(tmp_path):
    reward = VigorReward()
    trainer, recorder = run(
        tmp_path,
        reward,
        PLAIN,
        max_completion_length=3,
        mask_truncated_completions=True,
        generation_kwargs={"sequence_bias": {(EOS,): 3.0}},  # some completions end with EOS, some are cut
    )
    scores = check_vigor_run(trainer, recorder, peft=False)
    valid = torch.cat([s.valid for s in scores])
    assert bool(valid.any()) and not bool(valid.all())
    for s in scores:
        for rewards, ok in zip(s.rewards.view(-1, G), s.valid.view(-1, G), strict=True):
            if ok.any() and not ok.all():
                assert float(rewards[~ok].max()) < float(rewards[ok].min())


def test_self_certainty_reward_in_eval_mode_with_peft(tmp_path):
    reward = SelfCertaintyReward()
    trainer, recorder = run(
        tmp_path,
        reward,
        PLAIN,
        peft=True,
        max_completion_length=3,
        mask_truncated_completions=True,
        generation_kwargs={"sequence_bias": {(EOS,): 3.0}},
    )
    assert trainer.model.training  # the trainer's model is in train mode, with LoRA dropout 0.3
    saw_invalid = False
    for step in recorder.steps:
        model = fresh_model(peft=True).eval()
        model.load_state_dict(step["state"])
        want, valid = self_certainty_scores(model, *trl_tensors(step))
        got = step["received"]
        assert bool(torch.isnan(got[~valid]).all())  # None: left out of TRL's group statistics
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-6, atol=1e-6)
        saw_invalid |= bool((~valid).any())
    assert saw_invalid
    assert any("self_certainty/invalid_fraction" in h for h in trainer.state.log_history)


def test_max_batch_size_changes_nothing(tmp_path):
    whole, chunked = VigorReward(), VigorReward(max_batch_size=3, name="vigor_chunked")
    trainer = GRPOTrainer(
        model=fresh_model(),
        reward_funcs=[whole, chunked],
        args=grpo_config(tmp_path, max_steps=1),
        train_dataset=Dataset.from_list([{"prompt": p} for p in PLAIN]),
        processing_class=TOKENIZER,
    )
    calls = []
    score = bridge.per_sample_grad_norms

    def counting(model, input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        return score(model, input_ids, *args, **kwargs)

    bridge.per_sample_grad_norms = counting
    try:
        trainer.train()
    finally:
        bridge.per_sample_grad_norms = score
    assert calls == [8, 3, 3, 2]
    rewards = trainer._logs["rewards"]
    assert len(rewards["vigor"]) == 8
    assert list(rewards["vigor_chunked"]) == list(rewards["vigor"])
    log = trainer.state.log_history[0]
    assert log["vigor_chunked/grad_norm_mean"] == pytest.approx(log["vigor/grad_norm_mean"], rel=1e-6)


@pytest.mark.parametrize("family", ["qwen2", "gemma", "lora"])
def test_scoring_with_input_require_grads_hooks_matches_the_oracle(family):
    """Gradient checkpointing installs hooks that make the embeddings' output require grad (twice, here);
    the engine must still score every path to the loss, also through a hook nobody knows of."""
    model = fresh_model(peft=True) if family == "lora" else tiny_model(family, vocab=len(TOKENIZER))
    ids, attention, loss = group_batch(len(TOKENIZER))
    oracle = vigor.oracle_grad_norms(model, ids, attention, loss)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    hooks = dict(model.get_input_embeddings()._forward_hooks)
    assert len(hooks) >= 2
    batch = _as_batch(ids, attention, loss)
    torch.testing.assert_close(bridge.score_norms(model, batch), oracle, rtol=1e-4, atol=1e-6)
    assert dict(model.get_input_embeddings()._forward_hooks) == hooks  # left as found
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    torch.testing.assert_close(bridge.score_norms(model, batch), oracle, rtol=1e-4, atol=1e-6)


def two_process_batch() -> tuple[list[str], list[list[int]]]:
    """12 completions in groups of 4 (prompts A, B, C); process 0 holds rows 0-5, process 1 rows 6-11, so
    group B straddles them. Row 5 never ends (truncated, masked: invalid), the rest end with EOS."""
    gen = torch.Generator().manual_seed(4)
    prompts = [PLAIN[g] for g in range(3) for _ in range(G)]
    completions = []
    for b in range(12):
        n = int(torch.randint(1, 5, (1,), generator=gen))
        body = torch.randint(5, len(TOKENIZER), (n,), generator=gen).tolist()
        completions.append(body if b == 5 else [*body, EOS])
    return prompts, completions


def test_split_group_is_gathered_before_shaping(tmp_path, monkeypatch):
    """Guards the multi-process path of ``VigorReward.__call__``: two simulated processes of 6 completions
    each (groups of 4, the middle one split between them) call the real reward; the fake gather puts the
    tensor the reward hands it at its process's place and the other process's oracle (norm, token count)
    rows at the other's. Each process must get its own slice of the ranks of the whole batch, computed
    from per-completion autograd norms (a wrong slice, a gather of the wrong thing, or shaping before the
    gather fails)."""
    reward = VigorReward()
    trainer = GRPOTrainer(
        model=fresh_model(),
        reward_funcs=reward,
        args=grpo_config(tmp_path, mask_truncated_completions=True),
        train_dataset=Dataset.from_list([{"prompt": p} for p in PLAIN]),
        processing_class=TOKENIZER,
    )
    trainer.model.eval()
    prompts, completions = two_process_batch()
    parts = [slice(0, 6), slice(6, 12)]
    oracle_rows = []
    for rows in parts:
        batch = reward._batch(trainer, trainer.model, prompts[rows], completions[rows])
        norms = vigor.oracle_grad_norms(trainer.model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        oracle_rows.append(torch.stack([norms, batch.loss_mask.sum(1).float()], 1))
    whole = torch.cat(oracle_rows)
    assert whole[5, 1] == 0 and bool((whole[torch.arange(12) != 5, 1] > 0).all())
    want = shape_vigor(whole[:, 0], whole[:, 1].long(), G).rewards
    for rank, rows in enumerate(parts):

        def gather(local: torch.Tensor, rank: int = rank) -> torch.Tensor:
            assert local.shape == (6, 2)
            return torch.cat([local if r == rank else oracle_rows[r] for r in range(2)])

        monkeypatch.setattr(bridge._Distributed, "of", classmethod(lambda cls, acc, r=rank, f=gather: cls(r, 2, f)))
        got = reward(
            prompts=prompts[rows],
            completions=[""] * 6,
            completion_ids=completions[rows],
            log_metric=trainer._log_metric,
        )
        torch.testing.assert_close(torch.tensor(got), want[rows], rtol=0, atol=1e-6)
    # shaping each process's half alone cannot even form groups of 4
    with pytest.raises(ValueError, match="whole number of groups"):
        shape_vigor(whole[:6, 0], whole[:6, 1].long(), G)
    with pytest.raises(RuntimeError, match="same size"):
        bridge._Distributed(0, 2, gather=lambda t: t).whole_batch(whole[:6])


def test_eval_mode_ranks_within_eval_groups(tmp_path):
    """Guards ``num_generations_eval``: in eval mode (TRL's evaluation loop) the reward ranks inside groups
    of the eval group size (2 here), in train mode inside groups of ``num_generations`` (4); the two
    shapings differ on this batch, so using the training size in eval mode fails."""
    reward = VigorReward()
    trainer = GRPOTrainer(
        model=fresh_model(),
        reward_funcs=reward,
        args=grpo_config(tmp_path, num_generations_eval=2),
        train_dataset=Dataset.from_list([{"prompt": p} for p in PLAIN]),
        processing_class=TOKENIZER,
    )
    assert trainer.num_generations == G and trainer.num_generations_eval == 2
    prompts, completions = two_process_batch()
    prompts, completions = prompts[:8], completions[:8]
    batch = reward._batch(trainer, trainer.model, prompts, completions)
    norms = vigor.oracle_grad_norms(trainer.model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    counts = batch.loss_mask.sum(1)
    want = {n: shape_vigor(norms, counts, n).rewards for n in (2, G)}
    assert not torch.equal(want[2], want[G])
    for training, size in ((False, 2), (True, G)):
        trainer.model.train(training)
        got = reward(prompts=prompts, completions=[""] * 8, completion_ids=completions, log_metric=trainer._log_metric)
        torch.testing.assert_close(torch.tensor(got), want[size], rtol=0, atol=1e-6)


def test_vigor_stats_by_hand():
    """Guards the logged statistics: over valid completions only (token count > 0)."""
    stats = vigor_stats(torch.tensor([1.0, 2.0, 0.0, 4.0]), torch.tensor([3, 1, 0, 2]))
    assert stats == pytest.approx(
        {"invalid_fraction": 0.25, "grad_norm_mean": 7 / 3, "grad_norm_min": 1.0, "grad_norm_max": 4.0}
    )
    assert vigor_stats(torch.zeros(2), torch.zeros(2, dtype=torch.long)) == {"invalid_fraction": 1.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_ddp_split_group(tmp_path):
    """A real 2-process (gloo, CPU) GRPOTrainer run whose middle group is split between the processes."""
    worker = Path(__file__).with_name("trl_ddp_worker.py")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    done = subprocess.run([*command, str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = split_group_ranked_whole(tmp_path)
    for first, second in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        advantages = torch.cat([first["advantages"], second["advantages"]])
        # every process holds the whole batch's rewards (checked above): the advantages are their group's
        torch.testing.assert_close(advantages, vigor.group_advantages(first["gathered"], G), rtol=0, atol=1e-6)


def split_group_ranked_whole(run_dir: Path) -> list[dict]:
    """Checks what the 2-process worker (tests/trl_ddp_worker.py) saved in ``run_dir``: each process scored its
    own 6 completions, the middle group was split between them, and the rewards every process returned equal
    those recomputed on the whole model at that step and ranked over the whole group. Returns the ranks' data."""
    ranks = [torch.load(run_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["scored_sizes"] == [6, 6]  # each process scores its own completions only
    for first, second in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        assert first["prompts"][4] == second["prompts"][0]  # the middle group is split
        raw, valid = [], []
        for step in (first, second):
            model = fresh_model()
            model.load_state_dict(step["state"])
            scores = vigor.vigor_rewards(model, *trl_tensors(step), group_size=1)
            raw.append(scores.raw)
            valid.append(scores.valid)
        want = rank_shape(torch.cat(raw), torch.cat(valid), G)
        for step in (first, second):
            torch.testing.assert_close(step["gathered"], want, rtol=0, atol=1e-6)
    return ranks


def _as_batch(ids, attention, loss):
    """A ready-made batch (e.g. from group_batch) as the bridge's batch type."""
    return bridge.TrlBatch(ids, attention, loss.bool(), 0, torch.zeros(ids.shape[0], dtype=torch.bool), loss.sum(1))


def test_unsupported_or_non_spec_settings_are_reported(tmp_path):
    reward = VigorReward()
    trainer = GRPOTrainer(
        model=fresh_model(),
        reward_funcs=reward,
        args=grpo_config(tmp_path, scale_rewards="batch"),
        train_dataset=Dataset.from_list([{"prompt": p} for p in PLAIN]),
        processing_class=TOKENIZER,
    )
    with pytest.warns(UserWarning, match="scale_rewards='batch'"):
        reward.bind(trainer)
    trainer.tools = [len]
    with pytest.raises(ValueError, match="tools"):
        VigorReward().bind(trainer)
    with pytest.raises(TypeError, match="GRPOTrainer"):
        VigorReward().bind(object())
    with pytest.raises(RuntimeError, match=r"reward\.bind\(trainer\)"):
        VigorReward()(prompts=["x"], completions=["y"], completion_ids=[[9]])
    with pytest.raises(TypeError, match="names"):
        VigorReward(params=[torch.nn.Parameter(torch.zeros(1))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.tools = None
        trainer.scale_rewards = "group"
        VigorReward().bind(trainer)  # TRL's defaults: no warning


def test_example_script_runs_offline(tmp_path, monkeypatch, capsys):
    """Guards the README's example: it trains offline and logs the VIGOR reward's statistics (a positive
    mean gradient norm over valid completions, an invalid fraction in [0, 1])."""
    example = Path(__file__).parents[1] / "examples" / "trl_grpo_vigor.py"
    flags = ["--tiny", "--cpu", "--steps", "1", "--max-completion-length", "4", "--output-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [str(example), *flags])
    runpy.run_path(str(example), run_name="__main__")
    printed = capsys.readouterr().out.split("last step:", 1)[1].strip().splitlines()[0]
    shown = ast.literal_eval(printed)
    assert "rewards/vigor/mean" in shown and 0 <= shown["vigor/invalid_fraction"] <= 1
    assert shown["vigor/grad_norm_min"] > 0 and shown["vigor/grad_norm_max"] >= shown["vigor/grad_norm_mean"]


def test_empty_theta_is_refused_rather_than_ranked_as_ties():
    model = tiny_model("qwen2", vocab=len(TOKENIZER)).requires_grad_(False)
    ids, attention, loss = group_batch(len(TOKENIZER))
    with pytest.raises(vigor.ThetaError, match="theta is empty"):  # the engine's own error (docs/engine.md#errors)
        bridge.score_norms(model, _as_batch(ids, attention, loss))
