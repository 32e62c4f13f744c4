"""The floating-point dtypes the project accepts by name (``--dtype``, ``model.dtype``)."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
