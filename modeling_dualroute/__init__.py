# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""DualRoute: bi-level routing attention for Hugging Face transformers."""

from .attention_dualroute import routed_attention
from .routing_dualroute import route_blocks


__all__ = ["route_blocks", "routed_attention"]
