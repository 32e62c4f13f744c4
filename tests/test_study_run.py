"""The reward study's runner and report: arms replace the rewards section, runs are paired across arms, finished
runs are not redone, and the table's numbers are what the raw run files say."""

from __future__ import annotations

import json

import pytest
import yaml

from vigor.study.report import markdown_table, summarize, write_report
from vigor.study.run import load_study_config, read_runs, run_config, run_study
from vigor.trainer.config import ConfigError

BASE = {
    "run": {"steps": 2, "progress": False},
    "compute": {"threads": 1},
    "plots": {"enabled": False},
    "model": {"name": "tiny-qwen2", "hidden": 32, "layers": 1, "heads": 4},
    "data": {"task": "addition", "num_train": 16, "num_test": 4, "prompt_template": "{question}="},
    "sampling": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 6, "mask_truncated_completions": False},
    "rewards": {"weights": {"vigor": 1.0}},
    "optim": {"lr": 1e-2},
    "eval": {"every": 2, "num_examples": 4},
}


def study_file(tmp_path, arms, seeds=(0,)):
    values = {
        "out_dir": str(tmp_path / "results"),
        "runs_dir": str(tmp_path / "runs"),
        "seeds": list(seeds),
        "arms": arms,
        "base": BASE,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_arm_rewards_replace_the_base_section(tmp_path):
    """The base names vigor; the random arm must train on random alone (no merged vigor weight), with the
    study's shared data files and the seed in every run."""
    study = load_study_config(study_file(tmp_path, {"random": {"weights": {"random": 1.0}}}))
    cfg = run_config(study, "random", 0)
    assert cfg.rewards.weights == {"random": 1.0}
    assert cfg.data.train_file.endswith("data/train.jsonl") and cfg.run.seed == 0
    with pytest.raises(ConfigError, match="arm 'bad'"):
        load_study_config(study_file(tmp_path, {"bad": {"weights": {"nope": 1.0}}}))


def test_runs_are_paired_and_not_redone(tmp_path):
    """Two arms on one seed: the evaluation before training and the first sampled batch are the same for both
    (same checkpoint, same RNG, same prompts); the random arm computes no VIGOR; a second call redoes nothing;
    the report reads back both runs."""
    arms = {"random": {"weights": {"random": 1.0}}, "vigor": {"weights": {"vigor": 1.0}}}
    study = load_study_config(study_file(tmp_path, arms))
    written = run_study(study)
    assert len(written) == 2
    runs = {r["arm"]: r["records"] for r in read_runs(study.out_dir)}
    for key in ("eval/accuracy", "eval/accuracy_t1", "eval/completion_length_t1"):
        assert runs["random"][0][key] == runs["vigor"][0][key]
    assert runs["random"][1]["completion_length"] == runs["vigor"][1]["completion_length"]
    assert "vigor/raw" not in runs["random"][1] and "vigor/raw" in runs["vigor"][1]
    assert run_study(study) == []
    summary = write_report(study.out_dir)
    assert set(summary["arms"]) == {"random", "vigor"}
    assert (tmp_path / "results" / "study.png").is_file()


def test_summary_numbers_from_known_runs():
    """Start/final/best/gain and the paired difference against random, computed by hand from made-up runs."""

    def run(arm, seed, greedy, t1):
        records = [
            {"step": 10 * i, "eval/accuracy": g, "eval/accuracy_t1": t}
            for i, (g, t) in enumerate(zip(greedy, t1, strict=True))
        ]
        records[-1] |= {"completion_length": 5.0, "entropy": 0.5, "duplicates": 0.25}
        return {"arm": arm, "seed": seed, "seconds": 1.0, "records": records}

    runs = [
        run("random", 0, [0.4, 0.3, 0.4], [0.2, 0.2, 0.2]),
        run("random", 1, [0.4, 0.5, 0.5], [0.2, 0.3, 0.3]),
        run("x", 0, [0.4, 0.6, 0.5], [0.2, 0.4, 0.4]),
        run("x", 1, [0.4, 0.7, 0.9], [0.2, 0.5, 0.6]),
    ]
    s = summarize(runs)["arms"]
    assert s["x"]["final"]["mean"] == pytest.approx(0.7) and s["x"]["best"]["mean"] == pytest.approx(0.75)
    assert s["x"]["gain"]["mean"] == pytest.approx(0.3)
    assert s["x"]["final_vs_random"]["mean"] == pytest.approx(0.25)  # (0.5 - 0.4 + 0.9 - 0.5) / 2
    assert s["x"]["final_vs_random"]["std"] == pytest.approx(0.2121320, rel=1e-5)  # std of [0.1, 0.4]
    assert s["x"]["final_t1_vs_random"]["mean"] == pytest.approx(0.25)
    assert "final_vs_random" not in s["random"]
    table = markdown_table(summarize(runs))
    assert "| x | 2 | 40.0 (0.0) | 70.0 (28.3) | 75.0 (21.2) | +30.0 (28.3) | +25.0 (21.2) |" in table
    assert json.loads(json.dumps(s))  # serializable


def test_duplicate_fraction():
    """Counts completions equal to an earlier one of the same group only (not across groups)."""
    from vigor.trainer.evaluation import duplicate_fraction

    assert duplicate_fraction(["a", "a", "b", "c", "x", "x", "x", "x"], 4) == 0.5
    assert duplicate_fraction(["a", "b", "a", "b"], 2) == 0.0


def test_cli_errors_are_one_line(tmp_path, capsys):
    """Bad input to `vigor sft` and `vigor study` exits 2 with a message naming the problem."""
    from vigor.cli import main

    assert main(["sft", "stop_at_accuracy=2"]) == 2
    assert "stop_at_accuracy" in capsys.readouterr().err
    assert main(["study", "report", "--out", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
    assert main(["study", "diagnose", "--model", str(tmp_path)]) == 2
    assert "sft_config.yaml" in capsys.readouterr().err
    assert main(["study", "run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
