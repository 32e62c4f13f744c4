"""Smoke test of bench/grad_norm_bench.py at toy size, and of the pieces its numbers rest on."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import vigor
from bench import grad_norm_bench
from bench.methods import Refused, Workload, official, torch_func
from bench.presets import PRESETS, ModelSpec, build_model, completion_lengths, grpo_batch

REQUIRED_ENV = ("commit", "torch_version", "triton_version", "device", "dtype")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--preset", "tiny", "--layers", "full", "--vocab", "full", "--group-size", "4", "--prompt-len", "6"]
    argv += ["--lengths", "12", "--repeats", "2", "--backends", "torch", "--out", str(out)]
    result = grad_norm_bench.main(argv)
    return out, result


def _methods(result):
    return {r["method"]: r for r in result["runs"][0]["methods"]}


def test_writes_json_with_environment_and_raw_times(bench_run):
    out, _ = bench_run
    on_disk = json.loads((out / "grad_norms.json").read_text())
    assert on_disk["runs"][0]["t_max"] == 12
    for key in REQUIRED_ENV:
        assert key in on_disk["environment"], key
    assert on_disk["environment"]["dtype"] == "float32"
    methods = _methods(on_disk)
    expected = {"official", "floor-train-step", "floor-input-grad", "ours-torch", "torch-func", "opacus"}
    assert expected | {"opacus-untied", "backpack"} == set(methods)
    for name, r in methods.items():
        if r["status"] == "ok":
            assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"]), name
            assert r["median_s"] == pytest.approx(sorted(r["times_s"])[0] / 2 + sorted(r["times_s"])[1] / 2)
            assert isinstance(r["peak_extra_bytes"], int)


def test_norms_are_checked_against_the_official_loop(bench_run):
    methods = _methods(bench_run[1])
    for name in ("official", "ours-torch", "torch-func"):
        assert methods[name]["status"] == "ok", methods[name].get("reason")
        assert methods[name]["max_rel_err"] < 1e-4, name
    assert methods["official"]["speedup_vs_official"] == pytest.approx(1.0)
    ours = methods["ours-torch"]
    assert ours["speedup_vs_official"] == pytest.approx(methods["official"]["median_s"] / ours["median_s"])
    floor = methods["floor-train-step"]["median_s"]
    assert ours["time_vs_floor_train_step"] == pytest.approx(ours["median_s"] / floor)
    assert "max_rel_err" not in methods["floor-input-grad"]  # floors compute no norms


def test_peers_report_refusals_and_partial_answers(bench_run):
    methods = _methods(bench_run[1])
    # The tiny preset ties its embedding to the LM head: Opacus' ghost clipping refuses it in its own words,
    # and runs on the untied twin, checked against the official loop on that twin.
    assert methods["opacus"]["status"] == "refused"
    assert "tying" in methods["opacus"]["reason"]
    twin = methods["opacus-untied"]
    assert twin["status"] == "ok" and twin["checked_against"] == "official loop on the untied twin"
    assert twin["max_rel_err"] < 1e-4
    # BackPACK: no RMSNorm extension and one use of the tied weight only, so a visibly wrong total.
    backpack = methods["backpack"]
    assert backpack["status"] == "ok"
    assert backpack["shared_params"] == ["model.embed_tokens.weight"]
    assert any("norm" in n for n in backpack["missing_params"])
    assert backpack["max_rel_err"] > 1e-3


def test_markdown_table_and_plot(bench_run):
    out, _ = bench_run
    md = (out / "grad_norms.md").read_text()
    for column in ("speedup", "× floor (a)", "× floor (b)", "peak MiB", "max rel err"):
        assert column in md
    assert "official loop" in md and "refused" in md and "Parameter tying" in md
    png = (out / "grad_norms.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_sequential_order_on_an_untied_model(tmp_path):
    argv = ["--preset", "tiny-untied", "--layers", "full", "--vocab", "full", "--group-size", "3"]
    argv += ["--lengths", "8", "--repeats", "2", "--order", "sequential", "--methods", "official,ours,opacus"]
    result = grad_norm_bench.main([*argv, "--backends", "torch", "--out", str(tmp_path)])
    methods = _methods(result)
    assert result["config"]["order"] == "sequential"
    assert list(methods) == ["official", "ours-torch", "opacus", "opacus-untied"]
    assert methods["opacus"]["status"] == "ok" and methods["opacus"]["max_rel_err"] < 1e-4  # untied: runs as is
    assert methods["opacus-untied"]["status"] == "refused"
    assert len(methods["ours-torch"]["times_s"]) == 2
    assert "speedup_vs_official" in methods["ours-torch"] and "time_vs_floor_train_step" not in methods["ours-torch"]


def test_official_loop_matches_the_oracle():
    model = build_model(ModelSpec.of(PRESETS["tiny"]), dtype=torch.float32, device=torch.device("cpu"))
    raw = grpo_batch(512, groups=2, group_size=3, prompt_len=5, t_max=9, seed=3)
    batch = vigor.prepare_batch(model, raw.input_ids, raw.attention_mask, raw.loss_mask)
    norms, per_param = official.official_loop(model, batch)
    want = vigor.oracle_grad_norms(model, raw.input_ids, raw.attention_mask, raw.loss_mask)
    assert float(((norms - want).abs() / want).max()) < 1e-5
    assert set(per_param) == {n for n, _ in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def _workload(max_bytes: int) -> Workload:
    spec = ModelSpec.of(PRESETS["tiny-untied"])
    model = build_model(spec, dtype=torch.float32, device=torch.device("cpu"))
    raw = grpo_batch(spec.vocab, groups=1, group_size=4, prompt_len=4, t_max=6, seed=1)
    batch = vigor.prepare_batch(model, raw.input_ids, raw.attention_mask, raw.loss_mask)
    return Workload(model, spec, batch, raw, torch.device("cpu"), torch.float32, "sdpa", 0, max_bytes)


def test_torch_func_chunks_or_refuses_by_the_memory_limit():
    per_sample = sum(p.numel() * 4 for p in _workload(1).model.parameters())
    with pytest.raises(Refused, match="--func-max-gib"):
        torch_func.prepare(_workload(per_sample - 1))
    work = _workload(2 * per_sample)
    prepared = torch_func.prepare(work)
    try:
        assert prepared.facts()["chunk"] == 2
        got = prepared.run()
    finally:
        prepared.cleanup()
    assert work.model.config._attn_implementation == "sdpa"  # restored
    want = vigor.oracle_grad_norms(work.model, work.raw.input_ids, work.raw.attention_mask, work.raw.loss_mask)
    assert float(((got - want).abs() / want).max()) < 1e-5


def test_grpo_batch_layout_and_lengths():
    raw = grpo_batch(100, groups=2, group_size=3, prompt_len=8, t_max=20, seed=5)
    lengths = torch.tensor(raw.completion_lengths)
    assert raw.input_ids.shape == (6, 28)
    assert torch.equal(raw.loss_mask.sum(1), lengths)
    assert not raw.loss_mask[:, :8].any()  # completions start after the prompt block
    assert raw.prompt_lengths[0] == 8 and 4 <= raw.prompt_lengths[1] <= 8
    first, second = raw.input_ids[:3, :8], raw.input_ids[3:, :8]
    assert (first == first[0]).all() and (second == second[0]).all()  # one prompt per group
    assert (raw.attention_mask[3:, : 8 - raw.prompt_lengths[1]] == 0).all()  # left padding
    assert (raw.input_ids[raw.attention_mask == 0] == 0).all()


def test_lognormal_lengths_are_ragged_and_some_truncated():
    drawn = completion_lengths(4000, 1024, "lognormal", torch.Generator().manual_seed(0))
    t = torch.tensor(drawn, dtype=torch.float64)
    assert t.min() >= 1 and t.max() == 1024
    assert 0.07 < float((t == 1024).double().mean()) < 0.17  # about 12% hit the cap
    assert 450 < float(t.median()) < 570  # median about T_max / 2
    assert completion_lengths(3, 50, "fixed", torch.Generator()) == [50, 50, 50]
    with pytest.raises(ValueError, match="length distribution"):
        completion_lengths(3, 50, "uniform", torch.Generator())


def test_results_are_json_and_markdown_and_the_png_is_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    """Guards `python bench/<script>.py` after a plain `pip install -e .` (no `bench` extra): the JSON and
    the Markdown table are written, the PNG is skipped with a one-line note instead of an ImportError."""
    from bench import harness

    drawn = []
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    written = harness.write_results(tmp_path, "demo", {"a": 1}, "| a |\n", plot=drawn.append)
    assert [p.name for p in written] == ["demo.json", "demo.md"] and not drawn
    assert json.loads((tmp_path / "demo.json").read_text()) == {"a": 1}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "demo.png skipped: matplotlib is not installed" in err
    monkeypatch.delitem(sys.modules, "matplotlib")
    harness.write_results(tmp_path, "demo", {"a": 1}, "| a |\n", plot=drawn.append)
    assert drawn == [tmp_path / "demo.png"]


def test_results_folder_from_flag_or_environment(tmp_path, monkeypatch):
    from bench import harness

    monkeypatch.setenv(harness.RESULTS_ENV, str(tmp_path))
    assert harness.results_dir(None, "ops") == tmp_path / "ops"
    assert harness.results_dir(tmp_path / "x", "ops") == tmp_path / "x"
    monkeypatch.delenv(harness.RESULTS_ENV)
    assert harness.results_dir(None, "ops") == harness.ROOT / "bench" / "results" / "ops"


def test_smollm2_preset_loads_real_weights_and_an_untied_twin(smollm2_path):
    """The real-weights preset: its vocabulary cannot be cut, a reduced depth keeps the first layers of the
    checkpoint, and the untied twin (Opacus) has a separate head holding the embedding's values."""
    preset = PRESETS["smollm2-135m"]
    with pytest.raises(ValueError, match="cannot be reduced"):
        ModelSpec.of(preset, vocab=4096)
    spec = ModelSpec.of(preset, layers=1)
    tied = build_model(spec, dtype=torch.float32, device=torch.device("cpu"))
    twin = build_model(spec.untied(), dtype=torch.float32, device=torch.device("cpu"))
    assert len(tied.model.layers) == 1 and tied.lm_head.weight is tied.model.embed_tokens.weight
    assert twin.lm_head.weight is not twin.model.embed_tokens.weight
    assert torch.equal(twin.lm_head.weight, twin.model.embed_tokens.weight)
    from safetensors import safe_open

    with safe_open(str(smollm2_path / "model.safetensors"), "pt") as f:
        first = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(tied.model.layers[0].self_attn.q_proj.weight, first)


def test_moe_preset_builds_a_qwen3_moe_config():
    """The MoE preset is a Qwen3-MoE config with the preset's expert count, top-k and widths (not the
    dense Qwen2 config of the other presets), reduced in depth and vocabulary on request."""
    from transformers import Qwen3MoeConfig

    preset = PRESETS["qwen3-moe-small"]
    config = ModelSpec.of(preset, layers=1, vocab=256).config()
    assert isinstance(config, Qwen3MoeConfig)
    assert (config.num_experts, config.num_experts_per_tok) == (preset.experts, preset.top_k)
    assert (config.hidden_size, config.moe_intermediate_size, config.head_dim) == (2048, 768, 128)
    assert (config.num_hidden_layers, config.vocab_size, config.tie_word_embeddings) == (1, 256, False)
