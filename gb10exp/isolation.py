"""Process-wide settings a job may change, put back when it ends (even when it fails).

A sweep runs its jobs one after another in one process (Hydra's basic launcher, the in-process tests): a
seed drawn, a default dtype or a matmul precision set by one job must not reach the next, or results
would depend on job order. (Inductor's config, which the tuned decode path sets, is restored there.)
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def restored_globals() -> Iterator[None]:
    """Save torch's default dtype and device, every RNG state, grad mode, thread count, matmul and
    determinism settings; restore them on exit. Usable as a decorator."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # never initialise CUDA just to save it
    saved = {
        "dtype": torch.get_default_dtype(),
        "device": torch.get_default_device(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "grad": torch.is_grad_enabled(),
        "threads": torch.get_num_threads(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn": torch.is_deterministic_algorithms_warn_only_enabled(),
    }
    try:
        yield
    finally:
        torch.set_default_dtype(saved["dtype"])
        if torch.get_default_device() != saved["device"]:  # setting "cpu" would add a mode to every call
            torch.set_default_device(None if saved["device"].type == "cpu" else saved["device"])
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        random.setstate(saved["python_rng"])
        np.random.set_state(saved["numpy_rng"])
        torch.set_grad_enabled(saved["grad"])
        torch.set_num_threads(saved["threads"])
        torch.set_float32_matmul_precision(saved["matmul_precision"])
        torch.backends.cudnn.allow_tf32 = saved["cudnn_tf32"]
        torch.use_deterministic_algorithms(saved["deterministic"], warn_only=saved["deterministic_warn"])
