"""Apply each mutant of :mod:`tests.mutants.catalog` to a scratch copy of the tree, run its tests, report.

Outcomes: CAUGHT (a listed test failed, or the mutant does not build), SURVIVED (every listed test passed),
STALE (the mutant's ``original`` text is not in its file: the list is out of date), AMBIGUOUS (the text
occurs more than once), UNREACHABLE (needs a CUDA GPU this machine lacks), ERROR (pytest could not run the
tests, e.g. a test id that no longer exists). Before any mutant, the union of the listed tests must pass
on the unmutated copy, else every "caught" would be meaningless. Kill rate = caught / (caught + survived).

The working tree is never modified: the copy holds the tracked and untracked (not ignored) files plus the
built ``vigor_kernels/_C*.so``. A mutant in ``csrc/cpu`` rebuilds ``_C`` in the copy (``setup.py
build_ext --inplace``, VIGOR_WITH_CUDA=0, incremental after the first build); the original library is put
back afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.mutants.catalog import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "tests" / "mutants" / "results"
TEST_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 900


@dataclass
class Outcome:
    name: str
    file: str
    status: str  # CAUGHT, SURVIVED, STALE, AMBIGUOUS, UNREACHABLE, ERROR
    detail: str
    seconds: float
    tests: list[str]
    why: str


def _git_files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def make_scratch(root: Path, where: Path) -> Path:
    """A copy of the tree under ``where`` with the built extension; returns its root."""
    dest = where / "tree"
    for rel in _git_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    built = sorted((root / "vigor_kernels").glob("_C*.so"))
    if not built:
        raise SystemExit("no vigor_kernels/_C*.so in the tree: build it first (make install)")
    for lib in built:
        shutil.copy2(lib, dest / "vigor_kernels" / lib.name)
    return dest


def _env(tree: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_tests(tree: Path, tests: list[str], select: str | None = None) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    if select:
        cmd += ["-k", select]
    try:
        done = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TEST_TIMEOUT_S} s"
    lines = [ln for ln in (done.stdout + done.stderr).strip().splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return done.returncode, (failed[0] if failed else (lines[-1] if lines else ""))[:300]


def build_extension(tree: Path) -> tuple[bool, str]:
    env = {**_env(tree), "VIGOR_WITH_CUDA": "0"}
    env.setdefault("VIGOR_BUILD_JOBS", "2")
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"build timed out after {BUILD_TIMEOUT_S} s"
    errors = [ln for ln in (done.stdout + done.stderr).splitlines() if "error" in ln.lower()]
    return done.returncode == 0, (errors[0] if errors else "")[:300]


def cuda_device_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def compile_cuda(m: Mutant, tree: Path) -> tuple[bool | None, str]:
    """Compile the mutated CUDA source alone with nvcc (sm_80): all a machine without a GPU can check."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "no nvcc either: not even compiled"
    source = (tree / m.file).read_text()
    with tempfile.TemporaryDirectory(prefix="vigor-mutant-cu-") as tmp:
        mutated = Path(tmp) / Path(m.file).name
        mutated.write_text(source.replace(m.original, m.replacement, 1))
        cmd = [nvcc, "-std=c++17", "-O1", "-arch=sm_80", f"-I{tree / 'csrc'}", "-c", str(mutated), "-o", f"{tmp}/k.o"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, f"nvcc timed out after {BUILD_TIMEOUT_S} s"
    if done.returncode != 0:
        errors = [ln for ln in done.stderr.splitlines() if "error" in ln]
        return False, (errors[0] if errors else done.stderr.strip()[-200:])[:300]
    return True, "the mutated kernel compiles (nvcc -arch=sm_80); only tests on a GPU could catch it"


def check_text(m: Mutant, tree: Path) -> str | None:
    """STALE / AMBIGUOUS, or None when the original occurs exactly once."""
    path = tree / m.file
    if not path.is_file():
        return "STALE"
    count = path.read_text().count(m.original)
    return None if count == 1 else ("STALE" if count == 0 else "AMBIGUOUS")


def run_mutant(m: Mutant, tree: Path, pristine_libs: dict[Path, bytes]) -> Outcome:
    start = time.perf_counter()

    def done(status: str, detail: str) -> Outcome:
        return Outcome(m.name, m.file, status, detail, round(time.perf_counter() - start, 1), list(m.tests), m.why)

    problem = check_text(m, tree)
    if problem:
        return done(problem, f"'original' occurs {'0' if problem == 'STALE' else '>1'} times in {m.file}")
    if m.needs == "cuda-device" and not cuda_device_available():
        compiled, message = compile_cuda(m, tree)
        if compiled is False:
            return done("CAUGHT", f"does not compile: {message}")
        return done("UNREACHABLE", f"no CUDA device to run its tests; {message}")
    path = tree / m.file
    source = path.read_text()
    native = m.file.startswith("csrc/")
    try:
        path.write_text(source.replace(m.original, m.replacement, 1))
        if native:
            ok, message = build_extension(tree)
            if not ok:
                return done("CAUGHT", f"does not build: {message}")
        rc, summary = run_tests(tree, list(m.tests), m.select)
    finally:
        path.write_text(source)
        if native:
            for lib, data in pristine_libs.items():
                lib.write_bytes(data)
    if rc == 0:
        return done("SURVIVED", summary)
    if rc in (2, 3, 4, 5):  # interrupted, internal error, usage error, nothing collected
        return done("ERROR", f"pytest exit {rc}: {summary}")
    return done("CAUGHT", summary)


def summarize(outcomes: list[Outcome]) -> dict:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    judged = counts.get("CAUGHT", 0) + counts.get("SURVIVED", 0)
    return {"counts": counts, "kill_rate": (counts.get("CAUGHT", 0) / judged) if judged else None}


def markdown(report: dict) -> str:
    s = report["summary"]
    rate = "n/a" if s["kill_rate"] is None else f"{100 * s['kill_rate']:.1f}%"
    counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(s["counts"].items()))
    lines = [
        "# Mutation testing report",
        "",
        f"`{report['command']}` at commit `{report['commit']}` on {report['date']} ({report['host']}, "
        f"python {report['python']}); {report['seconds']:.0f} s.",
        "",
        f"**Kill rate {rate}** (caught / (caught + survived)); {counts}.",
        "",
        *[f"Re-run later: `{r['command']}` at `{r['commit']}` on {r['date']}." for r in report.get("reruns", [])],
        "",
        "| mutant | file | status | seconds | detail | why it is plausible |",
        "|---|---|---|---:|---|---|",
    ]
    for o in report["mutants"]:
        detail = o["detail"].replace("|", "\\|")
        lines.append(f"| {o['name']} | `{o['file']}` | {o['status']} | {o['seconds']} | {detail} | {o['why']} |")
    return "\n".join(lines) + "\n"


def merged(path: Path, rerun: dict) -> dict:
    """The report at ``path`` with the re-run mutants' entries replaced (or added, in catalog order)."""
    if not path.is_file():
        raise SystemExit(f"--update: no report at {path} to update; run every mutant first")
    report = json.loads(path.read_text())
    entries = {o["name"]: o for o in report["mutants"]}
    entries.update({o["name"]: o for o in rerun["mutants"]})
    order = [m.name for m in MUTANTS if m.name in entries]
    report["mutants"] = [entries[n] for n in order]
    report["summary"] = summarize([Outcome(**o) for o in report["mutants"]])
    names = [o["name"] for o in rerun["mutants"]]
    report.setdefault("reruns", []).append({k: rerun[k] for k in ("command", "commit", "date")} | {"mutants": names})
    return report


def write_report(out: Path, report: dict) -> None:
    from vigor.atomic import write_json, write_text

    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))


def _commit(root: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("-dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only (no report written)")
    parser.add_argument("--list", action="store_true", help="list the mutants and whether their text is found")
    parser.add_argument("--skip-baseline", action="store_true", help="do not first run the tests unmutated")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report directory (default {DEFAULT_OUT})")
    parser.add_argument(
        "--update", action="store_true", help="with --only: replace those mutants' entries in the existing report"
    )
    args = parser.parse_args(argv)

    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        raise SystemExit("duplicate mutant names in the catalog")
    chosen = list(MUTANTS)
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(f"unknown mutant(s) {unknown}; see --list")
        chosen = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        problems = {m.name: check_text(m, ROOT) for m in chosen}
        for m in chosen:
            print(f"{m.name:42s} {problems[m.name] or 'ok':9s} {m.file}")
        return 1 if any(problems.values()) else 0

    from tqdm import tqdm

    started = time.perf_counter()
    commit = _commit(ROOT)  # the tree as copied: later commits do not change what was tested
    with tempfile.TemporaryDirectory(prefix="vigor-mutants-") as scratch:
        tree = make_scratch(ROOT, Path(scratch))
        pristine = {lib: lib.read_bytes() for lib in (tree / "vigor_kernels").glob("_C*.so")}
        if not args.skip_baseline:
            by_select: dict[str | None, set[str]] = {}
            for m in chosen:
                if m.needs is None:
                    by_select.setdefault(m.select, set()).update(m.tests)
            for select, tests in tqdm(by_select.items(), desc="baseline (unmutated)", dynamic_ncols=True):
                rc, summary = run_tests(tree, sorted(tests), select)
                if rc != 0:
                    print(f"baseline: the listed tests fail unmutated (exit {rc}): {summary}", file=sys.stderr)
                    return 2
        outcomes = []
        bar = tqdm(chosen, desc="mutants", unit="mutant", dynamic_ncols=True)
        for m in bar:
            bar.set_postfix_str(m.name)
            outcome = run_mutant(m, tree, pristine)
            outcomes.append(outcome)
            tqdm.write(f"{outcome.status:11s} {m.name} ({outcome.seconds:.0f} s) {outcome.detail[:120]}")
    report = {
        "command": "python -m tests.mutants" + (" --only " + " ".join(args.only) if args.only else ""),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs), OMP_NUM_THREADS={_env(ROOT)['OMP_NUM_THREADS']}",
        "python": platform.python_version(),
        "seconds": time.perf_counter() - started,
        "summary": summarize(outcomes),
        "mutants": [asdict(o) for o in outcomes],
    }
    if args.only and args.update:
        report = merged(args.out / "report.json", report)
    print(markdown(report))
    if not args.only or args.update:
        write_report(args.out, report)
    bad = {"SURVIVED", "STALE", "AMBIGUOUS", "ERROR"}
    return 1 if any(o.status in bad for o in outcomes) else 0
