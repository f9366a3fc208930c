"""CPU int8: dynamic quantisation of linear layers (weights int8, activations quantised on the fly)."""

from __future__ import annotations

import torch


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of every ``nn.Linear`` (weights int8, activations quantised on
    the fly); the tied output projection stays fp32 because it is a matmul, not a Linear."""
    import warnings

    with warnings.catch_warnings():
        # torch marks torch.ao.quantization deprecated in favour of torchao; it still works in
        # this torch and its speed and accuracy are measured by `duplex bench models`
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
