# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""`DualRouteLinear`: an ``nn.Linear`` that multiplies a decoding step's few rows faster on AMD CPUs.

A decoding step feeds every linear layer one row per sequence and beam. How fast torch's CPU ``linear`` is for 1 to
16 rows depends on the CPU's vendor, because MKL (torch's CPU BLAS) picks its kernels by vendor:

- 2-core AMD EPYC: ``linear`` is slow. The 48 projections of a 6-layer decoder (84 MB of weights) took 9 ms for one
  row and 13 ms for 2 to 4 rows, against 4.3 ms and 5-6 ms for the same products taken as ``weight @ x^T``; a 30k-word
  LM head took 5.7 ms for one row against 1.7 ms.
- 2-core Intel Xeon (AVX-512): the other way round. The same 48 projections took 4.8 ms for one row, 6.7 ms for 4 and
  8.5 ms for 8 with ``linear``, against 13.2-14.2 ms as ``weight @ x^T``; the LM head 1.5 / 2.8 / 4.3 ms against
  3.6-3.8 ms. A greedy step at 16k encoder tokens took 22.6 ms with ``linear``, 35.7 ms with the product.

So the product is taken on AMD CPUs only (`FEW_ROWS`: 16 there, 0 elsewhere; set the class attribute to change it).
One row is taken as two copies of itself, since ``weight @ x^T`` with a single column runs torch's matrix-vector
kernel, as slow there as ``linear``. Beyond 16 rows ``linear`` is as fast or faster on both. Being the module's own
``forward``, the product is seen by hooks, adapters (LoRA wraps the module and calls it) and offloading wrappers like
any ``nn.Linear``; state dict keys are ``nn.Linear``'s.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch import nn


def cpu_vendor() -> str:
    """The CPU's vendor string (``"AuthenticAMD"``, ``"GenuineIntel"``, ...) or ``""`` where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def few_rows_for(vendor: str) -> int:
    """`DualRouteLinear.FEW_ROWS` on a CPU of ``vendor``: the most rows taken as ``weight @ x^T`` (0: never)."""
    return 16 if vendor == "AuthenticAMD" else 0


def plain_weight_on(layer: nn.Linear, device: torch.device) -> bool:
    """Whether ``layer``'s weight is a plain tensor (not quantized or wrapped) on ``device`` (not offloaded)."""
    return type(layer.weight.data) is torch.Tensor and layer.weight.device == device


class DualRouteLinear(nn.Linear):
    """``nn.Linear`` whose CPU forward takes up to `FEW_ROWS` rows of a plain float weight as ``weight @ x^T``
    (same values and gradients up to rounding); everything else, and every other device, is ``nn.Linear``'s."""

    FEW_ROWS = few_rows_for(cpu_vendor())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        few_rows_on_cpu = x.device.type == "cpu" and 0 < rows <= self.FEW_ROWS and x.dtype == self.weight.dtype
        if not few_rows_on_cpu or not plain_weight_on(self, x.device):
            return super().forward(x)
        x_rows = x.reshape(rows, self.in_features)
        if rows == 1:  # a second copy: matrix-matrix instead of the slow matrix-vector kernel
            x_rows = x_rows.expand(2, -1).contiguous()
        out = (self.weight @ x_rows.T)[:, :rows].T  # x_rows.T column-major: a row-major copy was as slow as linear
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().view(*x.shape[:-1], self.out_features)


__all__ = ["DualRouteLinear", "cpu_vendor", "few_rows_for", "plain_weight_on"]
