"""Attention alone: dense SDPA against each DualRoute backend, in one run, on this machine.

    python benchmarks/bench_attention.py                  # N = 1k ... 32k, writes results/attention_cpu.json
    python benchmarks/bench_attention.py --lengths 1024 4096 --causal-lengths 4096 --no-memory --out attention_quick.json
    python benchmarks/bench_attention.py --scaling-only   # re-measures only the scaling rows of the JSON

Settings: batch 1, 8 heads, head_dim 64, block 64, top-k 8, one global block, float32, bidirectional (the encoder)
plus causal rows at 1k, 2k, 4k and 16k. Each backend is checked against the `reference` backend at N = 1024 before
timing.
Times are medians, the methods and lengths of a pass taking turns (a round runs each once, so the machine's drift
moves them alike); speedups are ratios to dense SDPA measured in the same run; peak memory is measured in a fresh
process per (method, mode, N). How DualRoute's time grows with N is measured apart (the scaling rows): its default
backend alone, the lengths taking turns, with no dense run in between.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch

from modeling_dualroute import route_blocks, routed_attention

from common import (
    RESULTS,
    machine,
    markdown_table,
    measure_in_fresh_process,
    peak_extra_memory_mb,
    time_in_turns,
    write_json,
)


CONFIG = dict(batch=1, heads=8, head_dim=64, block_size=64, top_k=8, global_blocks=1, dtype="float32")
ROUTING = dict(block_size=CONFIG["block_size"], top_k=CONFIG["top_k"], global_blocks=CONFIG["global_blocks"])
METHODS = ["sdpa", "gather", "flex", "auto"]
TRAINING_METHODS = ["sdpa", "gather", "auto"]  # flex has no CPU backward in torch 2.13


def make_inputs(n: int, requires_grad: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (CONFIG["batch"], CONFIG["heads"], n, CONFIG["head_dim"])
    return [torch.randn(shape, generator=generator).requires_grad_(requires_grad) for _ in range(3)]


def attention(method: str, q, k, v, causal: bool):
    if method == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return routed_attention(q, k, v, causal=causal, backend=method, **ROUTING)


def step(method: str, mode: str, n: int, causal: bool):
    """A callable that runs one forward (no grad) or one forward+backward."""
    q, k, v = make_inputs(n, requires_grad=mode == "forward_backward")
    if mode == "forward":

        def run():
            with torch.no_grad():
                attention(method, q, k, v, causal)

    else:
        grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

        def run():
            out = attention(method, q, k, v, causal)
            out.backward(grad)
            for t in (q, k, v):
                t.grad = None

    return run


def check_backends(n: int = 1024) -> dict:
    """Every backend against `reference` (forward, and backward for the training backends) before timing."""
    errors = {}
    for causal in (False, True):
        q, k, v = make_inputs(n, requires_grad=True, seed=3)
        grad = torch.randn(q.shape)
        ref = routed_attention(q, k, v, causal=causal, backend="reference", **ROUTING)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
        for method in ("gather", "flex", "auto"):
            if method in TRAINING_METHODS:
                out = routed_attention(q, k, v, causal=causal, backend=method, **ROUTING)
                grads = torch.autograd.grad(out, (q, k, v), grad)
                error = max((a - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads)))
            else:
                with torch.no_grad():
                    out = routed_attention(q, k, v, causal=causal, backend=method, **ROUTING)
                error = (out - ref).abs().max().item()
            errors[f"{method}{' causal' if causal else ''}"] = error
            if error > 1e-4:
                raise AssertionError(f"{method} (causal={causal}) differs from reference by {error:.2e}")
    return errors


def repeats_for(n: int, method: str) -> tuple[int, int]:
    """(warmup, repeats): fewer dense runs at large N, where each takes seconds to a minute."""
    if method == "sdpa" and n >= 16384:
        return 0, 2
    return 1, 5


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--causal-lengths", type=int, nargs="*", default=[1024, 2048, 4096, 16384])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default="attention_cpu.json")
    parser.add_argument(
        "--scaling-only", action="store_true", help="re-measure only the scaling rows of an existing --out file"
    )
    parser.add_argument("--memory", nargs=4, metavar=("METHOD", "MODE", "N", "CAUSAL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory:  # child process: measure one configuration's peak memory
        method, mode, n, causal = args.memory
        run = step(method, mode, int(n), causal == "1")
        run()  # warm up (compiles flex); its memory is handed back before measuring
        print(json.dumps({"peak_extra_mb": peak_extra_memory_mb(run)}))
        return

    if args.scaling_only:
        path = RESULTS / args.out
        payload = json.loads(path.read_text())
        rows = [r for r in payload["rows"] if r["mode"] != "scaling"] + measure_scaling(args.lengths)
        rows.sort(key=row_order)
        payload.update(summarize(rows), rows=rows)
        write_json(args.out, payload)
        print(render(payload))
        return

    checks = check_backends()
    print("correctness vs reference at N=1024 (max abs error):", {k: f"{v:.1e}" for k, v in checks.items()})
    rows = []
    for causal, lengths in ((False, args.lengths), (True, args.causal_lengths)):
        for mode in ("forward", "forward_backward"):
            # every (N, method) of a pass takes turns, so that the machine's drift over minutes moves all of them alike
            # (the targets compare methods at one N and one method across N)
            calls = {}
            for n in lengths:
                for method in METHODS if mode == "forward" else TRAINING_METHODS:
                    warmup, repeats = repeats_for(n, method)
                    calls[n, method] = (step(method, mode, n, causal), max(warmup, method == "flex"), repeats)
            for (n, method), timing in time_in_turns(calls).items():
                row = dict(n=n, causal=causal, mode=mode, method=method, **timing)
                if not args.no_memory:
                    child = measure_in_fresh_process(__file__, ["--memory", method, mode, str(n), str(int(causal))])
                    row["peak_extra_mb"] = child["peak_extra_mb"]
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "runs_s"}), flush=True)
            del calls
        if not causal:
            calls = {}
            for n in lengths:
                q, k, _ = make_inputs(n, requires_grad=False)
                calls[n] = (lambda q=q, k=k: route_blocks(q, k, **ROUTING), 1, 5)
            for n, timing in time_in_turns(calls).items():
                rows.append(dict(n=n, causal=False, mode="routing", method="route_blocks", **timing))
    rows += measure_scaling(args.lengths)
    rows.sort(key=row_order)

    summary = summarize(rows)
    payload = {
        "benchmark": "attention",
        "machine": machine(),
        "config": CONFIG,
        "correctness": checks,
        **summary,
        "rows": rows,
    }
    path = write_json(args.out, payload)
    print(render(payload))
    print(f"wrote {path}")


def measure_scaling(lengths: list[int], rounds: int = 20) -> list[dict]:
    """DualRoute's default backend (forward, bidirectional) alone at every length, the lengths taking turns for
    ``rounds`` rounds: how its time grows with N, from more runs per length than the main pass has (5)
    and with no other method's runs in between."""
    calls = {n: (step("auto", "forward", n, causal=False), 1, rounds) for n in lengths}
    return [
        dict(n=n, causal=False, mode="scaling", method="auto", **timing) for n, timing in time_in_turns(calls).items()
    ]


def per_doubling(n0: int, t0: float, n1: int, t1: float) -> float:
    """How much the time grows per doubling of N from (n0, t0) to (n1, t1): a quick run may skip lengths."""
    return (t1 / t0) ** (1 / math.log2(n1 / n0))


def length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def row_order(row: dict) -> tuple:
    """Sort key of the JSON's rows; a stable sort keeps, per N, forward, forward+backward, routing, scaling."""
    return row["causal"], row["n"]


def _matching(rows, **match) -> list[dict]:
    return [row for row in rows if all(row.get(k) == v for k, v in match.items())]


def _median(rows, **match):
    found = _matching(rows, **match)
    return found[0]["median_s"] if found else None


def summarize(rows: list[dict]) -> dict:
    """Speedups over dense in the same run, scaling per doubling, and the issue's targets."""
    for row in rows:
        dense = _median(rows, n=row["n"], causal=row["causal"], mode=row["mode"], method="sdpa")
        if dense and row["mode"] != "routing":
            row["speedup_vs_sdpa"] = dense / row["median_s"]
    lengths = sorted({r["n"] for r in rows if not r["causal"]})
    targets = {}

    def fastest_forward(n):
        """DualRoute's forward at ``n``: the faster of `flex` and the CPU kernel. On CPU `auto` runs `gather`, so their
        rows are two samples of one kernel: the median of their runs pooled, not the faster of two medians (which on
        this noisy machine reads ~10% low)."""
        forward = dict(n=n, causal=False, mode="forward")
        kernel = [t for m in ("gather", "auto") for r in _matching(rows, method=m, **forward) for t in r["runs_s"]]
        times = [
            statistics.median(kernel) if kernel else None,
            _median(rows, n=n, causal=False, mode="forward", method="flex"),
        ]
        return min(t for t in times if t is not None)

    if 16384 in lengths:
        dense = _median(rows, n=16384, causal=False, mode="forward", method="sdpa")
        best = fastest_forward(16384)
        # goal: half the FLOP limit (top-k 8 of 256 key blocks reads 1/32 of the keys)
        targets["forward_speedup_16k"] = {"value": dense / best, "target": 16.0, "met": dense / best >= 16.0}
        route = _median(rows, n=16384, causal=False, mode="routing", method="route_blocks")
        share = route / best
        targets["routing_share_16k"] = {"value": share, "target": 0.10, "met": share <= 0.10}
    if 8192 in lengths:
        dense = _median(rows, n=8192, causal=False, mode="forward_backward", method="sdpa")
        gather = _median(rows, n=8192, causal=False, mode="forward_backward", method="gather")
        targets["training_speedup_8k"] = {"value": dense / gather, "target": 4.0, "met": dense / gather >= 4.0}
        memory = {
            r["method"]: r.get("peak_extra_mb")
            for r in rows
            if r["n"] == 8192 and not r["causal"] and r["mode"] == "forward_backward"
        }
        if memory.get("gather") is not None:
            targets["training_memory_8k_mb"] = {
                "value": memory["gather"],
                "sdpa": memory["sdpa"],
                "met": memory["gather"] < memory["sdpa"],
            }
    # growth per doubling: from the scaling rows (DualRoute alone, lengths in turns) when measured, else from the main
    # pass; the main pass's figures are kept next to it
    main_pass = [
        per_doubling(small, fastest_forward(small), large, fastest_forward(large))
        for small, large in zip(lengths, lengths[1:])
        if small >= 4096
    ]
    scaling = sorted((r["n"], r["median_s"]) for r in rows if r["mode"] == "scaling" and r["n"] >= 4096)
    growth = [per_doubling(*a, *b) for a, b in zip(scaling, scaling[1:])] if len(scaling) > 1 else main_pass
    if growth:
        targets["forward_growth_per_doubling_4k_32k"] = {
            "value": max(growth),
            "all": growth,
            "measured_in": "scaling rows (auto alone, lengths taking turns)" if len(scaling) > 1 else "main pass",
            "main_pass": main_pass,
            "target": 2.3,
            "met": max(growth) <= 2.3,
        }
    return {"targets": targets}


def render(payload: dict) -> str:
    """The README tables."""
    rows = payload["rows"]
    out = []
    for causal in (False, True):
        table = []
        for n in sorted({r["n"] for r in rows if r["causal"] == causal and r["mode"] != "routing"}):
            for mode in ("forward", "forward_backward"):
                cells = [length_label(n), mode.replace("_", "+")]
                for method in METHODS:
                    row = next(
                        (
                            r
                            for r in rows
                            if r["n"] == n and r["causal"] == causal and r["mode"] == mode and r["method"] == method
                        ),
                        None,
                    )
                    if row is None:
                        cells.append("–")
                        continue
                    cell = f"{row['median_s'] * 1000:.0f} ms"
                    if method != "sdpa":
                        cell += f" ({row['speedup_vs_sdpa']:.1f}×)"
                    if row.get("peak_extra_mb") is not None:
                        cell += f", {row['peak_extra_mb']:.0f} MB"
                    cells.append(cell)
                table.append(cells)
        if table:
            out.append(("Causal" if causal else "Bidirectional") + " attention, " + describe(payload["config"]))
            out.append(markdown_table(["N", "pass"] + [f"{m}" for m in METHODS], table))
    scaling = sorted(_matching(rows, mode="scaling"), key=lambda r: r["n"])
    if scaling:
        out.append(
            f"Scaling, `auto` alone, forward, the lengths taking turns ({len(scaling[0]['runs_s'])} rounds): "
            + ", ".join(f"{length_label(r['n'])} {r['median_s'] * 1000:.0f} ms" for r in scaling)
            + "."
        )
    targets = payload.get("targets", {})
    if targets:
        out.append(markdown_table(["target", "measured", "goal", "met"], [
            [name, _fmt(t["value"]), t.get("target", f"< sdpa ({_fmt(t.get('sdpa'))} MB)"), "yes" if t["met"] else "**no**"]
            for name, t in targets.items()
        ]))  # fmt: skip
    return "\n\n".join(out)


def describe(config: dict) -> str:
    return (
        f"batch {config['batch']}, {config['heads']} heads, head_dim {config['head_dim']}, block {config['block_size']}, "
        f"top-k {config['top_k']}, {config['dtype']}; median time (speedup over dense SDPA), peak extra memory:"
    )


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
