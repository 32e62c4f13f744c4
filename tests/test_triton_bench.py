"""The GPU-side scripts of the triton backend, checked on the CPU: the calibration's fit and its
generated module, and that every kernel compiles for an H100 (sm_90) without a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu import triton_calibrate as calib  # noqa: E402
from vigor_kernels import cost  # noqa: E402


def synthetic(d_in: int, d_out: int, ghost_slowdown: float, lengths=(256, 512, 1024, 2048, 4096, 8192)):
    """Timings proportional to FLOPs, ghost ``ghost_slowdown`` times less efficient than direct."""
    out = []
    for t in lengths:
        rows = [t] * 8
        gf, df = cost.ghost_flops(rows, d_in, d_out), cost.direct_flops(rows, d_in, d_out)
        out.append(
            dict(
                layer=f"{d_in}x{d_out}",
                d_in=d_in,
                d_out=d_out,
                T=t,
                batch=8,
                ghost_flops=gf,
                direct_flops=df,
                ghost_ms=gf * ghost_slowdown * 1e-9,
                direct_ms=df * 1e-9,
            )
        )
    return out


def test_fit_recovers_the_true_factor_and_the_crossover():
    records = synthetic(3584, 512, 1.6) + synthetic(1536, 1536, 1.6) + synthetic(3584, 18944, 1.6)
    factor = calib.fit_factor(records)
    assert calib.regret_ms(records, factor) == 0.0
    assert calib.regret_ms(records, 1.0) > 0.0  # the uncalibrated model picks wrong somewhere
    # the measured crossover of the k/v shape is where ghost time equals direct time
    crossing = calib.measured_crossover(records, "3584x512")
    assert math.isclose(crossing, cost.crossover_length(3584, 512, 1.6), rel_tol=0.05)
    assert calib.measured_crossover(synthetic(64, 64, 1.0, lengths=(512, 1024)), "64x64") is None


def test_install_keeps_other_gpus(tmp_path):
    data = tmp_path / "calibration.json"
    calib.install("GPU A", 1.25, "run-a", path=data)
    calib.install("GPU B", 0.8, "run-b", path=data)
    table = json.loads(data.read_text())
    assert {gpu: e["ghost_cost_factor"] for gpu, e in table.items()} == {"GPU A": 1.25, "GPU B": 0.8}
    assert table["GPU B"]["source"] == "run-b"


def test_the_shipped_calibration_is_read_at_import():
    """The backend reads its factors from the data file the installer writes (no generated source)."""
    from vigor_kernels import triton_backend

    shipped = json.loads((ROOT / "vigor_kernels" / "triton_backend" / "calibration.json").read_text())
    assert shipped == triton_backend._CALIBRATION


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode != 0,
    reason="triton is not installed",
)
def test_every_kernel_compiles_for_sm90():
    """The interpreter cannot see a kernel that fails to lower for the GPU; compile one config of each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu" / "triton_compile_check.py"),
            "--quick",
            "--dtypes",
            "bfloat16,float32",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith(("ghost bfloat16", "direct bfloat16"))]
    assert lines and all("tc=True" in line and "pipelined=True" in line for line in lines), run.stdout


def _triton_serves_cpu() -> bool:
    import torch

    import vigor_kernels as vk

    status = vk.available_backends()["triton"]
    return status.available and vk.dispatch._load("triton").cannot_serve(torch.device("cpu"), torch.float32) is None


@pytest.mark.skipif(not _triton_serves_cpu(), reason="needs TRITON_INTERPRET=1 to run triton on the CPU")
def test_gpu_scripts_run_end_to_end_on_tiny_shapes(tmp_path):
    """The calibration and the ghost benchmark, on the CPU under the interpreter: same code as on the GPU."""
    import json

    from bench.gpu import triton_ghost_bench

    common = ["--device", "cpu", "--layers", "tiny", "--batch", "2"]
    calib.main([*common, "--lengths", "8,24,40", "--dtype", "float16", "--out", str(tmp_path / "cal")])
    result = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert len(result["records"]) == 6 and result["factor"] > 0
    assert "crossover" in (tmp_path / "cal" / "calibration.md").read_text()
    triton_ghost_bench.main([*common, "--lengths", "8,20", "--out", str(tmp_path / "ghost")])
    result = json.loads((tmp_path / "ghost" / "ghost.json").read_text())
    assert [r["T"] for r in result["records"]] == [8, 20]
    assert all(r["triton_tflops"] > 0 and r["torch_max_rel_diff_vs_triton"] < 1e-4 for r in result["records"])
