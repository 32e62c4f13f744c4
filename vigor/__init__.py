"""vigor: the VIGOR reward for causal LMs, built on exact batched per-sample gradient norms."""

from vigor.batch import TokenBatch, completion_nll, prepare_batch
from vigor.engine import per_sample_grad_norms
from vigor.errors import BatchError, NotACausalLMError, SelfCheckError, ThetaError, UnsupportedModuleError
from vigor.oracle import oracle_grad_norms
from vigor.rewards import VigorScores, group_advantages, rank_shape, self_certainty_scores, vigor_rewards
from vigor.rules import register_rule

__all__ = [
    "BatchError",
    "NotACausalLMError",
    "SelfCheckError",
    "ThetaError",
    "TokenBatch",
    "UnsupportedModuleError",
    "VigorScores",
    "completion_nll",
    "group_advantages",
    "oracle_grad_norms",
    "per_sample_grad_norms",
    "prepare_batch",
    "rank_shape",
    "register_rule",
    "self_certainty_scores",
    "vigor_rewards",
]
