"""benchmarks/bench_models.py: every model builds and runs tiny; summarize() and render() on a synthetic payload."""

import pytest
import torch

from helpers import load_benchmark


TINY = dict(hidden=64, heads=2, intermediate=128, vocab=1000)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_models")


@pytest.mark.parametrize("name", ["dualroute", "bert", "longformer", "bigbird", "modernbert"])
def test_builders_run_a_forward_at_a_tiny_size(bench, name):
    model = bench.build_model(name, 512, 1, **TINY).eval()
    ids = bench.make_input_ids(512, TINY["vocab"])
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    assert out.shape == (1, 512, TINY["hidden"])
    assert torch.isfinite(out).all()
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == TINY["hidden"]
    if name == "bigbird":
        assert bench.attention_in_use(name, model) == "original_full"  # 512 <= 704: BigBird switched itself


def test_model_settings(bench):
    assert bench.build_model("bert", 512, 1, **TINY).config._attn_implementation == "sdpa"
    assert bench.build_model("modernbert", 512, 1, **TINY).config.layer_types == ["sliding_attention"]
    assert bench.modernbert_layer_types(6).count("full_attention") == 2
    assert bench.build_model("longformer", 600, 1, **TINY).config.attention_window == [512]
    dualroute = bench.build_model("dualroute", 512, 1, **TINY)
    assert dualroute.config._attn_implementation == "dualroute"
    assert dualroute.config.position_embedding_type == "rope"


def test_step_forward_backward_runs(bench):
    run, model = bench.step("dualroute", "forward_backward", 256, 1, **TINY)
    run()
    assert all(p.grad is None for p in model.parameters())  # zeroed after each step


def test_guards(bench):
    assert bench.predict_seconds([], 4096) is None
    assert bench.predict_seconds([(1024, 1.0)], 2048) == pytest.approx(4.0)  # quadratic with one point
    assert bench.predict_seconds([(1024, 1.0), (2048, 2.0)], 4096) == pytest.approx(4.0)  # measured: linear
    assert bench.estimate_memory_gb("longformer", "forward_backward", 32768, 6) > 20
    assert bench.estimate_memory_gb("dualroute", "forward", 1024, 1) < 1


def synthetic_rows():
    times = {"dualroute": 1.0, "bert": 8.0, "longformer": 4.0, "bigbird": 3.5, "modernbert": 9.0}
    rows = []
    for layers in (1, 6):
        for n in (4096, 8192, 16384, 32768):
            for mode in ("forward", "forward_backward"):
                for name, base in times.items():
                    growth = (n / 4096) ** (1.0 if name != "bert" else 2.0)
                    row = dict(model=name, layers=layers, n=n, mode=mode)
                    if name == "longformer" and n == 32768 and layers == 6:
                        row["skipped"] = "estimated peak memory 40.0 GB > --max-memory-gb 20"
                    else:
                        seconds = base * growth * layers * (3 if mode == "forward_backward" else 1) / 10
                        memory = dict(peak_extra_mb=100.0 * growth * base, peak_allocated_mb=50.0 * growth * base)
                        row.update(median_s=seconds, runs_s=[seconds], **memory)
                    rows.append(row)
    return rows


def test_summarize_and_render(bench):
    rows = synthetic_rows()
    summary = bench.summarize(rows)
    targets = summary["targets"]
    first = targets["forward_1layer_16k_vs_fastest_peer"]
    assert first["fastest_peer"] == "bigbird" and first["value"] == pytest.approx(3.5) and first["met"]
    training = targets["training_8k_vs_bert"]
    assert training["layers"] == 6
    assert training["value"] == pytest.approx(8 * 2 / 1)  # bert grows quadratically from 4k
    assert training["memory_ratio"] == pytest.approx(1 / 16) and training["met"]
    assert training["allocated_memory_ratio"] == pytest.approx(1 / 16)
    growth = targets["forward_growth_per_doubling_1layer"]
    assert growth["value"] == pytest.approx(2.0) and growth["met"] and growth["lengths"] == [4096, 8192, 16384, 32768]
    assert next(r for r in rows if r["model"] == "bert" and r["n"] == 4096)["dualroute_speedup"] == pytest.approx(8)

    payload = {
        "config": {"hidden": 512, "heads": 8, "intermediate": 2048, "dtype": "float32"},
        "rows": rows,
        **summary,
    }
    text = bench.render(payload)
    assert "| N | DualRoute | BERT (SDPA) |" in text
    assert "(8.0×)" in text and "skipped" in text and "estimated peak memory" in text
    assert "training_8k_vs_bert (6 layers)" in text
    assert "peak extra memory (resident / torch tensors)" in text and ", 100 MB / 50 MB" in text
    assert "memory 0.06× (tensors 0.06×)" in text


def test_peak_allocated_counts_tensors_alive_together():
    """8 MB, then 4 MB more while it lives, then 2 MB after both are freed: the peak is 12 MB, whatever the resident
    memory does; tensors allocated before the call do not count."""
    common = load_benchmark("common")
    before = torch.ones(1 << 20)

    def run():
        a = torch.ones(2 << 20)  # 8 MB
        b = torch.ones(1 << 20)  # 4 MB
        del a, b
        c = torch.ones(512 << 10)  # 2 MB
        return float(c.sum() + before.sum())

    assert common.peak_allocated_mb(run) == pytest.approx(12, abs=0.1)


def test_summarize_without_the_target_lengths(bench):
    rows = [dict(model=name, layers=1, n=1024, mode="forward", median_s=1.0, runs_s=[1.0]) for name in bench.MODELS]
    targets = bench.summarize(rows)["targets"]
    assert targets["forward_1layer_16k_vs_fastest_peer"]["met"] is None
    assert targets["training_8k_vs_bert"]["met"] is None
    assert "| target |" in bench.render(
        {
            "config": {"hidden": 64, "heads": 2, "intermediate": 128, "dtype": "float32"},
            "rows": rows,
            **bench.summarize(rows),
        }
    )


def test_main_times_every_length_and_model_taking_turns(bench, tmp_path, monkeypatch):
    order = []
    step = bench.step

    def recording_step(name, mode, n, layers, **sizes):
        run, model = step(name, mode, n, layers, **sizes)

        def recorded():
            order.append((name, n))
            run()

        return recorded, model

    monkeypatch.setattr(bench, "step", recording_step)
    out = tmp_path / "models.json"
    sizes = ["--hidden", "64", "--heads", "2", "--intermediate", "128"]
    bench.main(["--lengths", "256", "512", "--layers", "1", "--modes", "forward", "--repeats", "2", "--no-memory",
                "--models", "dualroute", "bert", "--out", str(out), *sizes])  # fmt: skip
    payload = __import__("json").loads(out.read_text())
    timed = [r for r in payload["rows"] if "median_s" in r]
    assert {(r["model"], r["n"]) for r in timed} == {(m, n) for m in ("dualroute", "bert") for n in (256, 512)}
    assert all(len(r["runs_s"]) == 2 for r in timed)
    # one warm-up each while preparing, then two rounds in which every (model, N) runs once
    points = [("dualroute", 256), ("bert", 256), ("dualroute", 512), ("bert", 512)]
    assert order == points + points + points
