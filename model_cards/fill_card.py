"""Fill the DualRoute model card template for a checkpoint folder: ``python model_cards/fill_card.py FOLDER``.

Uses `huggingface_hub.ModelCard` / `ModelCardData` (offline); the routing settings come from the checkpoint's
config.json, results from a markdown file or string; by default the project's measured quality results, as rendered
in its README from ``benchmarks/results/*.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


TEMPLATE = Path(__file__).resolve().parent / "template.md"
README = Path(__file__).resolve().parents[1] / "README.md"
# README results blocks that describe model quality, in card order (speed tables depend on the machine, not the model)
CARD_RESULTS = {
    "fidelity_minilm": "Fidelity of converted all-MiniLM-L6-v2 (no training)",
    "finetune": "Fine-tuning the converted MiniLM at a quarter of the keys",
    "retrieval": "Long-range retrieval: routing vs a fixed window",
    "headlines": "Headline generation (BERT2BERT warm start)",
}
TASKS = {
    "DualRouteForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
    "DualRouteForConditionalGeneration": ("text2text-generation", "AutoModelForSeq2SeqLM"),
    "DualRouteModel": ("feature-extraction", "AutoModel"),
}
USAGE = {
    "text-classification": 'classify = pipeline("text-classification", model="{id}", trust_remote_code=True)\nprint(classify("a long document ..."))',
    "text2text-generation": 'inputs = tokenizer("a long document ...", return_tensors="pt")\nprint(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0], skip_special_tokens=True))',
    "feature-extraction": 'hidden = model(**tokenizer("a long document ...", return_tensors="pt")).last_hidden_state',
}


def project_results(readme: Path = README) -> str | None:
    """The measured quality results of this project (README blocks rendered from ``benchmarks/results``)."""
    import re

    if not readme.is_file():
        return None
    text = readme.read_text()
    sections = []
    for name, title in CARD_RESULTS.items():
        match = re.search(rf"<!-- results:{name} -->\n(.*?)<!-- /results:{name} -->", text, re.S)
        if match and match.group(1).strip():
            sections.append(f"### {title}\n\n{match.group(1).strip()}")
    return "\n\n".join(sections) or None


def fill_model_card(
    folder: str | Path,
    *,
    model_id: str | None = None,
    description: str = "",
    results: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    language: str | list[str] | None = "en",
    license: str = "apache-2.0",
) -> ModelCard:
    """Builds the card for the checkpoint in ``folder`` and writes it to ``folder/README.md``. Without ``results`` the
    card carries the project's measured quality results (`project_results`)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} holds no config.json: pass a checkpoint folder (one that `dualroute convert` or "
            "`save_pretrained` wrote)."
        )
    results = project_results() if results is None else results
    config = json.loads((folder / "config.json").read_text())
    architecture = (config.get("architectures") or ["DualRouteModel"])[0]
    pipeline_tag, auto_class = TASKS.get(architecture, TASKS["DualRouteModel"])
    model_id = model_id or folder.name
    layer_types = config.get("route_layer_types") or config.get("layer_types") or []  # the older name too
    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["dualroute", "custom_code", "sparse-attention", "long-context", "routing-attention"],
        datasets=datasets,
        base_model=base_model,
        model_name=model_id,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_id=model_id,
        model_name=model_id,
        model_description=description,
        is_encoder_decoder=config.get("is_encoder_decoder", False),
        route_block_size=config.get("route_block_size", 64),
        route_topk=config.get("route_topk", 8),
        route_global_blocks=config.get("route_global_blocks", 1),
        routed_layers=sum(t == "dualroute_attention" for t in layer_types),
        dense_layers=sum(t == "full_attention" for t in layer_types),
        max_position_embeddings=config.get("max_position_embeddings"),
        position_embedding_type=config.get("position_embedding_type", "absolute"),
        route_before_rope=config.get("route_before_rope", True),
        base_model=base_model,
        auto_class=auto_class,
        pipeline_snippet=pipeline_tag == "text-classification",
        usage_snippet=USAGE[pipeline_tag].format(id=model_id),
        results=results,
    )
    card.save(folder / "README.md")
    return card


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder")
    parser.add_argument("--model-id")
    parser.add_argument("--description", default="")
    parser.add_argument("--results", help="markdown file with the results table (default: the project's results)")
    parser.add_argument("--base-model")
    parser.add_argument("--dataset", action="append")
    args = parser.parse_args(argv)
    try:
        results = Path(args.results).read_text() if args.results else None
        fill_model_card(
            args.folder,
            model_id=args.model_id,
            description=args.description,
            results=results,
            base_model=args.base_model,
            datasets=args.dataset,
        )
    except (OSError, ValueError) as error:
        print(f"fill_card: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.folder) / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
