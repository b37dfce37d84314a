"""Activation-aware scales for weight quantization (AWQ-style search).

For each linear, the inputs it sees on a calibration text give a per-input-channel magnitude m.
Candidate scales s = m**alpha (alpha on a grid from 0, which is plain round-to-nearest, to 1)
multiply the weight's columns before quantization; the candidate whose dequantized weight,
divided back by s, best reproduces the linear's outputs on those inputs wins. The graph then
feeds the linear ``x * (1/s)``. Salient input channels get finer steps, at no cost in bits.
"""

from __future__ import annotations

import numpy as np

from llmc.interpret import run
from llmc.ir import Graph
from llmc.quant import Scheme, dequantize, quantize

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_ROWS = 512


def capture_linear_inputs(graph: Graph, tokens: np.ndarray, names: set[str]) -> dict[str, np.ndarray]:
    """weight name -> the [rows, K] inputs its linear saw while the graph ran on ``tokens``."""
    from llmc.abi import one_sequence

    sites = {}
    for node in graph.nodes():
        if node.op == "linear" and node.inputs[1].op == "weight" and node.inputs[1].attrs["name"] in names:
            sites.setdefault(node.inputs[1].attrs["name"], node.inputs[0])
    probe = Graph(graph.inputs, list(sites.values()), graph.weights)
    values = run(probe, one_sequence(graph, tokens))
    return {name: value.reshape(-1, value.shape[-1])[-MAX_ROWS:] for name, value in zip(sites, values)}


def search_scales(weight: np.ndarray, inputs: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, float]:
    """(per-column scales, alpha) minimising the output error of the quantized weight on ``inputs``."""
    magnitude = np.abs(inputs).mean(axis=0).astype(np.float64)
    # A channel nearly silent on the calibration text must not get a vanishing scale: elsewhere it
    # may be active, and its weights would have been quantized far too coarsely.
    magnitude = np.maximum(magnitude, 0.05 * magnitude.mean() + 1e-8)
    want = inputs @ weight.T
    best = (np.inf, np.ones(weight.shape[1], np.float32), 0.0)
    for alpha in ALPHAS:
        scales = magnitude ** alpha
        scales = (scales / np.sqrt(scales.max() * scales.min())).astype(np.float32)
        restored = dequantize(quantize(weight * scales[None, :], scheme), scheme, weight.shape[1]) / scales[None, :]
        error = float(np.mean((inputs @ restored.T - want) ** 2))
        if error < best[0]:
            best = (error, scales, alpha)
    return best[1], best[2]

