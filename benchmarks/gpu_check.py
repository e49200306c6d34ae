"""GPU readiness check for the `flex` backend: correctness against `reference`, then timing against dense attention.

    bash benchmarks/gpu_check.sh            # on a machine with one CUDA GPU; about 3-5 minutes

1. Correctness: `flex` against `reference` (forward and the gradients of q, k, v) for bidirectional, causal and
   cross-attention, with padding and GQA, in float32 and bfloat16, at 2048 tokens (reference is O(N^2)).
2. Timing: `flex` (block 64, top-8, one global block) against dense SDPA (FlashAttention where torch dispatches to
   it) at 8k-64k tokens, bfloat16, batch 1, 16 heads, head_dim 64; forward and forward+backward; CUDA events,
   median of several runs; speedups are ratios in the same run.

Writes results/gpu_check.json and prints a table. Exits non-zero on a correctness failure; prints a notice and exits
0 where no CUDA GPU is present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from modeling_dualroute import routed_attention

from common import machine, markdown_table, write_json


ROUTING = dict(block_size=64, top_k=8, global_blocks=1)


def correctness(device) -> list[dict]:
    results = []
    generator = torch.Generator(device=device).manual_seed(0)
    for dtype, tolerance in ((torch.float32, 2e-3), (torch.bfloat16, 5e-2)):
        for kind in ("bidirectional", "causal", "cross"):
            batch, q_heads, kv_heads, dim = 2, 8, 4, 64
            k_len = 2048
            q_len = 512 if kind == "cross" else k_len
            q = torch.randn(batch, q_heads, q_len, dim, device=device, dtype=dtype, generator=generator)
            k = torch.randn(batch, kv_heads, k_len, dim, device=device, dtype=dtype, generator=generator)
            v = torch.randn(batch, kv_heads, k_len, dim, device=device, dtype=dtype, generator=generator)
            mask = torch.ones(batch, k_len, dtype=torch.bool, device=device)
            mask[1, 1500:] = False
            options = dict(
                ROUTING, causal=kind == "causal", cross=kind == "cross", key_padding_mask=mask,
                query_padding_mask=mask if kind == "bidirectional" else None,
            )  # fmt: skip
            grad = torch.randn(batch, q_heads, q_len, dim, device=device, dtype=dtype, generator=generator)
            outputs = {}
            for backend in ("reference", "flex"):
                leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
                out = routed_attention(*leaves, backend=backend, **options)
                out.backward(grad)
                outputs[backend] = [out.float(), *(t.grad.float() for t in leaves)]
            errors = [(a - b).abs().max().item() for a, b in zip(outputs["flex"], outputs["reference"])]
            scale = max(t.abs().max().item() for t in outputs["reference"])
            ok = max(errors) <= tolerance * max(1.0, scale)
            results.append(dict(dtype=str(dtype), kind=kind, max_errors=errors, ok=ok))
            print(json.dumps(results[-1]), flush=True)
    return results


def cuda_time(fn, repeats: int) -> float:
    fn()  # warm-up (compiles flex for this shape)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def timing(device, lengths: list[int], repeats: int) -> list[dict]:
    rows = []
    for n in lengths:
        q, k, v = (
            torch.randn(1, 16, n, 64, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
        )
        grad = torch.randn_like(q)

        def dense_forward(q=q, k=k, v=v):
            with torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(q, k, v)

        def dense_training(q=q, k=k, v=v, grad=grad):
            torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(grad)

        def flex_forward(q=q, k=k, v=v):
            with torch.no_grad():
                routed_attention(q, k, v, backend="flex", **ROUTING)

        def flex_training(q=q, k=k, v=v, grad=grad):
            routed_attention(q, k, v, backend="flex", **ROUTING).backward(grad)

        row = {"n": n}
        for name, fn in (
            ("sdpa_forward", dense_forward),
            ("flex_forward", flex_forward),
            ("sdpa_training", dense_training),
            ("flex_training", flex_training),
        ):
            row[name] = cuda_time(fn, repeats)
        row["forward_speedup"] = row["sdpa_forward"] / row["flex_forward"]
        row["training_speedup"] = row["sdpa_training"] / row["flex_training"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing to check (the CPU test suite covers the other backends).")
        return 0
    device = torch.device("cuda")
    checks = correctness(device)
    rows = timing(device, args.lengths, args.repeats)
    payload = {"benchmark": "gpu_check", "machine": machine(), "routing": ROUTING, "correctness": checks, "rows": rows}
    path = write_json(args.out, payload)
    print(markdown_table(
        ["N", "SDPA fwd", "flex fwd", "speedup", "SDPA fwd+bwd", "flex fwd+bwd", "speedup"],
        [[r["n"], f"{r['sdpa_forward'] * 1e3:.1f} ms", f"{r['flex_forward'] * 1e3:.1f} ms", f"{r['forward_speedup']:.1f}×",
          f"{r['sdpa_training'] * 1e3:.1f} ms", f"{r['flex_training'] * 1e3:.1f} ms", f"{r['training_speedup']:.1f}×"] for r in rows],
    ))  # fmt: skip
    print(f"wrote {path}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
