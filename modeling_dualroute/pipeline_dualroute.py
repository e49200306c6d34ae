# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""``dualroute-text2text``: text in, generated text out (transformers 5 removed the summarization and
text2text-generation pipelines).

Registered with `PIPELINE_REGISTRY` at import. `DualRouteForConditionalGeneration.save_pretrained` writes it into
the checkpoint (``custom_pipelines`` in config.json plus this file), so

    pipeline("dualroute-text2text", model=folder, trust_remote_code=True)

works where the package is not installed, and with it installed too.
"""

from __future__ import annotations

from transformers import AutoModelForSeq2SeqLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY


TASK = "dualroute-text2text"


class DualRouteText2TextPipeline(Pipeline):
    """Tokenise (truncating to the tokenizer's maximum, or to ``max_input_length`` tokens), ``generate``, decode.
    Generation options (``max_new_tokens``, ``max_length``, ``num_beams``, ``do_sample``, ...) pass through to
    ``generate``, as in transformers 4's text2text pipeline."""

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __call__(self, inputs, **kwargs):
        """One text: a list of ``{"generated_text": ...}``, one per returned sequence. A list of texts: one dict per
        text when each has one sequence (as in transformers 4's text2text pipeline), otherwise a list per text."""
        result = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list) and all(isinstance(text, str) for text in inputs):
            if all(len(sequences) == 1 for sequences in result):
                return [sequences[0] for sequences in result]
        return result

    def _sanitize_parameters(self, truncation=None, max_input_length=None, **generate_kwargs):
        preprocess = {}
        if truncation is not None:
            preprocess["truncation"] = truncation
        if max_input_length is not None:
            preprocess["max_input_length"] = max_input_length
        return preprocess, generate_kwargs, {}

    def preprocess(self, text: str, truncation: bool = True, max_input_length: int | None = None):
        if not isinstance(text, str):
            raise TypeError(f"{TASK} takes a string (or a list of strings), got {type(text).__name__}.")
        return self.tokenizer(text, return_tensors="pt", truncation=truncation, max_length=max_input_length)

    def _forward(self, inputs, **generate_kwargs):
        inputs.pop("token_type_ids", None)
        return {"output_ids": self.model.generate(**inputs, **generate_kwargs)}

    def postprocess(self, outputs):
        return [
            {"generated_text": self.tokenizer.decode(ids, skip_special_tokens=True)} for ids in outputs["output_ids"]
        ]


def custom_pipeline_entry() -> dict:
    """The ``config.custom_pipelines`` entry that makes a saved checkpoint serve this pipeline."""
    return {
        TASK: {
            "impl": f"{__name__.split('.')[-1]}.{DualRouteText2TextPipeline.__name__}",
            "pt": ["AutoModelForSeq2SeqLM"],
            "type": "text",
        }
    }


if TASK not in PIPELINE_REGISTRY.get_supported_tasks():  # a remote-code copy of this file imports it again
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=DualRouteText2TextPipeline, pt_model=AutoModelForSeq2SeqLM, type="text"
    )
