# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""DualRoute: bi-level routing attention for Hugging Face transformers.

Importing the package registers DualRoute with the Auto classes (installed use). The modeling file marks every class
with ``register_for_auto_class``, so each ``save_pretrained`` also writes the flat code files and an ``auto_map``
(Hub use with ``trust_remote_code=True`` where the package is not installed).
"""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from .attention_dualroute import routed_attention
from .configuration_dualroute import DualRouteConfig
from .modeling_dualroute import (
    DualRouteForConditionalGeneration,
    DualRouteForSequenceClassification,
    DualRouteModel,
    DualRoutePreTrainedModel,
)
from .pipeline_dualroute import DualRouteText2TextPipeline
from .routing_dualroute import route_blocks


AutoConfig.register(DualRouteConfig.model_type, DualRouteConfig, exist_ok=True)
AutoModel.register(DualRouteConfig, DualRouteModel, exist_ok=True)
AutoModelForSequenceClassification.register(DualRouteConfig, DualRouteForSequenceClassification, exist_ok=True)
AutoModelForSeq2SeqLM.register(DualRouteConfig, DualRouteForConditionalGeneration, exist_ok=True)


__all__ = [
    "DualRouteConfig",
    "DualRouteForConditionalGeneration",
    "DualRouteForSequenceClassification",
    "DualRouteModel",
    "DualRoutePreTrainedModel",
    "DualRouteText2TextPipeline",
    "route_blocks",
    "routed_attention",
]
