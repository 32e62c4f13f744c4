"""The ``cuda`` backend (placeholder until issue #4 lands its kernels)."""

from __future__ import annotations


class _Pending:
    name = "cuda"

    def unavailable_reason(self) -> str | None:
        return "not implemented yet (issue #4)"


BACKEND = _Pending()
