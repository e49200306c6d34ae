"""Headline generation from a BERT2BERT warm start: DualRoute (routed encoder, decoder and cross-attention) vs dense.

    python benchmarks/bench_headlines.py                 # 1 seed, both variants -> results/headlines.json
    python benchmarks/bench_headlines.py --quick         # a few minutes -> results/headlines_quick.json
    python benchmarks/bench_headlines.py --seeds 0 1 --train-examples 800

The pretrained all-MiniLM-L6-v2 is converted with ``convert(..., task="seq2seq")``: the BERT2BERT recipe (encoder and
decoder copied from MiniLM, cross-attention new, output embeddings tied to the input ones; decoder start = [CLS],
end = [SEP]). With ``--cross-init self`` (the default) each decoder layer's new cross-attention then starts as a copy
of that layer's pretrained self-attention (``--cross-init random`` keeps the converter's random initialisation). Why:
with random cross-attention the decoder ignored the article for the few hundred steps this budget allows — every
title came out the same ("trump trump ' s ...") after 100 steps at learning rates 1e-4 to 1e-3 — while the copy
gives input-dependent titles within 100 steps, because encoder and decoder are copies of one model and the copied
query and key projections match decoder tokens to source tokens from the start. Both variants start from this very
warm start and are fine-tuned the same way with the stock `Seq2SeqTrainer` (``predict_with_generate=True``,
`DataCollatorForSeq2Seq`):

- **dense**: ``attn_implementation="sdpa"``;
- **dualroute**: the default ``attn_implementation="dualroute"``, block 8, top-4, one global block. The encoder's
  query blocks read 4 of the 16 key blocks of a 128-token article (25%); each decoder token's cross-attention reads
  4 of the encoder's 16 blocks (25%; the global block counts, there is no own block); the decoder's causal
  self-attention routes too: a title token past the 32nd reads 4 of its earlier blocks of 8.

128 source tokens, not 512: a BERT2BERT warm start needs many steps before it writes titles, and on 2 CPU cores the
steps are what the budget buys (512 tokens cost ~4x per step).

Data: news articles (``assets.news_articles()``) whose text (without title) fills the 128-token window (so the
encoder budget is exactly 25% and no input is padded), duplicates of a text or title dropped; a fixed eval set is
drawn first with a fixed data seed, then the training subsample, disjoint from it. Source: the article text truncated
to 128 tokens; target: its title (at most 32 tokens + [SEP]).

Measured per variant and seed, each run in a fresh process: ROUGE-1/2/L (F-measure, stemmed) of the generated titles
against the reference titles through the local ``metrics/rouge`` `evaluate` module, in the Trainer's
``compute_metrics``; generation with ``--num-beams`` beams (2), at most ``--max-new-tokens`` (24) new tokens and
``no_repeat_ngram_size`` 3; training time (wall clock of ``trainer.train()``), generation time over the eval set and
the peak resident memory training adds. For scale, a **lead** baseline (the article's first k words, k = the median
title length in words of the training titles) is scored the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_finetune import DATA_SEED, MODEL, REPO, RUN_TIMEOUT_S, WARMUP, WEIGHT_DECAY, key_share  # noqa: E402

from modeling_dualroute import assets  # noqa: E402
from modeling_dualroute.conversion import convert  # noqa: E402

from common import (  # noqa: E402
    add_run_arguments,
    call_with_threads,
    machine,
    markdown_table,
    mean_std,
    run_training,
    train_with_peak_memory,
    training_arguments,
    write_json,
)


CONFIG = dict(
    train_examples=3000,  # 1,000 left both models writing degenerate titles (ROUGE-1 7-8); 3,000 doubled it
    eval_examples=100,
    max_source_length=128,
    min_source_tokens=128,  # only articles that fill the window: no padding, the encoder reads exactly 25%
    max_target_length=32,
    block_size=8,
    top_k=4,
    global_blocks=1,
    epochs=1,
    learning_rate=3e-4,  # 1e-4 learnt too little in the steps the budget allows, 1e-3 stalled
    batch_size=4,  # more, smaller steps for the same compute
    num_beams=2,
    max_new_tokens=24,
    no_repeat_ngram_size=3,
    cross_init="self",  # "self": cross-attention starts as a copy of the self-attention; "random": as converted
)
# --quick: the same pipeline at toy sizes; 128 source tokens keep a 25% budget with block 8
QUICK = dict(train_examples=16, eval_examples=8, max_source_length=128, min_source_tokens=128, block_size=8)
SEEDS = [0]
VARIANTS = {"dense": "sdpa", "dualroute": "dualroute"}
SAMPLES = 8  # generated titles kept in the JSON per run
CROSS_INITS = ("self", "random")


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def headline_rows() -> list[dict]:
    """``{"text", "title"}`` per article, in corpus order, without empty fields and without repeated texts or titles
    (a repeated title in train and eval would let the model copy it)."""
    seen_texts, seen_titles, rows = set(), set(), []
    for article in assets.news_articles():
        text, title = article["text"].strip(), " ".join(article["title"].split())
        if not text or not title or text in seen_texts or title.lower() in seen_titles:
            continue
        seen_texts.add(text)
        seen_titles.add(title.lower())
        rows.append({"text": text, "title": title})
    return rows


def split(rows: list[dict], train_examples: int, eval_examples: int, seed: int = DATA_SEED):
    """Shuffled with ``seed``: the first ``eval_examples`` are the eval set (independent of ``train_examples``), the
    next ``train_examples`` the training set."""
    if len(rows) < eval_examples + train_examples:
        raise ValueError(
            f"{len(rows)} articles qualify, fewer than eval + train = {eval_examples} + {train_examples}; lower them."
        )
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[eval_examples : eval_examples + train_examples], rows[:eval_examples]


def encode(tokenizer, rows: list[dict], options: dict) -> list[dict]:
    """Source ids (with [CLS] ... [SEP]) and labels = title ids without the leading [CLS] (the decoder starts from it)
    and with the closing [SEP] (the end of generation)."""
    sources = tokenizer([r["text"] for r in rows], truncation=True, max_length=options["max_source_length"])
    targets = tokenizer([r["title"] for r in rows], truncation=True, max_length=options["max_target_length"] + 1)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": target[1:]}
        for ids, mask, target in zip(sources["input_ids"], sources["attention_mask"], targets["input_ids"])
    ]


def prepare(options: dict, tokenizer) -> dict:
    rows = headline_rows()
    if options["min_source_tokens"]:
        need = min(options["min_source_tokens"], options["max_source_length"])
        ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=options["max_source_length"])
        rows = [row for row, source in zip(rows, ids["input_ids"]) if len(source) >= need]
    train, evaluation = split(rows, options["train_examples"], options["eval_examples"])
    return {
        "train": encode(tokenizer, train, options),
        "eval": encode(tokenizer, evaluation, options),
        "train_rows": train,
        "eval_rows": evaluation,
    }


def lead(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


# ---------------------------------------------------------------------------------------------------------------------
# One training run (in a fresh process by default)
# ---------------------------------------------------------------------------------------------------------------------


def load_rouge():
    import evaluate

    return evaluate.load(str(REPO / "metrics" / "rouge"), keep_in_memory=True)


def score(rouge, predictions: list[str], references: list[str]) -> dict:
    scores = rouge.compute(predictions=predictions, references=references, use_stemmer=True)
    return {name: scores[name] for name in ("rouge1", "rouge2", "rougeL")}


def train_headlines(spec: dict) -> dict:
    """Fine-tunes the warm start in ``spec["model_dir"]`` with the stock Seq2SeqTrainer; generates the eval titles."""
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        set_seed,
    )

    data = json.loads(Path(spec["data_file"]).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    set_seed(spec["seed"])
    model = AutoModelForSeq2SeqLM.from_pretrained(spec["model_dir"], attn_implementation=spec["attn_implementation"])
    rouge = load_rouge()

    def decode(ids: np.ndarray) -> list[str]:
        # the Trainer pads predictions and labels of different batches with -100
        return tokenizer.batch_decode(np.where(ids < 0, tokenizer.pad_token_id, ids), skip_special_tokens=True)

    def compute_metrics(prediction):
        generated = decode(prediction.predictions)
        metrics = score(rouge, generated, decode(prediction.label_ids))
        metrics["generated_words"] = statistics.fmean(len(text.split()) for text in generated)
        return metrics

    args = Seq2SeqTrainingArguments(
        **training_arguments(spec, weight_decay=WEIGHT_DECAY, warmup_steps=WARMUP),
        predict_with_generate=True,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        compute_metrics=compute_metrics,
    )
    train_output, train_s, peak_mb = train_with_peak_memory(trainer)
    start = time.perf_counter()
    output = trainer.predict(
        data["eval"],
        max_new_tokens=spec["max_new_tokens"],
        num_beams=spec["num_beams"],
        no_repeat_ngram_size=spec["no_repeat_ngram_size"],
    )
    predict_s = time.perf_counter() - start
    metrics = output.metrics
    return {
        "rouge1": metrics["test_rouge1"],
        "rouge2": metrics["test_rouge2"],
        "rougeL": metrics["test_rougeL"],
        "generated_words": metrics["test_generated_words"],
        "eval_loss": metrics.get("test_loss"),
        "train_s": train_s,
        "predict_s": predict_s,
        "peak_train_memory_mb": peak_mb,
        "steps": train_output.global_step,
        "train_loss": train_output.training_loss,
        "logged_losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "samples": decode(output.predictions[:SAMPLES]),
        "device": str(trainer.args.device),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------------


def warm_start(options: dict, seed: int, folder: Path):
    """BERT2BERT from MiniLM with the benchmark's routing; a random cross-attention is drawn from ``seed``."""
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    model, report = convert(
        str(assets.minilm_dir()),
        None,
        task="seq2seq",
        block_size=options["block_size"],
        topk=options["top_k"],
        global_blocks=options["global_blocks"],
        max_position_embeddings=max(512, options["max_source_length"]),
    )
    if options["cross_init"] not in CROSS_INITS:
        raise ValueError(f"`cross_init` must be one of {CROSS_INITS}, got {options['cross_init']!r}.")
    if options["cross_init"] == "self":
        init_cross_attention_from_self_attention(model)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(assets.minilm_dir())).save_pretrained(folder)
    return report


def init_cross_attention_from_self_attention(model) -> None:
    """Each decoder layer's new cross-attention (and its LayerNorm) starts as a copy of the layer's pretrained
    self-attention: encoder and decoder are copies of one model, so the copied query and key projections score
    decoder tokens against source tokens meaningfully from the first step."""
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.encoder_attn.load_state_dict(layer.self_attn.state_dict())
            layer.encoder_attn_layer_norm.load_state_dict(layer.self_attn_layer_norm.state_dict())


def attention_shares(options: dict, source_lengths: list[int], target_lengths: list[int]) -> dict:
    """Mean share of the keys each kind of attention reads under routing (upper bounds, see `key_share`)."""
    block, k = options["block_size"], options["top_k"]
    # decoder self-attention: token t (1-based) of a causal sequence sees t keys; the decoder input is the start token
    # plus the label tokens but the last
    decoder = [key_share(block, k, t) for n in target_lengths for t in range(1, n + 1)]
    return {
        "encoder": statistics.fmean(key_share(block, k, n) for n in source_lengths),
        "cross": statistics.fmean(key_share(block, k, n) for n in source_lengths),
        "decoder_self": statistics.fmean(decoder),
    }


def summarise(runs: list[dict], variants: list[str]) -> list[dict]:
    rows = []
    by_variant = defaultdict(dict)
    for entry in runs:
        by_variant[entry["variant"]][entry["seed"]] = entry
    dense = by_variant.get("dense", {})
    for variant in variants:
        seeds = by_variant.get(variant)
        if not seeds:
            continue
        row = {"variant": variant, "seeds": sorted(seeds)}
        for name in ("rouge1", "rouge2", "rougeL", "generated_words", "train_s", "predict_s", "peak_train_memory_mb"):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(seeds[s][name] for s in sorted(seeds))
        paired = [s for s in sorted(seeds) if s in dense]
        if variant != "dense" and paired:
            for name in ("rouge1", "rouge2", "rougeL"):
                row[f"{name}_diff_points_mean"] = statistics.fmean(
                    100 * (seeds[s][name] - dense[s][name]) for s in paired
                )
            row["train_time_ratio"] = row["train_s_mean"] / statistics.fmean(dense[s]["train_s"] for s in paired)
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    add_run_arguments(parser)
    for field, value in CONFIG.items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=None)
    args = parser.parse_args(argv)

    if args.worker:  # one run in a fresh process: its result is the last line of stdout
        print(json.dumps(call_with_threads(train_headlines, json.loads(args.worker))))
        return 0

    options = dict(CONFIG, **(QUICK if args.quick else {}))
    for field in CONFIG:
        if getattr(args, field) is not None:
            options[field] = getattr(args, field)
    if options["cross_init"] not in CROSS_INITS:
        parser.error(f"--cross-init must be one of {CROSS_INITS}")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(assets.minilm_dir()))
    started = time.perf_counter()
    data = prepare(options, tokenizer)
    source_lengths = [len(row["input_ids"]) for row in data["eval"]]
    target_lengths = [len(row["labels"]) for row in data["eval"]]
    print(f"{len(data['train'])} train / {len(data['eval'])} eval articles", flush=True)

    # lead baseline, scored against the same references the runs are scored against (decoded label ids)
    references = tokenizer.batch_decode([row["labels"] for row in data["eval"]], skip_special_tokens=True)
    lead_words = int(statistics.median(len(row["title"].split()) for row in data["train_rows"]))
    lead_scores = score(load_rouge(), [lead(row["text"], lead_words) for row in data["eval_rows"]], references)

    out = args.out or ("headlines_quick.json" if args.quick else "headlines.json")
    conversion = {}

    def save(complete: bool):
        """Writes what has been measured so far (after every run, so that an interrupted run keeps its results)."""
        payload = {
            "benchmark": "headlines",
            "complete": complete,
            "machine": machine(),
            "config": {
                "model": MODEL,
                **options,
                "quick": args.quick,
                "variants": args.variants,
                "seeds": args.seeds,
                "data_seed": DATA_SEED,
                "weight_decay": WEIGHT_DECAY,
                "warmup": WARMUP,
                "max_steps": args.max_steps,
                "threads": args.threads,
                "in_process": args.in_process,
            },
            "conversion": conversion,
            "data": {
                "train_examples": len(data["train"]),
                "eval_examples": len(data["eval"]),
                "eval_source_tokens_median": statistics.median(source_lengths),
                "eval_target_tokens_median": statistics.median(target_lengths),
            },
            "key_share": attention_shares(options, source_lengths, target_lengths),
            "lead_baseline": {"words": lead_words, **lead_scores},
            "references": references[:SAMPLES],
            "runtime_s": time.perf_counter() - started,
            "runs": runs,
            "rows": summarise(runs, args.variants),
        }
        return write_json(out, payload), payload

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_headlines_") as workdir:
        workdir = Path(workdir)
        data_file = workdir / "data.json"
        data_file.write_text(json.dumps({"train": data["train"], "eval": data["eval"]}))
        for seed in args.seeds:
            folder = workdir / f"warm-start-{seed}"
            report = warm_start(options, seed, folder)
            conversion.update(copied=len(report.copied), new=len(report.new))
            for variant in args.variants:
                spec = {
                    "model_dir": str(folder),
                    "data_file": str(data_file),
                    "attn_implementation": VARIANTS[variant],
                    "seed": seed,
                    "max_steps": args.max_steps,
                    "threads": args.threads,
                    "output_dir": str(workdir / f"run-{variant}-{seed}"),
                    **{name: options[name] for name in ("epochs", "learning_rate", "batch_size")},
                    **{name: options[name] for name in ("num_beams", "max_new_tokens", "no_repeat_ngram_size")},
                }
                result = run_training(
                    __file__, train_headlines, spec, in_process=args.in_process, timeout=RUN_TIMEOUT_S
                )
                runs.append({"variant": variant, "seed": seed, **result})
                print(
                    f"  {variant:>9} seed {seed}: ROUGE-1/2/L {100 * result['rouge1']:.1f} / "
                    f"{100 * result['rouge2']:.1f} / {100 * result['rougeL']:.1f}, train {result['train_s']:.0f} s, "
                    f"peak {result['peak_train_memory_mb']:.0f} MB",
                    flush=True,
                )
                save(complete=False)

    path, payload = save(complete=True)
    print(render(payload))
    print(f"wrote {path} in {payload['runtime_s']:.0f} s")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------


def render(payload: dict) -> str:
    """The README table: ROUGE-1/2/L (mean ± std over seeds, in points) per variant, the lead baseline, times."""
    config, shares = payload["config"], payload["key_share"]

    def cell(row, name):
        text = f"{100 * row[f'{name}_mean']:.1f}"
        if len(row["seeds"]) > 1:
            text += f" ± {100 * row[f'{name}_std']:.1f}"
        if f"{name}_diff_points_mean" in row:
            text += f" ({row[f'{name}_diff_points_mean']:+.1f})"
        return text

    table = []
    for row in payload["rows"]:
        if row["variant"] == "dense":
            attention = "all keys"
        else:
            attention = (
                f"B={config['block_size']}, top-{config['top_k']}: encoder {shares['encoder']:.0%}, cross "
                f"{shares['cross']:.0%}, decoder {shares['decoder_self']:.0%}"
            )
        ratio = f" ({row['train_time_ratio']:.2f}×)" if "train_time_ratio" in row else ""
        table.append(
            [
                row["variant"],
                attention,
                cell(row, "rouge1"),
                cell(row, "rouge2"),
                cell(row, "rougeL"),
                f"{row['train_s_mean']:.0f} s{ratio}",
                f"{row['predict_s_mean']:.0f} s",
                f"{row['peak_train_memory_mb_mean']:.0f} MB",
            ]
        )
    lead_row = payload["lead_baseline"]
    table.append(
        [
            f"lead-{lead_row['words']} words",
            "(no model)",
            f"{100 * lead_row['rouge1']:.1f}",
            f"{100 * lead_row['rouge2']:.1f}",
            f"{100 * lead_row['rougeL']:.1f}",
            "—",
            "—",
            "—",
        ]
    )
    data = payload["data"]
    cross = " (cross-attention copied from self-attention)" if config.get("cross_init") == "self" else ""
    intro = (
        f"{config['model']} warm-started as BERT2BERT{cross} and fine-tuned with the stock `Seq2SeqTrainer` to write a news "
        f"article's title from its text ({config['max_source_length']} tokens): {data['train_examples']} training "
        f"articles, {config['epochs']} epoch(s), lr {config['learning_rate']:g}, batch {config['batch_size']}; seeds "
        f"{config['seeds']}. ROUGE F-measure (stemmed, local `evaluate` module, in points) on {data['eval_examples']} "
        f"fixed eval articles; generation with {config['num_beams']} beam(s), at most {config['max_new_tokens']} new "
        "tokens; in brackets DualRoute − dense. Keys read: share of the keys each attention reads. Train time: wall "
        "clock of `trainer.train()`; generate: `trainer.predict` over the eval set; memory: peak resident memory "
        "added by training."
    )
    if config.get("quick"):
        intro = "**Quick run (toy sizes): checks the pipeline, not the scores.** " + intro
    if payload.get("complete") is False:
        intro = "**Partial results (the run was interrupted or is still going).** " + intro
    header = ["variant", "attention", "ROUGE-1", "ROUGE-2", "ROUGE-L", "train time", "generate", "memory"]
    return intro + "\n\n" + markdown_table(header, table)


if __name__ == "__main__":
    sys.exit(main())
