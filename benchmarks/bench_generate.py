"""Time per generated token against encoder length: DualRoute vs the same weights with dense attention.

    python benchmarks/bench_generate.py                       # encoder 1k ... 32k, writes results/generate_cpu.json
    python benchmarks/bench_generate.py --lengths 1024 4096   # a quick look

The model is the `small-seq2seq` shape (6 + 6 layers, hidden 512, 8 heads, FFN 2048, RoPE, block 64, top-8, one global
block) with random weights, batch 1, greedy decoding, float32. The dense twin is the very same model with
``attn_implementation="sdpa"``. Time per token = (time to generate 1 + T tokens - time to generate 1 token) / T, so
the encoder pass and the first step cancel out. Before timing, the cached DualRoute decoding is checked against
uncached decoding (same tokens) at a small size. The encoder runs once per length and implementation, outside the
timed calls (``generate(encoder_outputs=...)``): at 32k a dense encoder pass takes minutes and is not what is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from modeling_dualroute import DualRouteConfig, DualRouteForConditionalGeneration

from common import machine, markdown_table, time_call, write_json


PRESET = Path(__file__).resolve().parents[1] / "configuration" / "small-seq2seq.json"


def build_model(layers: int | None = None) -> DualRouteForConditionalGeneration:
    config = DualRouteConfig.from_json_file(PRESET)
    if layers is not None:
        config = DualRouteConfig.from_dict({**config.to_dict(), "num_hidden_layers": layers, "decoder_layers": layers,
                                            "layer_types": None, "decoder_layer_types": None})  # fmt: skip
    torch.manual_seed(0)
    return DualRouteForConditionalGeneration(config).eval()


def generate_call(model, encoder_outputs, new_tokens: int):
    def run():
        with torch.no_grad():
            model.generate(
                encoder_outputs=encoder_outputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )

    return run


def check_cached_decoding(model) -> None:
    input_ids = torch.randint(1000, 30000, (1, 2048), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = model.generate(input_ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        uncached = model.generate(input_ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=False)
    if not torch.equal(cached, uncached):
        raise AssertionError("cached decoding differs from uncached decoding")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="override encoder and decoder depth")
    parser.add_argument("--out", default="generate_cpu.json")
    args = parser.parse_args(argv)

    model = build_model(args.layers)
    check_cached_decoding(model)
    rows = []
    for n in args.lengths:
        input_ids = torch.randint(1000, 30000, (1, n), generator=torch.Generator().manual_seed(n))
        for implementation in ("dualroute", "sdpa"):
            model.set_attn_implementation(implementation)
            with torch.no_grad():
                encoder_outputs = model.get_encoder()(input_ids=input_ids)
            one = time_call(generate_call(model, encoder_outputs, 1), repeats=args.repeats)
            many = time_call(generate_call(model, encoder_outputs, 1 + args.new_tokens), repeats=args.repeats)
            per_token = (many["median_s"] - one["median_s"]) / args.new_tokens
            row = dict(
                n=n, implementation=implementation, per_token_s=per_token, first_token=one, with_new_tokens=many
            )
            rows.append(row)
            print(json.dumps({"n": n, "implementation": implementation, "per_token_ms": per_token * 1000}), flush=True)
        model.set_attn_implementation("dualroute")
    payload = {
        "benchmark": "generate",
        "machine": machine(),
        "config": {
            "preset": PRESET.name,
            "layers": args.layers,
            "new_tokens": args.new_tokens,
            "batch": 1,
            "greedy": True,
        },
        **summarize(rows),
        "rows": rows,
    }
    path = write_json(args.out, payload)
    print(render(payload))
    print(f"wrote {path}")


def summarize(rows: list[dict]) -> dict:
    per_token = {(r["n"], r["implementation"]): r["per_token_s"] for r in rows}
    speedups = {
        n: per_token[(n, "sdpa")] / per_token[(n, "dualroute")]
        for n, impl in per_token
        if impl == "dualroute" and (n, "sdpa") in per_token
    }
    targets = {}
    if 16384 in speedups:
        targets["per_token_speedup_16k"] = {"value": speedups[16384], "target": 5.0, "met": speedups[16384] >= 5.0}
    return {"speedups": {str(n): s for n, s in speedups.items()}, "targets": targets}


def render(payload: dict) -> str:
    per_token = {(r["n"], r["implementation"]): r["per_token_s"] for r in payload["rows"]}
    lengths = sorted({n for n, _ in per_token})
    table = [
        [f"{n // 1024}k", f"{per_token[(n, 'dualroute')] * 1000:.1f} ms", f"{per_token[(n, 'sdpa')] * 1000:.1f} ms",
         f"{per_token[(n, 'sdpa')] / per_token[(n, 'dualroute')]:.1f}×"]
        for n in lengths
    ]  # fmt: skip
    out = [
        "Time per generated token (greedy, batch 1, `small-seq2seq`: 6+6 layers, hidden 512, 8 heads, block 64, top-8):",
        markdown_table(["encoder tokens", "DualRoute", "dense (sdpa)", "speedup"], table),
    ]
    for name, target in payload.get("targets", {}).items():
        out.append(
            f"Target {name}: {target['value']:.1f}× (goal ≥ {target['target']}×) — {'met' if target['met'] else '**not met**'}"
        )
    return "\n\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
