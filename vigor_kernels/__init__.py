"""vigor_kernels: stateless tensor ops returning per-sample squared gradient norms.

Every op takes activations / output gradients captured from one batched backward and returns a
float32 tensor ``[B]`` of per-sample *squared* norms, never forming a per-sample gradient. Knows
nothing of nn.Module or transformers (that is the ``vigor`` package's job).
"""

from vigor_kernels.cost import choose_linear_method, crossover_length
from vigor_kernels.dispatch import ENV_VAR, BackendStatus, available_backends, requested_backend, select_backend
from vigor_kernels.errors import BackendError, VigorInputError
from vigor_kernels.input_grams import shared_input_grams
from vigor_kernels.ops.embedding import embedding_sq_norms, tied_cross_term, tied_head_rows
from vigor_kernels.ops.head import HeadResult, fused_head, head_tied_rows
from vigor_kernels.ops.linear import METHODS as LINEAR_METHODS
from vigor_kernels.ops.linear import linear_weight_sq_norms
from vigor_kernels.ops.reductions import bias_sq_norms, norm_weight_sq_norms, row_dot
from vigor_kernels.ranges import RowRanges, as_row_ranges

__all__ = [
    "ENV_VAR",
    "LINEAR_METHODS",
    "BackendError",
    "BackendStatus",
    "HeadResult",
    "RowRanges",
    "VigorInputError",
    "as_row_ranges",
    "available_backends",
    "bias_sq_norms",
    "choose_linear_method",
    "crossover_length",
    "embedding_sq_norms",
    "fused_head",
    "head_tied_rows",
    "linear_weight_sq_norms",
    "norm_weight_sq_norms",
    "requested_backend",
    "row_dot",
    "select_backend",
    "shared_input_grams",
    "tied_cross_term",
    "tied_head_rows",
]
