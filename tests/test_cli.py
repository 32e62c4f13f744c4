"""The ``vigor`` command: train, score, verify; clear messages for bad input."""

from __future__ import annotations

import json

import pytest
import torch

import vigor
from vigor.cli import main
from vigor.packing import pack_completions
from vigor.rewards import group_advantages, rank_shape
from vigor.tiny import char_tokenizer, tiny_model

TINY = [
    "compute.threads=null",
    "model.hidden=32",
    "model.layers=1",
    "data.num_train=8",
    "data.num_test=2",
    "run.progress=false",
    "plots.enabled=false",
]
TINY += ["sampling.group_size=2", "sampling.prompts_per_step=1", "sampling.max_new_tokens=4"]


def test_train_runs_from_the_command_line(tmp_path, capsys):
    assert main(["train", "--config", "configs/demo.yaml", f"run.dir={tmp_path / 'r'}", "run.steps=1", *TINY]) == 0
    assert "done: " in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 1 and "reward/vigor" in records[-1]
    # resuming a finished run does nothing more and keeps its metrics
    assert (
        main(["train", "--config", "configs/demo.yaml", "--resume", f"run.dir={tmp_path / 'r'}", "run.steps=1", *TINY])
        == 0
    )
    assert [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    # the exported policy is a local Hugging Face directory: train and score from it as from any real model
    final = tmp_path / "r" / "final_model"
    args = ["train", "--config", "configs/demo.yaml", f"run.dir={tmp_path / 'r2'}", "run.steps=1", *TINY]
    assert main([*args, f"model.name={final}", "lora.enabled=true", "lora.r=2"]) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "1+1=", "completion": c}) + "\n" for c in ("2", "3")))
    capsys.readouterr()
    assert main(["score", "--input", str(pairs), "--model", str(final)]) == 0
    assert sorted(json.loads(line)["reward"] for line in capsys.readouterr().out.splitlines()) == [-1.0, 1.0]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("sampling:\n  group_sise: 4\n", "unknown setting 'sampling.group_sise' (did you mean 'sampling.group_size'?)"),
        ("optim:\n  lr: fast\n", "optim.lr must be a number, got 'fast'"),
        ("sampling:\n  top_p: 2\n", "sampling.top_p must be in (0, 1], got 2.0"),
        (
            "data:\n  train_file: /nowhere/train.jsonl\n",
            "data.train_file: data file '/nowhere/train.jsonl' does not exist",
        ),
        ("model:\n  name: /nowhere/model\n", "model.name '/nowhere/model' is neither tiny-<family> nor a local model"),
        ("lora:\n  enabled: true\n  target_modules: [nope]\n", "lora.target_modules ['nope']"),
        ("run:\n  resume: /nowhere/ckpt\n", "run.resume: checkpoint directory '/nowhere/ckpt' does not exist"),
    ],
)
def test_train_reports_bad_configs_clearly(tmp_path, capsys, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    assert main(["train", "--config", str(path), f"run.dir={tmp_path / 'run'}", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vigor: error: ") and message in err and "Traceback" not in err


def test_train_reports_a_missing_config_file(capsys):
    assert main(["train", "--config", "/nowhere/c.yaml"]) == 2
    assert "config file '/nowhere/c.yaml' does not exist" in capsys.readouterr().err


def test_score_matches_the_oracle(tmp_path, capsys):
    rows = [{"prompt": "2+2=", "completion": c, "id": i} for i, c in enumerate(["4", "five", "44 and more", "4."])] + [
        {"prompt": "3*3=", "completion": c} for c in ["9", "nine", "", "81"]
    ]
    src, dst = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sizes = ["--hidden", "32", "--layers", "2", "--heads", "4", "--seed", "3"]
    assert main(["score", "--input", str(src), "--output", str(dst), *sizes]) == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["completion"] for r in out] == [r["completion"] for r in rows] and out[0]["id"] == 0
    # the same model and batch through the oracle
    tok = char_tokenizer()
    model = tiny_model("qwen2", seed=3, vocab=len(tok), hidden=32, layers=2, heads=4)
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    completions = [tok(r["completion"], add_special_tokens=False)["input_ids"] for r in rows]
    packed = pack_completions(prompts, completions, pad_id=tok.pad_token_id)
    ids, attn, loss = packed.input_ids, packed.attention_mask, packed.loss_mask
    oracle = vigor.oracle_grad_norms(model, ids, attn, loss)
    torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in out]), oracle, rtol=1e-4, atol=0)
    counts = loss.sum(1)
    assert [r["tokens"] for r in out] == counts.tolist() and [r["valid"] for r in out] == (counts > 0).tolist()
    raw = -counts.sqrt() * oracle
    want = rank_shape(torch.where(counts > 0, raw, 0.0), counts > 0, 4)
    assert [r["reward"] for r in out] == want.tolist() and out[6]["reward"] == -1.0  # the empty one: last


def test_score_self_certainty_to_stdout_and_bad_input(tmp_path, capsys):
    src = tmp_path / "pairs.jsonl"
    src.write_text(
        json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "a", "completion": "cc"}) + "\n"
    )
    assert main(["score", "--input", str(src), "--reward", "self_certainty", "--hidden", "32", "--layers", "1"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 2 and all(r["reward"] > 0 and r["valid"] for r in out)
    want = group_advantages(torch.tensor([r["reward"] for r in out]), 2)
    assert [r["advantage"] for r in out] == pytest.approx(want.tolist()) and want.abs().min() > 0
    src.write_text('{"prompt": "a"}\n')
    assert main(["score", "--input", str(src)]) == 2
    assert "needs a string field 'completion'" in capsys.readouterr().err
    assert main(["score", "--input", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_verify_still_works(capsys):
    args = ["verify", "--hidden", "32", "--layers", "1", "--groups", "1", "--group-size", "3", "--repeats", "1"]
    assert main(args) == 0
    assert "max relative error" in capsys.readouterr().out


def _pairs(path, rows):
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    return path


SCORE_CASES = {
    "negative batch groups": (["--batch-groups", "-1"], "--batch-groups must be >= 1, got -1"),
    "zero batch groups": (["--batch-groups", "0"], "--batch-groups must be >= 1, got 0"),
    "empty prompt": ([], "input row 3: the prompt '' tokenizes to no tokens"),
    "bad utf-8": ([], "pairs.jsonl:2: not valid UTF-8"),
    "output is a directory": (["--output", "{tmp}"], "is a directory: give a file path"),
    "empty model directory": (["--model", "{tmp}/empty"], "has no config.json: not a Hugging Face model directory"),
    "model without tokenizer": (["--model", "{tmp}/notok"], "cannot load a tokenizer from"),
    "input is a directory": (["--input", "{tmp}/empty"], "empty' is not a file"),
}


@pytest.mark.parametrize("case", sorted(SCORE_CASES))
def test_score_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, case):
    """Guards `vigor score` against bad input a new user gives: each used to end in a raw traceback, or
    (`--batch-groups -1`) in `null` lines and exit 0. Each must be a one-line error, a non-zero exit, and no
    output file."""
    args, message = SCORE_CASES[case]
    rows = [("1+1=", "2"), ("1+1=", "3"), ("" if case == "empty prompt" else "2+2=", "4"), ("2+2=", "5")]
    src = _pairs(tmp_path / "pairs.jsonl", rows)
    if case == "bad utf-8":
        src.write_bytes(src.read_bytes().replace(b'"3"', b'"\xff"'))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notok").mkdir()
    (tmp_path / "notok" / "config.json").write_text("{}")
    dst = tmp_path / "out" / "scored.jsonl"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--output" not in args:
        args += ["--output", str(dst)]
    capsys.readouterr()
    assert main(["score", "--input", str(src), "--hidden", "32", "--layers", "1", *args]) != 0
    out, err = capsys.readouterr()
    assert err.startswith("vigor: error: ") and message in err and err.count("\n") == 1, err
    assert out == "" and not dst.exists() and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notok", "pairs.jsonl"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
        ("rewards.weights.vigor=.nan", "rewards.weights.vigor must be a finite number, got nan"),
        ("optim.eps=-1", "optim.eps must be > 0, got -1.0"),
    ],
)
def test_train_refuses_non_finite_and_out_of_range_numbers(tmp_path, capsys, override, message):
    """Guards `vigor train` against numbers that trained to all-NaN checkpoints (exit 0) or ended in a torch
    traceback: a one-line error, exit 2, before anything is written."""
    assert main(["train", "--config", "configs/demo.yaml", f"run.dir={tmp_path / 'r'}", *TINY, override]) == 2
    err = capsys.readouterr().err
    assert err == f"vigor: error: configs/demo.yaml: {message}\n"
    assert not (tmp_path / "r").exists()


def test_train_stops_a_diverging_run_with_one_line(tmp_path, capsys, monkeypatch):
    """Guards the divergence check end to end: when the loss turns NaN (here forced at step 2) the command
    must end with a one-line error and a non-zero exit, not with NaN checkpoints and exit 0."""
    import vigor.trainer.loop as loop

    real = loop.grpo_loss

    def nan_from_step_2(*args, **kwargs):
        parts = real(*args, **kwargs)
        nan_from_step_2.calls += 1
        if nan_from_step_2.calls >= 2:
            parts.loss = parts.loss * float("nan")
        return parts

    nan_from_step_2.calls = 0
    monkeypatch.setattr(loop, "grpo_loss", nan_from_step_2)
    args = [
        "train",
        "--config",
        "configs/demo.yaml",
        f"run.dir={tmp_path / 'r'}",
        *TINY,
        "run.steps=3",
        "run.save_every=1",
    ]
    assert main([*args, "sampling.mask_truncated_completions=false"]) == 2
    # the last line is the error, one line (transformers' weight-loading progress bar may come before it)
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert err.startswith("vigor: error: step 2: the loss is nan; the run stopped without saving this step")
    assert "step-000001" in err
    assert not (tmp_path / "r" / "final_model").exists()


def test_train_refuses_a_model_directory_it_cannot_load(tmp_path, capsys):
    """Guards `model.name` pointing at a directory that holds no model (an empty one, or one with a broken
    config): a one-line error and exit 2, not a transformers traceback."""
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-family"}')
    args = ["train", "--config", "configs/demo.yaml", f"run.dir={tmp_path / 'r'}", *TINY, "model.tokenizer=chars"]
    assert main([*args, f"model.name={empty}"]) == 2
    err = capsys.readouterr().err
    assert "has no config.json: not a Hugging Face model directory" in err and err.count("\n") == 1
    assert main([*args, f"model.name={broken}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vigor: error: model.name: cannot load a causal LM from") and err.count("\n") == 1, err
