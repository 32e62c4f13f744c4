"""The ``vigor`` command: train, score, verify; clear messages for bad input."""

from __future__ import annotations

import json

import pytest
import torch

import vigor
from vigor.cli import main
from vigor.rewards import group_advantages, rank_shape
from vigor.testing import tiny_model
from vigor.trainer.sampling import pack_pairs
from vigor.trainer.tokenizer import char_tokenizer

TINY = [
    "threads=null",
    "model.hidden=32",
    "model.layers=1",
    "data.num_train=8",
    "data.num_test=2",
    "progress=false",
    "plots=false",
]
TINY += ["sampling.group_size=2", "sampling.prompts_per_step=1", "sampling.max_new_tokens=4"]


def test_train_runs_from_the_command_line(tmp_path, capsys):
    assert main(["train", "--config", "configs/demo.yaml", f"run_dir={tmp_path / 'r'}", "steps=1", *TINY]) == 0
    assert "done: " in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 1 and "reward/vigor" in records[-1]
    # resuming a finished run does nothing more and keeps its metrics
    assert (
        main(["train", "--config", "configs/demo.yaml", "--resume", f"run_dir={tmp_path / 'r'}", "steps=1", *TINY]) == 0
    )
    assert [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    # the exported policy is a local Hugging Face directory: train and score from it as from any real model
    final = tmp_path / "r" / "final_model"
    args = ["train", "--config", "configs/demo.yaml", f"run_dir={tmp_path / 'r2'}", "steps=1", *TINY]
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
        ("resume: /nowhere/ckpt\n", "resume: checkpoint directory '/nowhere/ckpt' does not exist"),
    ],
)
def test_train_reports_bad_configs_clearly(tmp_path, capsys, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\n" + yaml_text)
    assert main(["train", "--config", str(path), *TINY]) == 2
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
    ids, attn, loss = pack_pairs(prompts, completions, tok.pad_token_id, torch.device("cpu"))
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
