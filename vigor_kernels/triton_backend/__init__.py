"""The ``triton`` backend (placeholder until issue #3 lands its kernels)."""

from __future__ import annotations


class _Pending:
    name = "triton"

    def unavailable_reason(self) -> str | None:
        return "not implemented yet (issue #3)"


BACKEND = _Pending()
