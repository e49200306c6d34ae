"""benchmarks/bench_generate.py: a tiny end-to-end run (every setting, both implementations) and the step clock."""

import json
import statistics

import pytest
import torch

from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_generate")


def test_step_clock_times_every_step_and_changes_nothing(bench):
    model = bench.build_model(layers=1)
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=torch.randint(1000, 30000, (1, 300)))
    intervals = bench.step_intervals(model, encoder_outputs, new_tokens=5, num_beams=2)
    assert len(intervals) == 4 and all(t > 0 for t in intervals)
    assert encoder_outputs.last_hidden_state.shape[0] == 1  # generate expands per beam; not the caller's object
    bench.step_intervals(model, encoder_outputs, new_tokens=2, num_beams=2)
    assert encoder_outputs.last_hidden_state.shape[0] == 1


def test_tiny_run_writes_json_with_targets_and_renders(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "check_cached_decoding", lambda model: None)  # covered by tests/test_seq2seq.py
    monkeypatch.setattr(bench, "TARGET_LENGTH", 512)
    out = tmp_path / "generate.json"
    bench.main(["--lengths", "256", "512", "--layers", "1", "--new-tokens", "4", "--repeats", "2", "--out", str(out)])
    payload = json.loads(out.read_text())
    settings = {(r["setting"], r["n"], r["implementation"]) for r in payload["rows"]}
    assert settings == {
        (s, n, i) for s in ("greedy", "beam4", "batch8") for n in (256, 512) for i in ("dualroute", "sdpa")
    }
    assert all(len(r["intervals_s"]) == 2 * 3 for r in payload["rows"])
    for row in payload["rows"]:  # a batch-8 step generates 8 tokens
        assert row["batch"] == (8 if row["setting"] == "batch8" else 1)
        assert row["per_token_s"] == pytest.approx(statistics.median(row["intervals_s"]) / row["batch"])
    assert set(payload["targets"]) == {f"per_token_speedup_16k_{s}" for s in ("greedy", "beam4", "batch8")}
    table = bench.render(payload)
    assert "| encoder tokens | greedy, batch 1: DualRoute | dense (sdpa) | speedup |" in table
    assert "| greedy, batch 8: DualRoute | dense (sdpa) | speedup |" in table
    assert table.count("\n| 256 |") == 1 and "Target per_token_speedup_16k_batch8" in table


def test_batch_rows_are_different_inputs(bench):
    model = bench.build_model(layers=1)
    states = bench.encode(model, 128, 3)
    assert states.shape == (3, 128, model.config.hidden_size)
    assert not torch.equal(states[0], states[1]) and not torch.equal(states[1], states[2])
    torch.testing.assert_close(states[:1], bench.encode(model, 128, 1))  # row 0 is the batch-1 input
