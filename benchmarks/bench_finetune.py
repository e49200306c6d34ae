"""Fine-tuning a real pretrained encoder with routing: does DualRoute at a 25% key budget train as well as dense?

    python benchmarks/bench_finetune.py                        # both tasks, 3 seeds -> results/finetune.json
    python benchmarks/bench_finetune.py --quick                # a few minutes -> results/finetune_quick.json
    python benchmarks/bench_finetune.py --tasks news --seeds 0 --variants dense dualroute dualroute-dl1
    python benchmarks/bench_finetune.py --tasks rotten_tomatoes --keep-other-tasks   # rerun one task, keep the other

The pretrained all-MiniLM-L6-v2 (6 layers, 384 wide) is converted to `DualRouteForSequenceClassification` with
`conversion.convert` (weights unchanged; BERT's pooler becomes the classifier's dense layer, its ``out_proj`` is new)
and fine-tuned with the stock `Trainer`, once per variant and seed:

- **dense**: the converted checkpoint loaded with ``attn_implementation="sdpa"`` (every query reads every key);
- **dualroute**: the same checkpoint with its default ``attn_implementation="dualroute"``: each query block reads
  its top-k key blocks (its own block and the global CLS block included);
- **dualroute-dlN**: as dualroute, with the last N encoder layers dense (``convert(..., dense_last_layers=N)``).

Within a seed the variants are paired: the same classifier initialisation (drawn from the seed), the same data order
and the same hyper-parameters, so the seed-wise difference to dense measures what routing costs.

Tasks (data from `modeling_dualroute.assets`, nothing from the Hub):

- **news**: which of 9 outlets published an article, from its text (no title), truncated to 256 tokens. Only
  articles that fill the 256-token window are used (``--news-min-tokens``), so no input is padded and the budget is
  exactly top-4 of 16 blocks of 16 tokens = 25% of the keys for every query block.
- **rotten_tomatoes**: fresh vs rotten review snippets (the ``plot`` synopses are left out), up to 64 tokens.
  Snippets are short (median 26 tokens, 99% <= 55), so a ~25% budget is ~6 keys per query, and it only routes if
  blocks are tiny: at block 8, top-4 reads 94% of an average snippet and routes nothing in 70% of them. We neither
  concatenate snippets (that changes the task) nor pad them to an artificial length (padding blocks are never
  candidates, so that would not change what a query reads). The 6 keys are spent as 6 blocks of 1 token (block 1,
  top-6: the token itself, the CLS block and 4 routed tokens) rather than 3 blocks of 2 (block 2, top-3: one routed
  block): both read ``min(1, 6 / length)`` of a snippet, on average 29% (median 23%), and route in 99% of the
  snippets, but block 2 leaves the router a single choice. (Seed-0 check, 1,000 train / 500 eval: dense 74.8%,
  block 1 / top-6 75.6%, block 2 / top-3 72.0%.) The JSON records the mean share on the eval set.

Both tasks classify from the mean of the last hidden states (``classifier_pooling="mean"``, the pooling
all-MiniLM-L6-v2 was trained with as a sentence embedder; its CLS token was not trained to summarise the input),
through BERT's pooler layer (dense + tanh) and the new output layer. The pooled vector draws on every position, not
on the CLS token alone, so every layer routes by default; ``--{task}-dense-last-layers N`` (or the variant
``dualroute-dlN``) keeps the last N layers dense, the usual remedy when a loss on few positions trains poorly. The
learning rate (3e-4) is high for BERT fine-tuning because the budget allows few steps: at 1e-4 the news loss was
still near ln 9 after 64 steps.

Splits are drawn once (fixed data seed, independent of the training seed) after dropping duplicate texts: per class,
a fixed eval set first, then the training subsample, disjoint from it. Accuracy and macro-F1 come from the local
`evaluate` modules in ``metrics/`` through the Trainer's ``compute_metrics``; both are reported as mean and sample
standard deviation over seeds, with the paired difference to dense. Each run trains in a fresh process; its training
time (wall clock of ``trainer.train()``) and peak extra resident memory during training (VmHWM above the resident
memory after loading model and data, `common.peak_extra_memory_mb`) are recorded.
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

from modeling_dualroute import assets  # noqa: E402
from modeling_dualroute.conversion import convert  # noqa: E402

from common import (  # noqa: E402
    RESULTS,
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


REPO = Path(__file__).resolve().parents[1]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DATA_SEED = 1234  # splits are drawn with this seed alone: every training seed and variant sees the same data
TARGET_POINTS = 1.0  # the target: DualRoute within 1 accuracy point of dense

# Per task: data sizes, input length, routing and optimisation. Every field is a CLI option --{task}-{field}.
TASKS = {
    "news": dict(
        train_per_class=28,
        eval_per_class=20,
        max_length=256,  # 512 costs 2.5x the CPU time per run; 3 seeds x 2 variants must fit the budget
        min_tokens=256,  # only articles with at least this many tokens (= max_length: no padding, exact 25%)
        block_size=16,
        top_k=4,
        global_blocks=1,
        dense_last_layers=0,  # the plain `dualroute` variant: every layer routed at 25%
        pooling="mean",  # how all-MiniLM-L6-v2 was trained to embed text (its CLS token was not)
        epochs=2,
        learning_rate=3e-4,  # few steps (see the docstring)
        batch_size=8,
    ),
    "rotten_tomatoes": dict(
        train_per_class=1000,  # 2,000 train / 1,000 eval (the usual test split has 1,066 snippets); with 500 eval
        eval_per_class=500,  # snippets one model's accuracy had a +-2-point sampling error, twice the 1-point target
        max_length=64,
        min_tokens=0,
        block_size=1,  # ~26-token snippets: see the module docstring
        top_k=6,
        global_blocks=1,
        dense_last_layers=0,
        pooling="mean",
        epochs=2,
        learning_rate=3e-4,
        batch_size=16,
    ),
}
# --quick: the same pipeline at toy sizes (minutes on a busy 2-core machine); news at 128 tokens keeps 25% with block 8
QUICK = {
    "news": dict(train_per_class=2, eval_per_class=2, max_length=128, min_tokens=128, block_size=8, epochs=1),
    "rotten_tomatoes": dict(train_per_class=16, eval_per_class=16, epochs=1),
}
QUICK_SEEDS = [0]
SEEDS = [0, 1, 2]
VARIANTS = ["dense", "dualroute"]
WEIGHT_DECAY = 0.01
WARMUP = 0.1  # share of the training steps
RUN_TIMEOUT_S = 4 * 3600  # one training run in its fresh process (a loaded machine can be many times slower)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def dedupe(rows: list[dict], key: str = "text") -> list[dict]:
    """Drops rows whose (whitespace-stripped) text was seen before, so that no text lands in train and eval both."""
    seen, kept = set(), []
    for row in rows:
        text = row[key].strip()
        if text and text not in seen:
            seen.add(text)
            kept.append(row)
    return kept


def task_rows(task: str) -> list[dict]:
    """``{"text", "label"}`` rows of a task, deduplicated, in corpus order; labels are strings."""
    if task == "news":
        rows = [{"text": a["text"], "label": a["outlet"]} for a in assets.news_articles()]
    elif task == "rotten_tomatoes":
        rows = [{"text": r["text"], "label": r["label"]} for r in assets.rotten_tomatoes() if r["label"] != "plot"]
    else:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    return dedupe(rows)


def label_names(rows: list[dict]) -> list[str]:
    """The class names, sorted: class id ``i`` is ``label_names[i]``."""
    return sorted({row["label"] for row in rows})


def split_per_class(
    rows: list[dict], train_per_class: int, eval_per_class: int, seed: int = DATA_SEED
) -> tuple[list[dict], list[dict]]:
    """Per class (sorted), the rows shuffled with ``seed``: the first ``eval_per_class`` go to eval, the next
    ``train_per_class`` to train. The eval set does not depend on ``train_per_class``; train is shuffled once more so
    classes interleave (the Trainer shuffles too, with the training seed)."""
    by_label = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    train, evaluation = [], []
    for label in sorted(by_label):
        items = list(by_label[label])
        if len(items) < eval_per_class + train_per_class:
            raise ValueError(
                f"class {label!r} has {len(items)} rows, fewer than eval_per_class + train_per_class = "
                f"{eval_per_class} + {train_per_class}; lower them."
            )
        random.Random(f"{seed}:{label}").shuffle(items)
        evaluation += items[:eval_per_class]
        train += items[eval_per_class : eval_per_class + train_per_class]
    random.Random(seed).shuffle(train)
    return train, evaluation


def encode(tokenizer, rows: list[dict], names: list[str], max_length: int) -> list[dict]:
    ids = {name: index for index, name in enumerate(names)}
    enc = tokenizer([row["text"] for row in rows], truncation=True, max_length=max_length)
    return [
        {"input_ids": input_ids, "attention_mask": mask, "labels": ids[row["label"]]}
        for row, input_ids, mask in zip(rows, enc["input_ids"], enc["attention_mask"])
    ]


def prepare_task(task: str, options: dict, tokenizer) -> dict:
    """Deduplicated rows -> length filter -> fixed per-class splits -> token ids. Deterministic."""
    rows = task_rows(task)
    names = label_names(rows)
    if options["min_tokens"]:
        lengths = [len(ids) for ids in tokenizer([r["text"] for r in rows], truncation=True, max_length=options["max_length"])["input_ids"]]  # fmt: skip
        rows = [
            row for row, length in zip(rows, lengths) if length >= min(options["min_tokens"], options["max_length"])
        ]
    train, evaluation = split_per_class(rows, options["train_per_class"], options["eval_per_class"])
    return {
        "label_names": names,
        "train": encode(tokenizer, train, names, options["max_length"]),
        "eval": encode(tokenizer, evaluation, names, options["max_length"]),
        "train_texts": [row["text"] for row in train],
        "eval_texts": [row["text"] for row in evaluation],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Key budget
# ---------------------------------------------------------------------------------------------------------------------


def key_share(block_size: int, top_k: int, length: int) -> float:
    """Share of a ``length``-token input's keys that a query block reads: ``top_k`` blocks of ``block_size`` (an upper
    bound when the ragged last block is among them), all of them when there are no more blocks than ``top_k``."""
    return min(1.0, top_k * block_size / length)


def mean_key_share(lengths: list[int], block_size: int, top_k: int, routed_layers: int, layers: int) -> float:
    """Mean over inputs and layers of the share of keys read; dense layers read everything."""
    per_input = [
        (routed_layers * key_share(block_size, top_k, n) + (layers - routed_layers)) / layers for n in lengths
    ]
    return statistics.fmean(per_input)


def parse_variant(name: str, default_dense_last_layers: int) -> tuple[str, int]:
    """``dense`` -> ("sdpa", 0); ``dualroute`` -> ("dualroute", the task's dense_last_layers);
    ``dualroute-dlN`` -> ("dualroute", N)."""
    if name == "dense":
        return "sdpa", 0
    if name == "dualroute":
        return "dualroute", default_dense_last_layers
    if name.startswith("dualroute-dl") and name[len("dualroute-dl") :].isdigit():
        return "dualroute", int(name[len("dualroute-dl") :])
    raise ValueError(f"unknown variant {name!r}: use dense, dualroute or dualroute-dlN (last N layers dense).")


# ---------------------------------------------------------------------------------------------------------------------
# One training run (in a fresh process by default)
# ---------------------------------------------------------------------------------------------------------------------


def load_metrics():
    """The local accuracy and F1 modules, loaded as users load any `evaluate` metric (by path: works offline)."""
    import evaluate

    return (
        evaluate.load(str(REPO / "metrics" / "accuracy"), keep_in_memory=True),
        evaluate.load(str(REPO / "metrics" / "f1"), keep_in_memory=True),
    )


def reinit_head(model, seed: int) -> None:
    """Draws the new classifier layer from ``seed`` (normal(0, initializer_range), zero bias, as post_init does), so
    that the seeds differ in it while dense and DualRoute of one seed start from the very same weights."""
    generator = torch.Generator().manual_seed(seed)
    out_proj = model.classifier.out_proj
    with torch.no_grad():
        out_proj.weight.copy_(torch.randn(out_proj.weight.shape, generator=generator) * model.config.initializer_range)
        out_proj.bias.zero_()


def train_classifier(spec: dict) -> dict:
    """Fine-tunes ``spec["model_dir"]`` with the stock Trainer on the prepared data and evaluates it."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    data = json.loads(Path(spec["data_file"]).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    set_seed(spec["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model_dir"], attn_implementation=spec["attn_implementation"]
    )
    reinit_head(model, spec["seed"])
    accuracy, f1 = load_metrics()
    labels = list(range(len(data["label_names"])))

    def compute_metrics(prediction):
        predictions = np.argmax(prediction.predictions, axis=-1)
        return {
            **accuracy.compute(predictions=predictions, references=prediction.label_ids),
            "f1_macro": f1.compute(
                predictions=predictions, references=prediction.label_ids, average="macro", labels=labels
            )["f1"],
        }

    args = TrainingArguments(
        **training_arguments(spec, weight_decay=WEIGHT_DECAY, warmup_steps=WARMUP),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    train_output, train_s, peak_mb = train_with_peak_memory(trainer)
    start = time.perf_counter()
    metrics = trainer.evaluate()
    eval_s = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "accuracy": metrics["eval_accuracy"],
        "f1_macro": metrics["eval_f1_macro"],
        "eval_loss": metrics["eval_loss"],
        "train_s": train_s,
        "eval_s": eval_s,
        "peak_train_memory_mb": peak_mb,
        "steps": train_output.global_step,
        "train_loss": train_output.training_loss,
        "logged_losses": losses,
        "train_examples": len(data["train"]),
        "eval_examples": len(data["eval"]),
        "device": str(trainer.args.device),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------------


def convert_for(task: str, options: dict, num_labels: int, names: list[str], dense_last_layers: int, folder: Path):
    """The pretrained MiniLM as a DualRoute classifier with the task's routing (saved with its tokenizer)."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)  # the head is re-drawn per seed in each run; this only makes the saved folder reproducible
    model, report = convert(
        str(assets.minilm_dir()),
        None,
        task="sequence-classification",
        num_labels=num_labels,
        block_size=options["block_size"],
        topk=options["top_k"],
        global_blocks=options["global_blocks"],
        max_position_embeddings=max(512, options["max_length"]),
        dense_last_layers=dense_last_layers,
    )
    model.config.classifier_pooling = options["pooling"]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: index for index, name in enumerate(names)}
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(assets.minilm_dir())).save_pretrained(folder)
    return report, model.config.num_hidden_layers


def summarise(runs: list[dict], variants: list[str]) -> list[dict]:
    """Per task and variant: mean and sample std over seeds, and the seed-paired difference to dense (in points)."""
    rows = []
    by_key = defaultdict(dict)
    for entry in runs:
        by_key[(entry["task"], entry["variant"])][entry["seed"]] = entry
    for task in dict.fromkeys(entry["task"] for entry in runs):
        dense = by_key.get((task, "dense"), {})
        for variant in variants:
            seeds = by_key.get((task, variant))
            if not seeds:
                continue
            entries = [seeds[s] for s in sorted(seeds)]
            row = {"task": task, "variant": variant, "seeds": sorted(seeds), "key_share": entries[0]["key_share"]}
            row["dense_last_layers"] = entries[0]["dense_last_layers"]
            for name in ("accuracy", "f1_macro", "train_s", "eval_s", "peak_train_memory_mb"):
                row[f"{name}_mean"], row[f"{name}_std"] = mean_std(e[name] for e in entries)
            paired = [s for s in sorted(seeds) if s in dense]
            if variant != "dense" and paired:
                for name in ("accuracy", "f1_macro"):
                    row[f"{name}_diff_points_mean"], row[f"{name}_diff_points_std"] = mean_std(
                        100 * (seeds[s][name] - dense[s][name]) for s in paired
                    )
                row["within_target"] = row["accuracy_diff_points_mean"] >= -TARGET_POINTS
                row["train_time_ratio"] = row["train_s_mean"] / statistics.fmean(dense[s]["train_s"] for s in paired)
            rows.append(row)
    return rows


def kept_runs(path: Path, rerun_tasks: list[str], variants: list[str], seeds: list[int], quick=False, max_steps=0):
    """The runs and task settings of the tasks not in ``rerun_tasks`` from a complete earlier result at ``path``, made
    with the same model, variants, seeds, data seed and run length (``quick``, ``max_steps``)."""
    if not path.exists():
        raise ValueError(f"--keep-other-tasks: there is no earlier result at {path} to keep runs from")
    earlier = json.loads(path.read_text())
    config = earlier["config"]
    expected = {"model": MODEL, "variants": variants, "seeds": seeds, "data_seed": DATA_SEED, "quick": quick,
                "max_steps": max_steps}  # fmt: skip
    mismatched = {field: config.get(field) for field, value in expected.items() if config.get(field) != value}
    if not earlier.get("complete") or mismatched:
        raise ValueError(
            f"--keep-other-tasks: {path} is not a complete run with the same {sorted(expected)} "
            f"(complete={earlier.get('complete')}, differing: {mismatched}); rerun every task instead"
        )
    runs = [entry for entry in earlier["runs"] if entry["task"] not in rerun_tasks]
    tasks_info = {task: info for task, info in earlier["tasks"].items() if task not in rerun_tasks}
    return runs, tasks_info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    parser.add_argument("--variants", nargs="+", default=None, help=f"default {VARIANTS}; also dualroute-dlN")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {SEEDS} ({QUICK_SEEDS} quick)")
    parser.add_argument(
        "--keep-other-tasks",
        action="store_true",
        help="keep the runs of the tasks not given to --tasks from the existing output file (same model, variants, "
        "seeds, data seed and run length), so that one task can be rerun without rerunning the other",
    )
    add_run_arguments(parser)
    for task, options in TASKS.items():
        for field, value in options.items():
            parser.add_argument(
                f"--{task.replace('_', '-')}-{field.replace('_', '-')}", type=type(value), default=None
            )
    args = parser.parse_args(argv)

    if args.worker:  # one run in a fresh process: print its result as the last line of stdout
        print(json.dumps(call_with_threads(train_classifier, json.loads(args.worker))))
        return 0

    variants = args.variants or VARIANTS
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    settings = {}
    for task in args.tasks:
        options = dict(TASKS[task], **(QUICK[task] if args.quick else {}))
        for field in options:
            value = getattr(args, f"{task}_{field}")
            if value is not None:
                options[field] = value
        settings[task] = options
        for variant in variants:
            parse_variant(variant, options["dense_last_layers"])  # fail early on a bad name

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(assets.minilm_dir()))
    started = time.perf_counter()
    runs, tasks_info = [], {}
    out = args.out or ("finetune_quick.json" if args.quick else "finetune.json")
    if args.keep_other_tasks:
        runs, tasks_info = kept_runs(RESULTS / out, args.tasks, variants, seeds, args.quick, args.max_steps)

    def save(complete: bool):
        """Writes what has been measured so far (after every run, so that an interrupted run keeps its results)."""
        payload = {
            "benchmark": "finetune",
            "complete": complete,
            "machine": machine(),
            "config": {
                "model": MODEL,
                "quick": args.quick,
                "variants": variants,
                "seeds": seeds,
                "data_seed": DATA_SEED,
                "weight_decay": WEIGHT_DECAY,
                "warmup": WARMUP,
                "max_steps": args.max_steps,
                "threads": args.threads,
                "in_process": args.in_process,
            },
            "tasks": tasks_info,
            "runtime_s": time.perf_counter() - started,
            "runs": runs,
            "rows": summarise(runs, variants),
        }
        return write_json(out, payload), payload

    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as workdir:
        workdir = Path(workdir)
        for task, options in settings.items():
            data = prepare_task(task, options, tokenizer)
            data_file = workdir / f"{task}.json"
            data_file.write_text(json.dumps({k: data[k] for k in ("label_names", "train", "eval")}))
            eval_lengths = [len(row["input_ids"]) for row in data["eval"]]
            tasks_info[task] = {
                "options": options,
                "label_names": data["label_names"],
                "train_examples": len(data["train"]),
                "eval_examples": len(data["eval"]),
                "eval_tokens_mean": statistics.fmean(eval_lengths),
                "eval_tokens_median": statistics.median(eval_lengths),
            }
            print(
                f"{task}: {len(data['train'])} train / {len(data['eval'])} eval examples, "
                f"{len(data['label_names'])} classes, eval tokens median {statistics.median(eval_lengths)}",
                flush=True,
            )
            folders = {}
            for variant in variants:
                implementation, dense_last = parse_variant(variant, options["dense_last_layers"])
                if dense_last not in folders:
                    folder = workdir / f"{task}-model-dl{dense_last}"
                    report, layers = convert_for(
                        task, options, len(data["label_names"]), data["label_names"], dense_last, folder
                    )
                    folders[dense_last] = folder
                    tasks_info[task].setdefault("conversion", {"copied": len(report.copied), "new": report.new})
                routed_layers = 0 if implementation == "sdpa" else layers - dense_last
                share = mean_key_share(eval_lengths, options["block_size"], options["top_k"], routed_layers, layers)
                for seed in seeds:
                    spec = {
                        "model_dir": str(folders[dense_last]),
                        "data_file": str(data_file),
                        "attn_implementation": implementation,
                        "seed": seed,
                        "epochs": options["epochs"],
                        "learning_rate": options["learning_rate"],
                        "batch_size": options["batch_size"],
                        "max_steps": args.max_steps,
                        "threads": args.threads,
                        "output_dir": str(workdir / f"run-{task}-{variant}-{seed}"),
                    }
                    result = run_training(
                        __file__, train_classifier, spec, in_process=args.in_process, timeout=RUN_TIMEOUT_S
                    )
                    entry = {"task": task, "variant": variant, "seed": seed, "key_share": share}
                    entry.update(dense_last_layers=dense_last if implementation != "sdpa" else None, **result)
                    runs.append(entry)
                    print(
                        f"  {variant:>14} seed {seed}: accuracy {result['accuracy']:.4f}, macro-F1 "
                        f"{result['f1_macro']:.4f}, train {result['train_s']:.0f} s, peak "
                        f"{result['peak_train_memory_mb']:.0f} MB",
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


TASK_TITLES = {"news": "news outlet (9 classes)", "rotten_tomatoes": "Rotten Tomatoes fresh/rotten"}


def _pm(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def render(payload: dict) -> str:
    """The README table: per task and variant, accuracy and macro-F1 (mean ± std over seeds, in %), the paired
    difference to dense, training time and peak training memory."""
    table = []
    for row in payload["rows"]:
        info = payload["tasks"][row["task"]]["options"]
        if row["variant"] == "dense":
            attention = "all keys"
        else:
            attention = f"B={info['block_size']}, top-{info['top_k']}"
            if row.get("dense_last_layers"):
                attention += f", last {row['dense_last_layers']} dense"
        diff = "—"
        if "accuracy_diff_points_mean" in row:
            diff = f"{row['accuracy_diff_points_mean']:+.1f} ± {row['accuracy_diff_points_std']:.1f}"
        time_ratio = f" ({row['train_time_ratio']:.2f}×)" if "train_time_ratio" in row else ""
        table.append(
            [
                TASK_TITLES.get(row["task"], row["task"]),
                row["variant"],
                attention,
                f"{row['key_share']:.0%}",
                _pm(row["accuracy_mean"], row["accuracy_std"]),
                _pm(row["f1_macro_mean"], row["f1_macro_std"]),
                diff,
                f"{row['train_s_mean']:.0f} s{time_ratio}",
                f"{row['peak_train_memory_mb_mean']:.0f} MB",
            ]
        )
    config = payload["config"]
    parts = []
    for task, info in payload["tasks"].items():
        options = info["options"]
        parts.append(
            f"{TASK_TITLES.get(task, task)}: {info['train_examples']} train / {info['eval_examples']} eval examples, "
            f"max {options['max_length']} tokens (eval median {info['eval_tokens_median']:g}), {options['epochs']} "
            f"epoch(s), lr {options['learning_rate']:g}, batch {options['batch_size']}"
        )
    intro = (
        f"{config['model']} converted to DualRoute and fine-tuned with the stock `Trainer`; dense = the same checkpoint "
        f'with `attn_implementation="sdpa"`. Seeds {config["seeds"]} (paired: same head init and data order per '
        "seed); accuracy and macro-F1 in % from the local `evaluate` modules, mean ± std over seeds; Δ = DualRoute − "
        "dense accuracy, per seed, in points. Keys read: mean share of an input's keys a query reads (over layers). "
        "Training time: wall clock of `trainer.train()`; memory: peak resident memory added by training.\n"
        + "".join(f"\n- {part}" for part in parts)
    )
    if config.get("quick"):
        intro = "**Quick run (toy sizes): checks the pipeline, not the accuracy.** " + intro
    if payload.get("complete") is False:
        intro = "**Partial results (the run was interrupted or is still going).** " + intro
    header = [
        "task",
        "variant",
        "attention",
        "keys read",
        "accuracy",
        "macro-F1",
        "Δ accuracy",
        "train time",
        "memory",
    ]
    return intro + "\n\n" + markdown_table(header, table)


if __name__ == "__main__":
    sys.exit(main())
