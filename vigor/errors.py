"""Exceptions of the model-level API. Each message names the input, module or parameter at fault."""


class BatchError(ValueError):
    """input_ids / attention_mask / loss_mask are inconsistent (shape, dtype, device, values)."""


class NotACausalLMError(TypeError):
    """The model is not a causal language model returning next-token logits."""


class UnsupportedModuleError(TypeError):
    """A trainable module has no per-sample norm rule (see ``vigor.rules``; ``fallback=True`` covers it
    exactly, and slowly, by per-sample autograd)."""


class ThetaError(ValueError):
    """The parameters to take norms over (theta, ``params=``) are empty or malformed."""


class SelfCheckError(RuntimeError):
    """The first-call self-check found per-sample norms that disagree with plain autograd."""
