"""benchmarks/bench_generate.py: a tiny end-to-end run (both settings, both implementations) and the step clock."""

import json

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
    assert settings == {(s, n, i) for s in ("greedy", "beam4") for n in (256, 512) for i in ("dualroute", "sdpa")}
    assert all(len(r["intervals_s"]) == 2 * 3 for r in payload["rows"])
    assert set(payload["targets"]) == {"per_token_speedup_16k_greedy", "per_token_speedup_16k_beam4"}
    table = bench.render(payload)
    assert "| encoder tokens | greedy, batch 1: DualRoute | dense (sdpa) | speedup |" in table
    assert table.count("\n| 256 |") == 1 and "Target per_token_speedup_16k_beam4" in table
