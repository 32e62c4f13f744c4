"""Ghost/direct cost factors of the triton backend, per GPU model (``torch.cuda.get_device_name``).

Written by ``python bench/triton_calibrate.py --install`` on a GPU (see scripts/gpu/triton_suite.sh);
do not edit by hand. Empty until a GPU run: the backend then uses 1.0, the pure FLOP-count model.
"""

GHOST_COST_FACTORS: dict[str, float] = {}
