# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""`DualRouteLinear`: an ``nn.Linear`` that multiplies a decoding step's few rows faster on CPU.

A decoding step feeds every linear layer one row per sequence and beam. How fast torch's CPU ``linear`` is for 1 to
16 rows depends on the CPU's vendor, because MKL (torch's CPU BLAS) picks its kernels by vendor:

- 2-core AMD EPYC: ``linear`` is slow. The 48 projections of a 6-layer decoder (84 MB of weights) took 9 ms for one
  row and 13 ms for 2 to 4 rows, against 4.3 ms and 5-6 ms for the same products taken as ``weight @ x^T``; a 30k-word
  LM head took 5.7 ms for one row against 1.7 ms.
- 2-core Intel Xeon (AVX-512): mostly the other way round. The same 48 projections took 4.8 ms for one row, 6.7 ms
  for 4 and 8.5 ms for 8 with ``linear``, against 13.2-14.2 ms as ``weight @ x^T``; a greedy step at 16k encoder
  tokens took 22.6 ms with ``linear``, 35.7 ms with the product. The exception is a vocabulary-wide layer (the LM
  head, 30,522 x 512) fed 8 to 16 rows, which is faster as the product: 4.4 against 5.0 ms with ``linear`` for 8
  rows and 4.9 against 5.9 ms for 16 in isolation (caches flushed), and a batch-8 decoding step at 16k encoder tokens
  took 34.7-36.4 ms with it against 37.9-40.2 ms (alternating runs). For 1 to 4 rows ``linear`` is the faster there
  too (2.7 against 5.3 ms for one row).

So which calls take the product depends on the vendor (`product_policy_for`): on AMD CPUs 1 to 16 rows of every
layer, on Intel CPUs 8 to 16 rows of layers at least 8,192 outputs wide (in the shipped models the LM head), on
other CPUs none (`PRODUCT_ROWS`, `PRODUCT_MIN_OUTPUTS`, which replace the former `FEW_ROWS`; set the class attributes
to change it). One row is taken as two copies of itself, since ``weight @ x^T`` with a single column
runs torch's matrix-vector kernel, as slow there as ``linear``. Beyond 16 rows ``linear`` is as fast or faster on
both. Being the module's own ``forward``, the product is seen by hooks, adapters (LoRA wraps the module and calls it)
and offloading wrappers like any ``nn.Linear``; state dict keys are ``nn.Linear``'s.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch
from torch import nn


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor string (``"AuthenticAMD"``, ``"GenuineIntel"``, ...) or ``""`` where it cannot be read; read
    once (the linear layers and the tile kernel both pick their defaults by it at import)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def product_policy_for(vendor: str) -> tuple[range, int]:
    """``(rows, narrowest output)``: on a CPU of ``vendor``, `DualRouteLinear` takes a call of ``rows`` rows as
    ``weight @ x^T`` when the layer has at least that many outputs (measurements in the module docstring); on CPUs
    not measured, never."""
    if vendor == "AuthenticAMD":
        return range(1, 17), 0
    if vendor == "GenuineIntel":
        return range(8, 17), 8192
    return range(0), 0


def plain_weight_on(layer: nn.Linear, device: torch.device) -> bool:
    """Whether ``layer``'s weight is a plain tensor (not quantized or wrapped) on ``device`` (not offloaded)."""
    return type(layer.weight.data) is torch.Tensor and layer.weight.device == device


class DualRouteLinear(nn.Linear):
    """``nn.Linear`` whose CPU forward takes `PRODUCT_ROWS` rows of a plain float weight with at least
    `PRODUCT_MIN_OUTPUTS` outputs as ``weight @ x^T`` (same values and gradients up to rounding); everything else, and
    every other device, is ``nn.Linear``'s."""

    PRODUCT_ROWS, PRODUCT_MIN_OUTPUTS = product_policy_for(cpu_vendor())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        few_rows_on_cpu = (
            x.device.type == "cpu"
            and rows in self.PRODUCT_ROWS
            and self.out_features >= self.PRODUCT_MIN_OUTPUTS
            and x.dtype == self.weight.dtype
        )
        if not few_rows_on_cpu or not plain_weight_on(self, x.device):
            return super().forward(x)
        x_rows = x.reshape(rows, self.in_features)
        if rows == 1:  # a second copy: matrix-matrix instead of the slow matrix-vector kernel
            x_rows = x_rows.expand(2, -1).contiguous()
        out = (self.weight @ x_rows.T)[:, :rows].T  # x_rows.T column-major: a row-major copy was as slow as linear
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().view(*x.shape[:-1], self.out_features)


__all__ = ["DualRouteLinear", "cpu_vendor", "plain_weight_on", "product_policy_for"]
