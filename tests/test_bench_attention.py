"""benchmarks/bench_attention.py: a step runs; summarize() on synthetic rows (pooled kernel runs, targets); render()."""

import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_attention")


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_step_runs(bench, mode):
    bench.step("gather", mode, 256, causal=False)()


def synthetic_rows():
    rows = []
    for n, kernel_runs in (
        (4096, ([1.0, 1.0, 9.0], [0.5, 1.0, 1.0])),
        (8192, ([2.0], [2.0])),
        (16384, ([5.0], [5.0])),
    ):
        dense = (n / 4096) ** 2 * 40.0
        rows.append(dict(n=n, causal=False, mode="forward", method="sdpa", median_s=dense, runs_s=[dense]))
        for method, runs in zip(("gather", "auto"), kernel_runs):
            rows.append(
                dict(
                    n=n,
                    causal=False,
                    mode="forward",
                    method=method,
                    median_s=sorted(runs)[len(runs) // 2],
                    runs_s=runs,
                )
            )
        rows.append(dict(n=n, causal=False, mode="forward", method="flex", median_s=99.0, runs_s=[99.0]))
        for method, seconds in (("sdpa", dense * 4), ("gather", 4.0), ("auto", 4.0)):
            rows.append(
                dict(n=n, causal=False, mode="forward_backward", method=method, median_s=seconds, runs_s=[seconds])
            )
        rows.append(dict(n=n, causal=False, mode="routing", method="route_blocks", median_s=0.25, runs_s=[0.25]))
    return rows


def test_summarize_pools_the_runs_of_the_one_cpu_kernel(bench):
    rows = synthetic_rows()
    targets = bench.summarize(rows)["targets"]
    # 4k: gather and auto both ran the gather kernel; pooled runs [1, 1, 9, 0.5, 1, 1] -> median 1.0, not min(1.0, 1.0)
    growth = targets["forward_growth_per_doubling_4k_32k"]
    assert growth["all"] == pytest.approx([2.0, 2.5]) and growth["value"] == pytest.approx(2.5) and not growth["met"]
    assert (
        targets["forward_speedup_16k"]["value"] == pytest.approx(640.0 / 5.0) and targets["forward_speedup_16k"]["met"]
    )
    assert targets["routing_share_16k"]["value"] == pytest.approx(0.05)
    assert targets["training_speedup_8k"]["value"] == pytest.approx(160.0 * 4 / 4.0)
    text = bench.render({"config": bench.CONFIG, "rows": rows, **bench.summarize(rows)})
    assert "forward_growth_per_doubling_4k_32k" in text and "**no**" in text


def test_growth_comes_from_the_scaling_rows_when_measured(bench):
    rows = synthetic_rows() + [
        dict(n=n, causal=False, mode="scaling", method="auto", median_s=t, runs_s=[t] * 8)
        for n, t in ((4096, 1.0), (8192, 2.1), (16384, 4.4))
    ]
    growth = bench.summarize(rows)["targets"]["forward_growth_per_doubling_4k_32k"]
    assert growth["all"] == pytest.approx([2.1, 4.4 / 2.1]) and growth["met"]
    assert growth["main_pass"] == pytest.approx([2.0, 2.5]) and growth["measured_in"].startswith("scaling")
    text = bench.render({"config": bench.CONFIG, "rows": rows, **bench.summarize(rows)})
    assert "Scaling, `auto` alone, forward, the lengths taking turns (8 rounds): 4k 1000 ms, 8k 2100 ms" in text


def test_growth_per_doubling_when_a_run_skips_lengths(bench):
    """A quick run over 1k, 4k and 16k: 4x the time over two doublings is 2x per doubling, not 4x."""
    rows = synthetic_rows() + [
        dict(n=n, causal=False, mode="scaling", method="auto", median_s=t, runs_s=[t] * 4)
        for n, t in ((256, 0.001), (1024, 0.01), (4096, 1.0), (16384, 4.0))
    ]
    growth = bench.summarize(rows)["targets"]["forward_growth_per_doubling_4k_32k"]
    assert growth["all"] == pytest.approx([2.0]) and growth["met"]
    assert bench.per_doubling(4096, 1.0, 8192, 2.2) == pytest.approx(2.2)
    text = bench.render({"config": bench.CONFIG, "rows": rows, **bench.summarize(rows)})
    assert "256 1 ms, 1k 10 ms, 4k 1000 ms, 16k 4000 ms" in text
