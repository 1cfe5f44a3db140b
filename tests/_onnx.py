"""Shared helper of the layer tests: export a module to ONNX and run it with onnxruntime."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import Tensor, nn


def run_onnx(module: nn.Module, *inputs: Tensor, dynamo: bool = False) -> np.ndarray:
    """Export ``module`` and return onnxruntime's output for ``inputs``.

    ``dynamo=False``: the TorchScript exporter (opset 17); ``dynamo=True``: the
    torch.export-based exporter, ``torch.onnx.export``'s default since torch 2.9 (needs
    onnxscript).
    """
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(module.eval(), inputs, dynamo=True, verbose=False)
            model = program.model_proto.SerializeToString()
        else:
            buffer = io.BytesIO()
            torch.onnx.export(module.eval(), inputs, buffer, dynamo=False, opset_version=17)
            model = buffer.getvalue()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)[0]
