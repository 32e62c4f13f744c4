"""The project's own documentation: every docs/ citation in the tree points at a page and a section that
exist, nothing cites the design brief outside the project, and the README's first example runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout  # fmt: skip
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_docs_citation_resolves():
    """Guards against citations that rot: `docs/<page>.md#<anchor>` anywhere in the tree, and relative links
    between the docs pages, must name an existing page and heading."""
    cited = []
    for path in _tracked("*.py", "*.md", "*.yaml", "*.sh"):
        text = path.read_text(errors="replace")
        for page, anchor in re.findall(r"docs/([\w-]+\.md)(?:#([\w-]+))?", text):
            cited.append((path, page, anchor))
        if path.parent.name == "docs":
            for page, anchor in re.findall(r"\]\(([\w-]+\.md)(?:#([\w-]+))?\)", text):
                cited.append((path, page, anchor))
    assert len(cited) > 10
    for path, page, anchor in cited:
        target = ROOT / "docs" / page
        assert target.is_file(), f"{path.relative_to(ROOT)} cites docs/{page}, which does not exist"
        assert not anchor or anchor in _anchors(target), f"{path.relative_to(ROOT)}: no section #{anchor} in {page}"


def test_nothing_cites_the_brief_outside_the_project():
    """A clone of this repository has no ../shared: the project cites its own docs/."""
    for path in _tracked("*.py", "*.md", "*.yaml", "*.sh", "*.toml", "*.cfg", "*.txt"):
        rel = str(path.relative_to(ROOT))
        if rel.startswith("tests/test_docs.py"):
            continue
        text = path.read_text(errors="replace")
        assert "../shared" not in text and not re.search(r"\bSPEC\b(?!_)", text), f"{rel} cites the brief"


def test_the_readme_example_runs(tmp_path):
    """The README's first example, on a tiny random model saved as a local directory instead of the hub."""
    from vigor.tiny import char_tokenizer, tiny_model

    tok = char_tokenizer()
    tiny_model("qwen2", vocab=len(tok), hidden=32, layers=1, heads=4).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Use\n\n```python\n(.*?)```", readme, flags=re.S).group(1)
    code, n = re.subn(r'^path = ".*"', f"path = {str(tmp_path)!r}", code, flags=re.M)
    assert n == 1 and len(code.strip().splitlines()) <= 12
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["loss_mask"].sum(1).tolist() == [len(c) for c in scope["group"]]  # every completion token
    assert sorted(scope["rewards"].tolist()) == [-1.0, 0.0, 1.0] and torch.isfinite(scope["rewards"]).all()
