"""The GRPO trainer end to end on the CPU: a tiny random Qwen2, the built-in character tokenizer and the
synthetic arithmetic task, three steps with each reward; resume; LoRA with the KL term."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vigor.trainer import Trainer, load_config
from vigor.trainer.config import config_from_dict
from vigor.trainer.metrics import read_metrics

TINY = {
    "run": {"steps": 3, "progress": False, "seed": 1},
    "plots": {"enabled": False},
    "model": {"name": "tiny-qwen2", "hidden": 32, "layers": 2, "heads": 4},
    "data": {"num_train": 24, "num_test": 4, "max_ops": 1},
    "sampling": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 8, "mask_truncated_completions": False},
    "optim": {"lr": 1e-2},
}


def config(tmp_path, name="run", **sections):
    values = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    values["run"]["dir"] = str(tmp_path / name)
    return config_from_dict(values)


def without_times(record):
    """A step's metrics without timings and without the engine's self-check, which a new process (a resumed
    run) logs again on its first scoring call."""
    return {k: v for k, v in record.items() if not k.startswith(("time/", "self_check/"))}


@pytest.mark.parametrize(
    "weights",
    [{"vigor": 1.0}, {"self_certainty": 1.0}, {"random": 1.0}, {"math": 1.0}],
    ids=["vigor", "self_certainty", "random", "math"],
)
def test_three_steps_end_to_end(tmp_path, weights):
    plots = "vigor" in weights  # the plots are the same whatever the reward: drawn once
    cfg = config(
        tmp_path,
        rewards={"weights": weights},
        verify={"every": 3},
        eval={"every": 2, "num_examples": 4},
        plots={"enabled": plots},
    )
    records = Trainer(cfg).train()
    run = tmp_path / "run"
    on_disk = read_metrics(run / "metrics.jsonl")
    assert on_disk == json.loads(json.dumps(records))
    steps = [r for r in on_disk if r["step"] > 0]
    assert [r["step"] for r in on_disk] == [0, 1, 2, 3]  # step 0: the evaluation before training
    for r in steps:
        for name in weights:
            assert f"reward/{name}" in r
        assert 0 <= r["accuracy"] <= 1 and r["completion_length"] >= 1
        assert all(v is None or math.isfinite(v) for v in r.values() if not isinstance(v, str))
    assert "eval/accuracy" in on_disk[0] and "eval/accuracy" in steps[1] and "eval/accuracy" in steps[2]
    if "vigor" in weights:  # the engine agrees with the oracle on the trainer's own batch
        assert steps[2]["verify/max_rel_err"] < 1e-4
        assert steps[0]["vigor/raw"] < 0
    for name in ("overview", "reward", "accuracy", "grad_norm", "completion_length", "entropy") if plots else ():
        assert (run / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = run / "checkpoints" / "step-000003"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000003"
    weights_file = load_file(str(ckpt / "model.safetensors"))
    assert "model.embed_tokens.weight" in weights_file  # full fine-tuning: every (tied) weight once
    assert (run / "final_model" / "config.json").is_file()
    assert not list(run.rglob("*.tmp"))  # atomic writes leave no temporary files behind


def test_updates_follow_the_advantages(tmp_path):
    """With the random reward the advantages are non-zero and the weights move; with the math reward on a
    random model every completion is wrong, all advantages are 0, and (no weight decay) nothing moves."""
    moved = {}
    for name in ("random", "math"):
        trainer = Trainer(config(tmp_path, name, run={"steps": 1}, rewards={"weights": {name: 1.0}}))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        record = trainer.train()[-1]
        moved[name] = any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
        if name == "math":
            assert record["accuracy"] == 0.0 and record["grad_norm"] == 0.0
    assert moved == {"random": True, "math": False}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_reproduces_the_next_step(tmp_path, lora):
    extra = dict(
        run={"save_every": 2},
        rewards={"weights": {"vigor": 1.0, "random": 0.5}},
        grpo={"num_iterations": 2, "kl_coef": 0.05},
        optim={"micro_batch_size": 3, "schedule": "cosine", "warmup_steps": 1},
        lora={"enabled": lora, "r": 4},
        sampling={"mask_truncated_completions": True, "max_new_tokens": 6, "temperature": 0.9, "top_p": 0.95},
    )
    full = Trainer(config(tmp_path, "full", **extra)).train()
    resumed_cfg = config(tmp_path, "resumed", **extra)
    resumed_cfg.run.resume = str(tmp_path / "full" / "checkpoints" / "step-000002")
    trainer = Trainer(resumed_cfg)
    assert trainer.step == 2
    resumed = trainer.train()
    assert [r["step"] for r in resumed] == [3]
    assert without_times(resumed[0]) == without_times(full[2])
    assert "kl" in full[2] and full[2]["lr"] != full[1]["lr"]


def test_resume_auto_continues_and_truncates_metrics(tmp_path):
    first = Trainer(config(tmp_path, run={"steps": 2, "save_every": 1}))
    first.train()
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text(path.read_text() + json.dumps({"step": 9, "stale": True}) + "\n")  # a record from after the save
    cont = Trainer(config(tmp_path, run={"steps": 3, "resume": "auto"}))
    assert cont.step == 2
    cont.train()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_fresh_run_refuses_a_used_run_dir(tmp_path):
    Trainer(config(tmp_path, run={"steps": 1})).train()
    with pytest.raises(ValueError, match=r"already holds a run .*run\.resume=auto"):
        Trainer(config(tmp_path, run={"steps": 1}))


def test_lora_gradient_checkpointing_chat_template_and_token_loss(tmp_path):
    cfg = config(
        tmp_path,
        run={"steps": 2},
        lora={"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]},
        model={"gradient_checkpointing": True},
        data={"chat_template": True, "system_prompt": "Answer with a number."},
        grpo={"loss_type": "token", "kl_coef": 0.1},
        rewards={"weights": {"vigor": 1.0}, "params": r"layers\.1\."},
        compute={"precision": "bfloat16"},
        verify={"every": 1},
    )
    trainer = Trainer(cfg)
    assert trainer.theta and all(".layers.1." in n and "lora_" in n for n in trainer.theta)
    assert trainer.train_set.texts[0].startswith("<|system|>Answer with a number.\n<|user|>")
    records = trainer.train()
    assert all(r["verify/max_rel_err"] < 1e-4 and r["kl"] >= 0 for r in records)
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step-000002" / "model.safetensors"))
    assert weights and all("lora_" in n for n in weights)  # only the adapters are trained and saved


def test_shipped_configs_load():
    from pathlib import Path

    from vigor.study.run import load_study_config
    from vigor.trainer.sft import load_sft_config

    cfg = load_config("configs/demo.yaml", ["run.steps=2"])
    assert cfg.run.steps == 2 and cfg.rewards.weights == {"vigor": 1.0}
    assert (Path(cfg.model.name) / "model.safetensors").is_file()  # the committed warm start
    sft = load_sft_config("configs/addition-sft.yaml")
    assert sft.sft.export_dir == cfg.model.name and sft.sft.stop_at_accuracy is not None
    study = load_study_config("configs/study/addition.yaml")  # checks every arm's run config
    assert len(study.arms) >= 6 and len(study.seeds) >= 3
    cfg = load_config("configs/lora-local-model.yaml")
    assert cfg.lora.enabled and cfg.data.chat_template and cfg.data.train_file == "data/train.jsonl"


def test_resume_skips_a_torn_metrics_line_and_removes_stale_temporaries(tmp_path, capsys):
    """Guards resume after a crash: a metrics.jsonl whose last line was cut short mid-write used to fail
    with JSONDecodeError, and temporaries of killed atomic writes were never cleaned."""
    Trainer(config(tmp_path, run={"steps": 2, "save_every": 1})).train()
    run = tmp_path / "run"
    path = run / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 3, "loss": 0.1')  # the crash cut this line
    ckpt = run / "checkpoints" / "step-000002"
    stale = [ckpt / ".model.tmp-a1b2c3d4.safetensors", run / "plots" / ".x.tmp-z_9abc12.png"]
    keep = run / "notes.tmp"  # not a name atomic writes give: the user's file stays
    for p in [*stale, keep]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("half")
    (run / ".final_model.tmp").mkdir()
    capsys.readouterr()
    cont = Trainer(config(tmp_path, run={"steps": 3, "resume": "auto"}))
    err = capsys.readouterr().err
    assert "skipped a torn last line" in err and "removed 3 temporary file(s)" in err
    assert not any(p.exists() for p in stale) and keep.exists() and not (run / ".final_model.tmp").exists()
    cont.train()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Guards against training on into NaN weights and checkpoints: step 3's loss turns NaN (as a diverging
    run's would); the run must stop with a message naming the step and step 2's checkpoint, saving nothing
    of step 3."""
    import vigor.trainer.loop as loop

    calls = {"n": 0}
    real = loop.grpo_loss

    def poisoned(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # one micro-batch and one iteration per step: step 3
            parts.loss = parts.loss * math.nan
        return parts

    monkeypatch.setattr(loop, "grpo_loss", poisoned)
    trainer = Trainer(config(tmp_path, run={"steps": 4, "save_every": 1}))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    message = r"step 3: the loss is nan; .*last good checkpoint is .*step-000002"
    with pytest.raises(loop.TrainingDiverged, match=message):
        trainer.train()
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert not (run / "checkpoints" / "step-000003").exists() and not (run / "final_model").exists()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    weights = load_file(str(run / "checkpoints" / "step-000002" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(not torch.equal(weights[n], before[n]) for n in weights)  # a real checkpoint, trained


def test_non_finite_weights_stop_the_run(tmp_path, monkeypatch):
    """Guards the weight check after the optimizer step: a step that writes inf into a weight stops the run
    before anything is saved."""
    from vigor.trainer.loop import TrainingDiverged

    trainer = Trainer(config(tmp_path, run={"steps": 2}))
    real_step = trainer.optimizer.step

    def step_to_inf(*args, **kwargs):
        out = real_step(*args, **kwargs)
        with torch.no_grad():
            trainer.params[0].view(-1)[0] = math.inf
        return out

    monkeypatch.setattr(trainer.optimizer, "step", step_to_inf)
    message = r"step 1: an optimizer step made some weights non-finite.*no checkpoint"
    with pytest.raises(TrainingDiverged, match=message):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoints").exists()
