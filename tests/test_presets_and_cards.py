"""Preset configs, recipes and the model card template."""

import importlib.util
import json

import pytest
import torch
from huggingface_hub import ModelCard

from modeling_dualroute import DualRouteConfig, DualRouteForSequenceClassification, DualRouteModel

from helpers import REPO, tiny_config


@pytest.mark.parametrize("name", ["tiny", "small", "base", "small-seq2seq"])
def test_presets_load_and_build(name):
    config = DualRouteConfig.from_json_file(REPO / "configuration" / f"{name}.json")
    assert config.model_type == "dualroute"
    if name == "tiny":
        model = DualRouteModel(config).eval()
        assert model(torch.randint(4, 99, (1, 13))).last_hidden_state.shape == (1, 13, 32)
    if name == "base":
        assert config.routed_layers == [True] * 10 + [False] * 2


def test_recipes_are_valid_convert_commands():
    from modeling_dualroute.cli import build_parser

    recipes = list((REPO / "configuration" / "recipes").glob("*.json"))
    assert recipes
    for path in recipes:
        recipe = json.loads(path.read_text())
        assert recipe["command"].startswith("dualroute convert ")
        args = vars(build_parser().parse_args(recipe["command"].split()[1:]))
        for field, value in recipe.items():
            if field not in ("description", "command"):
                assert args[field] == value, (path.name, field)


def load_fill_card():
    spec = importlib.util.spec_from_file_location("fill_card", REPO / "model_cards" / "fill_card.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_card_is_filled_from_the_checkpoint(tmp_path):
    model = DualRouteForSequenceClassification(
        tiny_config(num_labels=2, layer_types=["dualroute_attention", "full_attention"])
    )
    model.save_pretrained(tmp_path)
    card = load_fill_card().fill_model_card(
        tmp_path,
        model_id="you/tiny-dualroute",
        results="| task | acc |\n|---|---|\n| toy | 1.0 |",
        base_model="bert-base-uncased",
    )
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "transformers"
    assert loaded.data.pipeline_tag == "text-classification"
    assert "custom_code" in loaded.data.tags and "dualroute" in loaded.data.tags
    assert loaded.data.base_model == "bert-base-uncased"
    text = str(card)
    assert "| `route_block_size` | 4 |" in text and "| `route_topk` | 2 |" in text
    assert "routed / dense layers | 1 / 1" in text
    assert 'AutoModelForSequenceClassification.from_pretrained("you/tiny-dualroute", trust_remote_code=True)' in text
    assert "| toy | 1.0 |" in text
    assert "route_before_rope" not in text  # absolute positions: the setting does nothing


def test_model_card_names_the_vectors_a_rope_model_routes_on(tmp_path):
    DualRouteForSequenceClassification(tiny_config(position_embedding_type="rope")).save_pretrained(tmp_path)
    text = str(load_fill_card().fill_model_card(tmp_path, results=""))
    assert "| `route_before_rope` | True (level 1 scores unrotated queries and keys) |" in text


def test_model_card_carries_the_project_results_by_default(tmp_path):
    model = DualRouteForSequenceClassification(tiny_config(num_labels=2))
    model.save_pretrained(tmp_path)
    text = str(load_fill_card().fill_model_card(tmp_path))
    readme = (REPO / "README.md").read_text()
    # the quality tables are committed: the card repeats each of the README's rendered blocks verbatim, in order
    fill_card = load_fill_card()
    positions = []
    for name, title in fill_card.CARD_RESULTS.items():
        block = readme.split(f"<!-- results:{name} -->\n")[1].split(f"<!-- /results:{name} -->")[0].strip()
        assert f"### {title}\n\n{block}" in text, name
        positions.append(text.index(f"### {title}"))
    assert positions == sorted(positions) and list(fill_card.CARD_RESULTS) == [
        "fidelity_minilm", "finetune", "retrieval", "headlines"
    ]  # fmt: skip
    assert "No results recorded yet." not in text


def test_fill_card_command_names_a_folder_without_a_checkpoint(tmp_path, capsys):
    assert load_fill_card().main([str(tmp_path / "missing")]) == 2
    assert "holds no config.json: pass a checkpoint folder" in capsys.readouterr().err
