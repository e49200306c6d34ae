"""Whole encoders: DualRoute against BERT (dense SDPA), Longformer, BigBird and ModernBERT, in one run, on this machine.

    python benchmarks/bench_models.py                       # N = 1k ... 16k, 1 and 6 layers -> results/models_cpu.json
    python benchmarks/bench_models.py --include-32k         # adds N = 32k where the memory cap allows
    python benchmarks/bench_models.py --layers 1 --repeats 3   # the README's 1-layer table (models_cpu.json)
    python benchmarks/bench_models.py --layers 6 --lengths 1024 2048 4096 8192 --repeats 3 --out models_cpu_6layers.json
    python benchmarks/bench_models.py --lengths 1024 2048 --layers 1 --repeats 1 --out /tmp/models_quick.json

Every model is built from a config with random weights (nothing comes from the Hub) at the same shape: hidden 512,
8 heads, FFN 2048, vocabulary 30522, batch 1, float32, dropout 0, and runs on the same random input_ids (no
attention_mask, no global tokens).

- DualRoute: RoPE, `attn_implementation="dualroute"` (the default; backend `auto`, i.e. `gather` on CPU),
  block 64, top-k 8, one global block.
- BERT: `attn_implementation="sdpa"`, the dense baseline.
- Longformer: attention window 512 (256 tokens each side), its own chunked attention.
- BigBird: `block_sparse`, block 64, 3 random blocks. It runs full attention when N <= (5 + 2*3)*64 = 704; the
  rows record which attention actually ran. In transformers 5.24 its block-sparse attention also fills a dense
  (heads, N, N) attention-probability matrix on every call (not only with output_attentions): O(N^2) memory.
- ModernBERT: `attn_implementation="sdpa"`, local window 128, a global layer every 3rd layer. Its config in
  transformers 5.x has `layer_types`, which this script sets explicitly, so a 1-layer ModernBERT is a local layer,
  not the global one `global_attn_every_n_layers` would give. Its FFN is a GLU: at FFN 2048 it does 1.5x the FFN
  FLOPs of the others.

Measured per (layers, N, model): forward latency under `torch.no_grad` (eval mode), forward+backward latency (train
mode, loss = sum(last_hidden_state * a fixed random tensor)), and peak extra memory of each, in a fresh process: the
resident memory's high-water mark (what the process takes from the machine, C allocator retention included) and the
peak of torch's allocated tensors (`peak_allocated_mb`: free of that retention, what a GPU's allocator would report;
a third run, under torch.profiler). The memory target is judged on the resident figure. Times
are medians, every (N, model) of a pass taking turns (a round runs each once, so the machine's drift over the pass
moves them alike); ratios are taken against the other models measured in the same run. A combination is skipped, and
recorded with the reason, when its estimated or measured peak memory exceeds `--max-memory-gb`, when its run time,
extrapolated from the smaller lengths, exceeds `--max-run-seconds`, or when it fails. Before timing, DualRoute with
top-k covering every block is checked against the same weights run with `attn_implementation="sdpa"`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    BigBirdConfig,
    BigBirdModel,
    LongformerConfig,
    LongformerModel,
    ModernBertConfig,
    ModernBertModel,
)

from modeling_dualroute import DualRouteConfig, DualRouteModel  # noqa: E402

from common import (  # noqa: E402
    RESULTS,
    machine,
    markdown_table,
    measure_in_fresh_process,
    peak_allocated_mb,
    peak_extra_memory_mb,
    time_in_turns,
    write_json,
)


transformers.logging.set_verbosity_error()  # BigBird warns on every short input; the rows record it instead

SIZES = dict(hidden=512, heads=8, intermediate=2048, vocab=30522)
ROUTING = dict(route_block_size=64, route_topk=8, route_global_blocks=1)
MODELS = ["dualroute", "bert", "longformer", "bigbird", "modernbert"]
PEERS = MODELS[1:]
LABELS = {
    "dualroute": "DualRoute",
    "bert": "BERT (SDPA)",
    "longformer": "Longformer w512",
    "bigbird": "BigBird sparse",
    "modernbert": "ModernBERT w128",
}
MODES = ("forward", "forward_backward")
LONGFORMER_WINDOW = 512
BIGBIRD = dict(block_size=64, num_random_blocks=3)
MODERNBERT_WINDOW = 128
MODERNBERT_GLOBAL_EVERY = 3
FIRST_TOKEN_ID = 5  # input ids avoid the special ids (pad is 0 or 1) so no model treats a token as padding
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Models: every builder takes the sizes, so the tests build them tiny
# ---------------------------------------------------------------------------------------------------------------------


def build_dualroute(n, layers, hidden=512, heads=8, intermediate=2048, vocab=30522, **routing) -> DualRouteModel:
    config = DualRouteConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        position_embedding_type="rope",  # any length works
        max_position_embeddings=n,
        **{**ROUTING, **routing},
        **NO_DROPOUT,
    )
    return DualRouteModel(config)


def build_bert(n, layers, hidden=512, heads=8, intermediate=2048, vocab=30522) -> BertModel:
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=n,
        attn_implementation="sdpa",
        **NO_DROPOUT,
    )
    return BertModel(config, add_pooling_layer=False)


def build_longformer(n, layers, hidden=512, heads=8, intermediate=2048, vocab=30522) -> LongformerModel:
    config = LongformerConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        attention_window=LONGFORMER_WINDOW,
        # RoBERTa-style positions start at pad_token_id + 1 = 2, and Longformer pads to a multiple of the window
        max_position_embeddings=padded_length(n, LONGFORMER_WINDOW) + 2,
        **NO_DROPOUT,
    )
    return LongformerModel(config, add_pooling_layer=False)


def build_bigbird(n, layers, hidden=512, heads=8, intermediate=2048, vocab=30522) -> BigBirdModel:
    config = BigBirdConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        hidden_act="gelu",  # its default is gelu_new; the others use gelu
        attention_type="block_sparse",
        max_position_embeddings=padded_length(n, BIGBIRD["block_size"]),  # it pads to a multiple of the block
        **BIGBIRD,
        **NO_DROPOUT,
    )
    return BigBirdModel(config, add_pooling_layer=False)


def build_modernbert(n, layers, hidden=512, heads=8, intermediate=2048, vocab=30522) -> ModernBertModel:
    config = ModernBertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        hidden_activation="gelu",
        max_position_embeddings=max(n, 8192),
        local_attention=MODERNBERT_WINDOW,
        layer_types=modernbert_layer_types(layers),
        # its special ids (50281...) lie outside a 30522 vocabulary
        pad_token_id=0,
        cls_token_id=1,
        bos_token_id=1,
        sep_token_id=2,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    return ModernBertModel(config)


def modernbert_layer_types(layers: int) -> list[str]:
    """A global layer every 3rd layer (layers 0, 3, ...), as in ModernBERT, except that a lone layer is local: the
    benchmark is about the local window, and `global_attn_every_n_layers` alone makes layer 0 global."""
    if layers == 1:
        return ["sliding_attention"]
    return ["full_attention" if i % MODERNBERT_GLOBAL_EVERY == 0 else "sliding_attention" for i in range(layers)]


BUILDERS = {
    "dualroute": build_dualroute,
    "bert": build_bert,
    "longformer": build_longformer,
    "bigbird": build_bigbird,
    "modernbert": build_modernbert,
}


def padded_length(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_model(name: str, n: int, layers: int, seed: int = 0, **sizes):
    torch.manual_seed(seed)
    return BUILDERS[name](n, layers, **{**SIZES, **sizes})


def attention_in_use(name: str, model) -> str:
    """What attention actually ran (call after a forward): BigBird switches itself to full attention on short input."""
    if name == "bigbird":
        return model.attention_type
    if name == "longformer":
        return f"sliding window {LONGFORMER_WINDOW} (chunked, own implementation)"
    if name == "modernbert":
        types = model.config.layer_types
        return f"sdpa; {types.count('sliding_attention')} local (window {MODERNBERT_WINDOW}) / {types.count('full_attention')} global layers"
    if name == "dualroute":
        return f"dualroute (route_backend={model.config.route_backend})"
    return model.config._attn_implementation


def describe_models(layers: int, **sizes) -> dict:
    """Per model: class, attention implementation, parameter count (at the smallest position table) and notes."""
    notes = {
        "dualroute": "RoPE; route_block_size 64, route_topk 8, route_global_blocks 1; backend auto (gather on CPU)",
        "bert": "attn_implementation=sdpa, no attention_mask (SDPA's fused CPU kernel, O(N) memory); no pooler",
        "longformer": "attention_window 512 (256 each side), no global tokens; pads to a multiple of 512 itself; "
        "max_position_embeddings = padded N + 2 (positions start at pad_token_id + 1); no pooler",
        "bigbird": "attention_type block_sparse, block_size 64, num_random_blocks 3, hidden_act gelu; pads to a "
        "multiple of 64 itself; full attention when N <= 704 (rows record it); random blocks only in train mode "
        "(eval uses fixed ones, same cost); transformers 5.24 fills the full (batch, heads, N, N) attention-probability "
        "matrix in every block-sparse call, even without output_attentions, so its memory (and part of its time) "
        "grows as N^2; no pooler",
        "modernbert": "attn_implementation=sdpa; local_attention 128; layer_types set explicitly (1 layer: local; "
        "6 layers: global at layers 0 and 3); the local window is an N x N mask under SDPA, so it saves no compute; "
        "GLU FFN (1.5x the FFN FLOPs at the same intermediate_size); special token ids remapped into the vocab",
    }
    out = {}
    for name in MODELS:
        model = build_model(name, 1024, layers, **sizes)
        out[name] = {
            "class": type(model).__name__,
            "attn_implementation": model.config._attn_implementation,
            f"parameters_{layers}_layers_n1024": sum(p.numel() for p in model.parameters()),
            "notes": notes[name],
        }
    return out


# ---------------------------------------------------------------------------------------------------------------------
# One measured step
# ---------------------------------------------------------------------------------------------------------------------


def make_input_ids(n: int, vocab: int = SIZES["vocab"], seed: int = 0) -> torch.Tensor:
    """The same ids for every model at a given N."""
    return torch.randint(FIRST_TOKEN_ID, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def step(name: str, mode: str, n: int, layers: int, **sizes):
    """``(run, model)``: ``run`` does one forward (no grad, eval mode) or one forward+backward (train mode)."""
    sizes = {**SIZES, **sizes}
    model = build_model(name, n, layers, **sizes)
    ids = make_input_ids(n, sizes["vocab"])
    if mode == "forward":
        model.eval()

        def run():
            with torch.no_grad():
                model(input_ids=ids)

    else:
        model.train()  # dropout is 0; BigBird draws its random blocks only in train mode
        weight = torch.randn((1, n, sizes["hidden"]), generator=torch.Generator().manual_seed(1))

        def run():
            out = model(input_ids=ids).last_hidden_state
            (out * weight).sum().backward()
            model.zero_grad(set_to_none=True)

    return run, model


def check_dualroute(n: int = 1024, layers: int = 2, **sizes) -> dict:
    """DualRoute against the same weights run densely, before timing.

    With top-k covering every block, the routed model must equal `attn_implementation="sdpa"`; the explicit `gather`
    backend is checked too (`auto` takes the dense path in that case). Then the benchmarked setting (top-k 8): `auto`
    must equal `gather`, the backend it picks on CPU, and differ from dense (so routing really drops blocks).
    """
    sizes = {**SIZES, **sizes}
    ids = make_input_ids(n, sizes["vocab"], seed=3)
    blocks = -(-n // ROUTING["route_block_size"])
    model = build_model("dualroute", n, layers, **sizes).eval()

    def output(topk: int, backend: str = "auto") -> torch.Tensor:
        model.config.route_topk, model.config.route_backend = topk, backend
        with torch.no_grad():
            return model(input_ids=ids).last_hidden_state

    errors = {}
    model.set_attn_implementation("sdpa")
    dense = output(blocks)
    model.set_attn_implementation("dualroute")
    errors["full_topk_auto_vs_sdpa"] = (output(blocks) - dense).abs().max().item()
    errors["full_topk_gather_vs_sdpa"] = (output(blocks, "gather") - dense).abs().max().item()
    routed = output(ROUTING["route_topk"])
    errors["topk8_auto_vs_gather"] = (routed - output(ROUTING["route_topk"], "gather")).abs().max().item()
    model.config.route_topk, model.config.route_backend = ROUTING["route_topk"], "auto"
    for name, error in errors.items():
        if not error <= 1e-4:
            raise AssertionError(f"DualRoute correctness check {name}: max abs error {error:.2e} > 1e-4; not timing.")
    errors["topk8_vs_sdpa (expected > 0)"] = (routed - dense).abs().max().item()
    if blocks > ROUTING["route_topk"] and errors["topk8_vs_sdpa (expected > 0)"] == 0:
        raise AssertionError("DualRoute at top-k 8 equals dense attention: routing dropped no block.")
    return errors


# ---------------------------------------------------------------------------------------------------------------------
# Guards: memory estimate before a run, run time extrapolated from the smaller lengths
# ---------------------------------------------------------------------------------------------------------------------

# Peak extra memory, fitted (and rounded up) to fresh-process measurements on a 2-core CPU (torch 2.13, transformers
# 5.24) at hidden 512 / 8 heads / FFN 2048, N = 1k...8k, 1 and 2 layers: (bytes per token for the first layer, bytes
# per token for each further layer, bytes per token^2). The quadratic terms are transient: BigBird builds the full
# (heads, N, N) attention-probability matrix in every block-sparse call (transformers 5.24 does it even without
# output_attentions), ModernBERT's local window is an N x N mask under SDPA.
MEMORY_MODEL = {
    "forward": {
        "dualroute": (40e3, 5e3, 0.0),
        "bert": (35e3, 5e3, 0.0),
        "longformer": (130e3, 10e3, 0.0),
        "bigbird": (110e3, 10e3, 36.0),
        "modernbert": (35e3, 5e3, 13.0),
    },
    "forward_backward": {
        "dualroute": (75e3, 50e3, 0.0),
        "bert": (60e3, 40e3, 0.0),
        "longformer": (150e3, 100e3, 0.0),
        "bigbird": (150e3, 95e3, 36.0),
        "modernbert": (75e3, 70e3, 13.0),
    },
}
MEMORY_FIXED = {"forward": 50e6, "forward_backward": 300e6}  # training: gradients of ~20M parameters and more


def estimate_memory_gb(name: str, mode: str, n: int, layers: int, hidden: int = 512, heads: int = 8) -> float:
    """A rough, upper estimate of the peak extra memory, to skip runs that cannot fit before starting them."""
    first, further, quadratic = MEMORY_MODEL[mode][name]
    if name == "longformer":
        n = padded_length(n, LONGFORMER_WINDOW)
    if name == "bigbird":
        n = padded_length(n, BIGBIRD["block_size"])
    scale = hidden / 512
    linear = n * scale * (first + further * (layers - 1))
    return (MEMORY_FIXED[mode] * scale**2 + linear + quadratic * heads / 8 * n * n) / 1e9


def predict_seconds(history: list[tuple[int, float]], n: int) -> float | None:
    """Run time at ``n`` from the measured (N, seconds) so far: the growth exponent of the last two points, clamped to
    [1, 2] (quadratic when only one point is known)."""
    if not history:
        return None
    n1, t1 = history[-1]
    exponent = 2.0
    if len(history) >= 2:
        n0, t0 = history[-2]
        if t0 > 0 and n1 != n0:
            exponent = min(2.0, max(1.0, math.log(t1 / t0) / math.log(n1 / n0)))
    return t1 * (n / n1) ** exponent


def repeats_for(n: int, predicted: float | None, repeats: int) -> tuple[int, int]:
    """(warmup, repeats): fewer at large N and for runs of tens of seconds."""
    if predicted is not None and predicted > 30:
        return 0, min(repeats, 2)
    if n >= 16384:
        return 1, min(repeats, 3)
    return 1, repeats


def limit_address_space(cap_gb: float) -> None:
    """Lets an allocation past the cap fail with an error in the memory child instead of waking the OOM killer."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            now = int(line.split()[1]) * 1024
            limit = int(now + 1.25 * cap_gb * 1e9 + 4e9)  # slack: allocator arenas and thread stacks are virtual
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard == resource.RLIM_INFINITY or limit < hard:
                resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
            return


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def size_args(args) -> list[str]:
    return [
        "--hidden", str(args.hidden), "--heads", str(args.heads), "--intermediate", str(args.intermediate),
        "--max-memory-gb", str(args.max_memory_gb),
    ]  # fmt: skip


def measure_memory_child(args, name: str, mode: str, n: int, layers: int) -> None:
    sizes = dict(hidden=args.hidden, heads=args.heads, intermediate=args.intermediate)
    try:
        run, model = step(name, mode, n, layers, **sizes)
        limit_address_space(args.max_memory_gb)
        if args.memory_warmup:
            run()  # warm up; what it frees is handed back before measuring
        started = time.perf_counter()
        peak = peak_extra_memory_mb(run)
        seconds = time.perf_counter() - started  # the guards of longer inputs extrapolate from it
        result = {
            "peak_extra_mb": peak,
            "peak_allocated_mb": peak_allocated_mb(run),  # tensors only, a third run
            "seconds": seconds,
            "attention": attention_in_use(name, model),
        }
    except (RuntimeError, MemoryError) as error:  # an allocation past the address-space limit
        result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    print(json.dumps(result))


def prepare(args, name: str, mode: str, n: int, layers: int, history: list) -> tuple[dict, tuple | None]:
    """One row's guards, peak memory (in a fresh process) and warm-up run: ``(row, (run, repeats))`` for
    `time_in_turns`, or ``(row, None)`` when the row is skipped (the row says why). Appends the row's time, from the
    warm-up or the memory run, to ``history``, which the guards of the longer inputs extrapolate from."""
    row = dict(model=name, layers=layers, n=n, mode=mode)
    sizes = dict(hidden=args.hidden, heads=args.heads, intermediate=args.intermediate)
    estimate = estimate_memory_gb(name, mode, n, layers, hidden=args.hidden, heads=args.heads)
    row["estimated_memory_gb"] = round(estimate, 2)
    if estimate > args.max_memory_gb:
        row["skipped"] = f"estimated peak memory {estimate:.1f} GB > --max-memory-gb {args.max_memory_gb}"
        return row, None
    predicted = predict_seconds(history, n)
    if predicted is not None:
        row["predicted_s"] = round(predicted, 2)
        if predicted > args.max_run_seconds:
            row["skipped"] = f"predicted {predicted:.0f} s per run > --max-run-seconds {args.max_run_seconds}"
            return row, None
    seconds = predicted
    warmup, repeats = repeats_for(n, predicted, args.repeats)
    if not args.no_memory:
        # runs of tens of seconds are measured without a warm-up run (on CPU it only saves one-off allocations)
        try:
            child = measure_in_fresh_process(
                __file__,
                ["--memory", name, mode, str(n), str(layers), *size_args(args), "--memory-warmup", str(warmup)],
                timeout=args.child_timeout,
            )
        except Exception as error:  # killed (OOM killer, timeout) or crashed
            row["skipped"] = f"memory run failed: {str(error).strip().splitlines()[-1][:300]}"
            return row, None
        if "error" in child:
            row["skipped"] = f"memory run failed under the {args.max_memory_gb} GB cap: {child['error']}"
            return row, None
        row["peak_extra_mb"] = child["peak_extra_mb"]
        row["peak_allocated_mb"] = child["peak_allocated_mb"]
        seconds = child["seconds"]
        if child["peak_extra_mb"] > args.max_memory_gb * 1024:
            row["skipped"] = f"peak memory {child['peak_extra_mb'] / 1024:.1f} GB > --max-memory-gb"
            return row, None
    try:
        run, model = step(name, mode, n, layers, **sizes)
        for _ in range(warmup):
            started = time.perf_counter()
            run()
            seconds = time.perf_counter() - started
        row["attention"] = attention_in_use(name, model)
    except (RuntimeError, MemoryError) as error:
        row["skipped"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
        return row, None
    if seconds is not None:
        history.append((n, seconds))
    return row, (run, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--include-32k", action="store_true", help="also N = 32768 (where the memory cap allows)")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per point (fewer at N >= 16k)")
    parser.add_argument("--max-memory-gb", type=float, default=20.0, help="skip what would need more memory")
    parser.add_argument("--max-run-seconds", type=float, default=600.0, help="skip runs predicted to take longer")
    parser.add_argument("--child-timeout", type=float, default=3600.0, help="seconds for one memory subprocess")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--hidden", type=int, default=SIZES["hidden"])
    parser.add_argument("--heads", type=int, default=SIZES["heads"])
    parser.add_argument("--intermediate", type=int, default=SIZES["intermediate"])
    parser.add_argument("--out", default="models_cpu.json", help="JSON path (relative: under benchmarks/results)")
    parser.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    parser.add_argument("--memory", nargs=4, metavar=("MODEL", "MODE", "N", "LAYERS"), help=argparse.SUPPRESS)
    parser.add_argument("--memory-warmup", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory:  # child process: one configuration's peak memory
        name, mode, n, layers = args.memory
        measure_memory_child(args, name, mode, int(n), int(layers))
        return

    lengths = sorted(set(args.lengths + ([32768] if args.include_32k else [])))
    sizes = dict(hidden=args.hidden, heads=args.heads, intermediate=args.intermediate)
    started = time.perf_counter()
    checks = check_dualroute(**sizes)
    print("DualRoute correctness at N=1024 (max abs error):", {k: f"{v:.1e}" for k, v in checks.items()}, flush=True)
    models = args.models if "dualroute" in args.models else ["dualroute", *args.models]
    rows = []
    for layers in sorted(args.layers):
        for mode in args.modes:
            # guards, memory and warm-up one (N, model) at a time, then all of them timed taking turns: the machine's
            # drift over the pass moves every model and length alike (the targets compare models at one N and one
            # model across N)
            history = {name: [] for name in models}
            calls = {}
            for n in lengths:
                for name in models:
                    row, call = prepare(args, name, mode, n, layers, history[name])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if call is not None:
                        run, repeats = call
                        calls[len(rows) - 1] = (run, 0, repeats)
            for index, timing in time_in_turns(calls).items():
                rows[index].update(timing)
                print(json.dumps({k: v for k, v in rows[index].items() if k != "runs_s"}), flush=True)
            del calls

    config = {
        **{k: getattr(args, k) for k in ("hidden", "heads", "intermediate")},
        "vocab": SIZES["vocab"],
        "batch": 1,
        "dtype": "float32",
        "routing": ROUTING,
        "lengths": lengths,
        "layers": sorted(args.layers),
        "max_memory_gb": args.max_memory_gb,
        "max_run_seconds": args.max_run_seconds,
        "repeats": args.repeats,
    }
    payload = {
        "benchmark": "models",
        "machine": machine(),
        "config": config,
        "models": describe_models(min(args.layers), **sizes),
        "correctness": checks,
        **summarize(rows),
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }
    path = write_json(args.out, payload)
    plot_path = Path(args.plot) if args.plot else path.with_suffix(".png")
    if not plot_path.is_absolute() and args.plot:
        plot_path = RESULTS / plot_path
    plot(payload, plot_path)
    print(render(payload))
    print(f"wrote {path} and {plot_path} in {payload['wall_s']:.0f} s")


# ---------------------------------------------------------------------------------------------------------------------
# Summary, tables, plot
# ---------------------------------------------------------------------------------------------------------------------


def _find(rows, **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and "median_s" in row:
            return row
    return None


def summarize(rows: list[dict]) -> dict:
    """DualRoute's speedup over each model in the same run, and the issue's targets."""
    for row in rows:
        row.pop("dualroute_speedup", None)
        row.pop("dualroute_memory_ratio", None)
        own = _find(rows, model="dualroute", layers=row["layers"], n=row["n"], mode=row["mode"])
        if row["model"] != "dualroute" and own and "median_s" in row:
            row["dualroute_speedup"] = row["median_s"] / own["median_s"]
            if row.get("peak_extra_mb") and own.get("peak_extra_mb") is not None:
                row["dualroute_memory_ratio"] = own["peak_extra_mb"] / row["peak_extra_mb"]
    targets = {}

    # (1) whole 1-layer forward at 16k: DualRoute >= 3x faster than the fastest peer
    own = _find(rows, model="dualroute", layers=1, n=16384, mode="forward")
    peers = {p: _find(rows, model=p, layers=1, n=16384, mode="forward") for p in PEERS}
    peers = {p: r for p, r in peers.items() if r}
    target = {"target": 3.0, "what": "1-layer forward at N=16384: fastest peer's time / DualRoute's"}
    if own and peers:
        fastest = min(peers, key=lambda p: peers[p]["median_s"])
        value = peers[fastest]["median_s"] / own["median_s"]
        target.update(value=value, fastest_peer=fastest, met=value >= 3.0)
        target["peers_not_measured"] = [p for p in PEERS if p not in peers]
    else:
        target.update(value=None, met=None, reason="not measured (needs 1 layer at N=16384)")
    targets["forward_1layer_16k_vs_fastest_peer"] = target

    # (2) training step at 8k: DualRoute >= 3x faster than BERT-SDPA with <= half its peak memory
    target = {"target": 3.0, "memory_target": 0.5}
    for layers in sorted({r["layers"] for r in rows}, reverse=True):
        own = _find(rows, model="dualroute", layers=layers, n=8192, mode="forward_backward")
        bert = _find(rows, model="bert", layers=layers, n=8192, mode="forward_backward")
        if own and bert:
            value = bert["median_s"] / own["median_s"]
            memory = None
            if own.get("peak_extra_mb") is not None and bert.get("peak_extra_mb"):
                memory = own["peak_extra_mb"] / bert["peak_extra_mb"]
            target.update(
                layers=layers,
                what=f"{layers}-layer forward+backward at N=8192: BERT-SDPA time / DualRoute's; memory ratio",
                value=value,
                memory_ratio=memory,
                dualroute_mb=own.get("peak_extra_mb"),
                bert_mb=bert.get("peak_extra_mb"),
                met=value >= 3.0 and memory is not None and memory <= 0.5,
            )
            if own.get("peak_allocated_mb") and bert.get("peak_allocated_mb"):
                target["allocated_memory_ratio"] = own["peak_allocated_mb"] / bert["peak_allocated_mb"]
            if memory is None:
                target["reason"] = "memory not measured (--no-memory)"
            break
    else:
        target.update(value=None, met=None, reason="not measured (needs DualRoute and BERT forward+backward at 8192)")
    targets["training_8k_vs_bert"] = target

    # (3) near-linear scaling: DualRoute forward time per doubling of N, from 4k to the largest measured
    for layers in sorted({r["layers"] for r in rows}):
        points = sorted(
            (r["n"], r["median_s"])
            for r in rows
            if r["model"] == "dualroute" and r["layers"] == layers and r["mode"] == "forward" and "median_s" in r
        )
        points = [(n, t) for n, t in points if n >= 4096]
        growth = [(t1 / t0) ** (1 / math.log2(n1 / n0)) for (n0, t0), (n1, t1) in zip(points, points[1:])]
        name = f"forward_growth_per_doubling_{layers}layer"
        if growth:
            targets[name] = {
                "what": f"DualRoute {layers}-layer forward, time ratio per doubling of N, "
                f"{points[0][0] // 1024}k to {points[-1][0] // 1024}k (worst step)",
                "value": max(growth),
                "all": growth,
                "lengths": [n for n, _ in points],
                "target": 2.3,
                "met": max(growth) <= 2.3,
            }
        else:
            targets[name] = {"value": None, "met": None, "target": 2.3, "reason": "needs two lengths >= 4096"}
    return {"targets": targets}


def _length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _cell(row: dict | None, name: str) -> str:
    if row is None:
        return "–"
    if "median_s" not in row:
        return "skipped"
    cell = f"{row['median_s'] * 1000:.0f} ms"
    if name != "dualroute" and row.get("dualroute_speedup"):
        cell += f" ({row['dualroute_speedup']:.1f}×)"
    if row.get("peak_extra_mb") is not None:
        cell += f", {row['peak_extra_mb']:.0f} MB"
        if row.get("peak_allocated_mb") is not None:
            cell += f" / {row['peak_allocated_mb']:.0f} MB"
    if name == "bigbird" and row.get("attention") == "original_full":
        cell += " †"
    return cell


def render(payload: dict) -> str:
    """The README tables: per layer count and pass, rows N, columns the models; × = how much faster DualRoute is."""
    rows = payload["rows"]
    config = payload["config"]
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    memory = " (resident / torch tensors)" if any("peak_allocated_mb" in r for r in rows) else ""
    out = []
    for layers in sorted({r["layers"] for r in rows}):
        for mode in MODES:
            lengths = sorted({r["n"] for r in rows if r["layers"] == layers and r["mode"] == mode})
            if not lengths:
                continue
            table = []
            for n in lengths:
                cells = [_length(n)]
                for name in models:
                    row = next(
                        (r for r in rows if (r["model"], r["layers"], r["n"], r["mode"]) == (name, layers, n, mode)),
                        None,
                    )
                    cells.append(_cell(row, name))
                table.append(cells)
            out.append(
                f"{layers} layer{'s' if layers > 1 else ''}, {'forward' if mode == 'forward' else 'forward+backward'}"
                f": hidden {config['hidden']}, {config['heads']} heads, FFN {config['intermediate']}, batch 1, "
                f"{config['dtype']}; median time (× = DualRoute's speedup over that model), peak extra memory{memory}"
            )
            out.append(markdown_table(["N"] + [LABELS[m] for m in models], table))
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        out.append(
            "Skipped:\n"
            + "\n".join(
                f"- {LABELS[r['model']]}, {r['layers']} layer(s), N={_length(r['n'])}, "
                f"{r['mode'].replace('_', '+')}: {r['skipped']}"
                for r in skipped
            )
        )
    if any(r.get("attention") == "original_full" for r in rows):
        out.append("† BigBird ran full attention at this length (it switches itself when N <= 704).")
    targets = payload.get("targets", {})
    if targets:
        table = []
        for name, t in targets.items():
            goal = f"≥ {t['target']}×" if "growth" not in name else f"≤ {t['target']}×"
            measured = _fmt(t.get("value"))
            if t.get("fastest_peer"):
                measured += f" (vs {LABELS[t['fastest_peer']]})"
            if "memory_target" in t:
                goal += f", memory ≤ {t['memory_target']}×"
                measured += f", memory {_fmt(t.get('memory_ratio'))}×"
                if t.get("allocated_memory_ratio") is not None:
                    measured += f" (tensors {_fmt(t['allocated_memory_ratio'])}×)"
                if t.get("layers"):
                    name += f" ({t['layers']} layers)"
            met = "–" if t.get("met") is None else "yes" if t["met"] else "**no**"
            table.append([name, measured, goal, met])
        out.append(markdown_table(["target", "measured", "goal", "met"], table))
    return "\n\n".join(out)


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def plot(payload: dict, path: Path) -> Path:
    """Forward latency against N, log-log, one line per model; one panel per layer count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    layer_counts = sorted({r["layers"] for r in rows})
    figure, axes = plt.subplots(1, len(layer_counts), figsize=(6 * len(layer_counts), 4.5), squeeze=False)
    for axis, layers in zip(axes[0], layer_counts):
        for name in MODELS:
            points = sorted(
                (r["n"], r["median_s"])
                for r in rows
                if r["model"] == name and r["layers"] == layers and r["mode"] == "forward" and "median_s" in r
            )
            if points:
                xs, ys = zip(*points)
                axis.plot(xs, ys, marker="o", label=LABELS[name], linewidth=2.5 if name == "dualroute" else 1.5)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        lengths = sorted({r["n"] for r in rows if r["layers"] == layers})
        axis.set_xticks(lengths, [_length(n) for n in lengths])
        axis.minorticks_off()
        axis.set_xlabel("sequence length N")
        axis.set_ylabel("forward latency (s)")
        axis.set_title(f"{layers} layer{'s' if layers > 1 else ''}, batch 1, float32, CPU")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


if __name__ == "__main__":
    sys.exit(main())
