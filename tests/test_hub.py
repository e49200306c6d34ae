"""Save/load, Auto classes, pipelines and remote code (a checkpoint loaded where the package is not installed)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, pipeline

from modeling_dualroute import DualRouteConfig, DualRouteForSequenceClassification, DualRouteModel

from helpers import make_tokenizer, random_batch, run_python_without_package, tiny_config


@pytest.fixture
def classifier_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = DualRouteForSequenceClassification(tiny_config(num_labels=2, id2label={0: "negative", 1: "positive"}))
    folder = tmp_path / "classifier"
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return model.eval(), folder


def test_auto_classes_resolve_to_dualroute(classifier_checkpoint):
    model, folder = classifier_checkpoint
    assert isinstance(AutoConfig.from_pretrained(folder), DualRouteConfig)
    loaded = AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(loaded) is DualRouteForSequenceClassification
    assert loaded.config._attn_implementation == "dualroute"
    base = AutoModel.from_pretrained(folder)  # the encoder under the head
    assert type(base) is DualRouteModel
    torch.testing.assert_close(base.embeddings.word_embeddings.weight, model.model.embeddings.word_embeddings.weight)
    assert AutoModel.from_config(tiny_config()).__class__ is DualRouteModel


def test_checkpoint_files_and_auto_map(classifier_checkpoint):
    _, folder = classifier_checkpoint
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_dualroute.py", "modeling_dualroute.py"} <= names
    kernels = {"gather_dualroute.py", "token_gather_dualroute.py", "decode_dualroute.py", "flex_dualroute.py"}
    layers = {
        "attention_dualroute.py",
        "routing_dualroute.py",
        "cache_dualroute.py",
        "feed_forward_dualroute.py",
        "linear_dualroute.py",
    }
    assert layers | kernels <= names
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_dualroute.DualRouteModel"
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_dualroute.DualRouteForSequenceClassification"
    assert auto_map["AutoConfig"] == "configuration_dualroute.DualRouteConfig"


def test_safetensors_round_trip_is_bit_identical(classifier_checkpoint):
    model, folder = classifier_checkpoint
    loaded = DualRouteForSequenceClassification.from_pretrained(folder).eval()
    state = load_file(folder / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    input_ids, attention_mask = random_batch(model.config)
    assert torch.equal(
        loaded(input_ids, attention_mask=attention_mask).logits, model(input_ids, attention_mask=attention_mask).logits
    )


def test_sharded_save_loads_identically(classifier_checkpoint, tmp_path):
    model, _ = classifier_checkpoint
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    loaded = DualRouteForSequenceClassification.from_pretrained(tmp_path / "sharded").eval()
    input_ids, attention_mask = random_batch(model.config)
    assert torch.equal(
        loaded(input_ids, attention_mask=attention_mask).logits, model(input_ids, attention_mask=attention_mask).logits
    )


def test_dense_twin_loads_from_the_same_checkpoint(classifier_checkpoint):
    _, folder = classifier_checkpoint
    for implementation in ("eager", "sdpa"):
        dense = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation=implementation)
        assert dense.config._attn_implementation == implementation


def test_text_classification_pipeline(classifier_checkpoint):
    model, folder = classifier_checkpoint
    classify = pipeline("text-classification", model=str(folder))
    results = classify(["good film", "an awful boring plot , long and bad"], top_k=None)
    assert all({r["label"] for r in result} == {"negative", "positive"} for result in results)
    tokenizer = make_tokenizer()
    encoded = tokenizer(["good film"], return_tensors="pt")
    probs = model(**encoded).logits.softmax(-1)[0]
    got = {r["label"]: r["score"] for r in results[0]}
    assert got["positive"] == pytest.approx(probs[1].item(), abs=1e-6)


@pytest.mark.slow
def test_remote_code_without_the_package(classifier_checkpoint, tmp_path):
    """The checkpoint folder is all a user needs: load, classify, pipeline and re-save with trust_remote_code."""
    model, folder = classifier_checkpoint
    input_ids, attention_mask = random_batch(model.config)
    expected = model(input_ids, attention_mask=attention_mask).logits
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask, "expected": expected}, tmp_path / "io.pt")
    out = run_python_without_package(
        f"""
        import importlib, torch
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, pipeline
        try:
            importlib.import_module("modeling_dualroute")
            raise SystemExit("the package should be hidden")
        except ModuleNotFoundError:
            pass
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert model.config._attn_implementation == "dualroute"
        logits = model(io["input_ids"], attention_mask=io["attention_mask"]).logits
        assert torch.equal(logits, io["expected"]), (logits - io["expected"]).abs().max()
        base = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(base).__name__ == "DualRouteModel"
        classify = pipeline("text-classification", model={str(folder)!r}, trust_remote_code=True)
        print("PIPELINE", classify("good film")[0]["label"])
        # a re-save (a Trainer checkpoint, say) stays loadable without the package
        model.save_pretrained({str(tmp_path / "resaved")!r})
        again = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "resaved")!r}, trust_remote_code=True).eval()
        assert torch.equal(again(io["input_ids"], attention_mask=io["attention_mask"]).logits, io["expected"])
        # without trust_remote_code the tokenizer and a plain config still load (a preprocessing script, say):
        # transformers falls back to a PreTrainedConfig, which knows no `dualroute_attention` layer type
        from transformers import AutoTokenizer, PreTrainedConfig
        assert AutoTokenizer.from_pretrained({str(folder)!r})("good film")["input_ids"]
        plain = PreTrainedConfig.from_pretrained({str(tmp_path / "resaved")!r})
        assert plain.route_layer_types == {list(model.config.layer_types)!r}, plain
        print("OK")
        """,
        tmp_path,
    )
    assert "OK" in out and "PIPELINE" in out
