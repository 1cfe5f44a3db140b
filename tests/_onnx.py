"""Shared helper of the layer tests: export a module to ONNX and run it with onnxruntime."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import Tensor, nn


def run_onnx(module: nn.Module, *inputs: Tensor) -> np.ndarray:
    """Export ``module`` with the TorchScript exporter and return onnxruntime's output."""
    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), inputs, buffer, dynamo=False, opset_version=17)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)[0]
