"""vigor: the VIGOR reward for causal LMs, built on exact batched per-sample gradient norms."""

from vigor.batch import TokenBatch, completion_nll, prepare_batch
from vigor.engine import per_sample_grad_norms
from vigor.errors import BatchError, NotACausalLMError, UnsupportedModuleError
from vigor.oracle import oracle_grad_norms
from vigor.rules import register_rule

__all__ = [
    "BatchError",
    "NotACausalLMError",
    "TokenBatch",
    "UnsupportedModuleError",
    "completion_nll",
    "oracle_grad_norms",
    "per_sample_grad_norms",
    "prepare_batch",
    "register_rule",
]
