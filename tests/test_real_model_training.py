"""GRPO with VIGOR and LoRA on SmolLM2-135M-Instruct (configs/smollm2-lora.yaml): a few steps, slow.

Marked ``slow`` (deselected by default; run with ``pytest -m slow tests/test_real_model_training.py``): a
training step of a 30-layer model takes tens of seconds on a 2-core CPU, too long for CI.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2-lora.yaml"


def test_smollm2_lora_config_trains_and_verifies(smollm2_path, tmp_path):
    """The shipped config runs end to end on the real model (chat template, LoRA theta), the engine
    agrees with the oracle on the step's own completions, and the update has a non-zero gradient."""
    from vigor.trainer import load_config, train

    overrides = [
        f"run.dir={tmp_path / 'run'}", "run.steps=2", "verify.every=1", "run.save_every=0", "plots.enabled=false",
        "eval.every=0", "sampling.max_new_tokens=16", "sampling.group_size=4", "sampling.prompts_per_step=1",
        # 16 tokens truncate most answers: keep them scored, or a step may have nothing to verify
        "sampling.mask_truncated_completions=false",
    ]  # fmt: skip
    cfg = load_config(CONFIG, overrides)
    records = train(cfg)
    steps = [r for r in records if r.get("step", 0) > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["verify/max_rel_err"] <= 1e-4, r
        assert r["time/step"] > 0 and r["grad_norm"] > 0
    assert (tmp_path / "run" / "final_model" / "adapter_config.json").is_file()
