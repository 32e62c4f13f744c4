"""Exceptions raised by vigor_kernels. Each message names the offending input or backend."""


class VigorInputError(ValueError):
    """An op received a tensor of the wrong shape, dtype, device or content."""


class BackendError(RuntimeError):
    """A backend cannot serve this call (not built, wrong device, unsupported dtype...)."""
