"""The config's sections: help text and rules in field metadata, the generated configs/README.md, old flat keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from vigor.trainer.config import SFTConfig, TrainConfig, config_from_dict, load_config
from vigor.trainer.config_docs import main as docs_main
from vigor.trainer.config_docs import markdown
from vigor.trainer.settings import ConfigError, Section

README = Path(__file__).resolve().parent.parent / "configs" / "README.md"


def test_configs_readme_settings_are_generated_from_the_metadata():
    """Guards configs/README.md against going stale: its settings block must be exactly what the field
    metadata generates. Fix: python -m vigor.trainer.config_docs --write configs/README.md"""
    text = README.read_text()
    assert markdown() in text, (
        "configs/README.md is stale: run python -m vigor.trainer.config_docs --write configs/README.md"
    )


def test_every_setting_has_help_text_and_appears_in_the_readme():
    """Guards the metadata itself: a setting added without help text (or a section without a docstring) would
    leave an empty cell in the generated tables."""
    text = README.read_text()
    for top in (TrainConfig(), SFTConfig()):
        for sec in dataclasses.fields(top):
            value = getattr(top, sec.name)
            assert isinstance(value, Section) and type(value).__doc__, sec.name
            for f in dataclasses.fields(value):
                assert f.metadata.get("help"), f"{sec.name}.{f.name} has no help text"
                assert f"`{sec.name}.{f.name}`" in text, f"{sec.name}.{f.name} is not in configs/README.md"


def test_docs_command_rewrites_only_the_block(tmp_path, capsys):
    """The --write command replaces the generated block, keeps the prose around it, and refuses a file
    without the markers (exit 2, file untouched)."""
    stale = tmp_path / "README.md"
    text = README.read_text()
    start = text.index("<!-- settings:")
    end = text.index("<!-- end of generated settings -->")
    stale.write_text(text[:start] + text[start:end].replace("| `run.steps` |", "| `run.stepz` |") + text[end:])
    assert docs_main(["--write", str(stale)]) == 0
    assert stale.read_text() == text
    bare = tmp_path / "bare.md"
    bare.write_text("# no block\n")
    assert docs_main(["--write", str(bare)]) == 2
    assert bare.read_text() == "# no block\n"
    assert "no generated-settings block" in capsys.readouterr().err


def test_old_flat_keys_load_with_one_deprecation_line(tmp_path, capsys):
    """Guards configs written for the flat layout (and the config.yaml of old runs): they load to the same
    config as the sectioned form, with one warning line naming each old key's new place."""
    old = tmp_path / "old.yaml"
    old.write_text(
        "run_dir: runs/x\nseed: 3\nsteps: 7\nprecision: bf16\nthreads: 1\nverify_every: 2\nplots: false\n"
        "rewards:\n  theta: 'layers\\.1\\.'\n"
    )
    cfg = load_config(old, ["save_every=2"])
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.startswith(f"warning: {old}: deprecated settings, read as run_dir -> run.dir;")
    assert "compute.precision: bf16 -> bfloat16" in err and "rewards.theta -> rewards.params" in err
    assert "command line: deprecated settings, read as save_every -> run.save_every" in err
    new = {
        "run": {"dir": "runs/x", "seed": 3, "steps": 7, "save_every": 2},
        "compute": {"precision": "bfloat16", "threads": 1},
        "verify": {"every": 2},
        "plots": {"enabled": False},
        "rewards": {"params": r"layers\.1\."},
    }
    assert cfg == config_from_dict(new)
    assert capsys.readouterr().err == ""  # the sectioned form is read silently


def test_an_old_key_next_to_its_new_one_is_refused():
    with pytest.raises(ConfigError, match=r"both 'steps' \(the old name\) and 'run\.steps' are given"):
        config_from_dict({"steps": 3, "run": {"steps": 4}})


def test_a_partial_section_keeps_its_parents_defaults():
    """Guards the SFT stage's own defaults (torch's AdamW beta2 0.999, lr 1e-3, linear schedule, its
    evaluation sizes): setting one key of a section must not reset the others to vigor train's defaults."""
    cfg = SFTConfig.load(None, ["optim.warmup_steps=5", "eval.every=3"])
    assert (cfg.optim.lr, cfg.optim.beta2, cfg.optim.schedule, cfg.optim.warmup_steps) == (1e-3, 0.999, "linear", 5)
    assert (cfg.eval.every, cfg.eval.num_examples, cfg.eval.max_new_tokens) == (3, 200, 32)
    assert cfg.run.dir == "runs/sft" and TrainConfig().optim.beta2 == 0.99


def test_old_sft_configs_read_the_same_values(tmp_path, capsys):
    """The committed warm start was trained with a flat SFT config: its old form still reads to the values
    its new form holds."""
    flat = {
        "run_dir": "runs/addition-sft",
        "seed": 0,
        "steps": 1500,
        "threads": 1,
        "batch_size": 128,
        "lr": 2.0e-3,
        "schedule": "linear",
        "warmup_steps": 20,
        "eval_every": 10,
        "eval_examples": 200,
        "eval_batch_size": 200,
        "max_new_tokens": 16,
        "stop_at_accuracy": 0.4,
        "export_dir": "checkpoints/addition-sft",
        "model": {"hidden": 128, "layers": 3},
        "data": {"task": "addition", "num_train": 20000, "num_test": 500, "prompt_template": "{question}="},
    }
    path = tmp_path / "old-sft.yaml"
    path.write_text(yaml.safe_dump(flat))
    old = SFTConfig.load(path)
    assert "deprecated settings" in capsys.readouterr().err
    new = SFTConfig.load("configs/addition-sft.yaml")
    assert dataclasses.asdict(old) == dataclasses.asdict(new)


def test_shipped_configs_use_the_sections_only(capsys):
    """Every YAML under configs/ (and the committed SFT record) is in the sectioned form: loading it prints
    no deprecation warning."""
    from vigor.study.run import load_study_config

    for path in sorted(Path("configs").glob("*.yaml")):
        loader = SFTConfig.load if "sft" in path.name else load_config
        loader(path)
    SFTConfig.load("checkpoints/addition-sft/sft_config.yaml")
    load_study_config("configs/study/addition.yaml")
    assert capsys.readouterr().err == ""
