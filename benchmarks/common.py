"""Shared helpers for the benchmarks: timing medians (alone or taking turns), peak memory in a fresh process,
machine facts, JSON output.

Figures on a shared 2-core machine are noisy, so every benchmark reports medians and ratios against a baseline
measured in the same run, and keeps the raw runs in its JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # pragma: no cover - reporting only
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    return platform.processor()


def time_call(fn, *, repeats: int, warmup: int = 1) -> dict:
    """Runs ``fn`` ``warmup`` times untimed, then ``repeats`` times; returns the median and every run in seconds."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return {"median_s": statistics.median(runs), "runs_s": runs}


def time_in_turns(calls: dict) -> dict:
    """Times several callables taking turns: ``calls`` maps a key to ``(fn, warmup, repeats)``; each round runs every
    callable once (those with repeats left), so a machine whose speed drifts over minutes moves them all alike.
    Returns, per key, the median and every run in seconds."""
    for fn, warmup, _ in calls.values():
        for _ in range(warmup):
            fn()
    runs = {key: [] for key in calls}
    for round_index in range(max((repeats for _, _, repeats in calls.values()), default=0)):
        for key, (fn, _, repeats) in calls.items():
            if round_index < repeats:
                gc.collect()
                start = time.perf_counter()
                fn()
                runs[key].append(time.perf_counter() - start)
    return {key: {"median_s": statistics.median(times), "runs_s": times} for key, times in runs.items() if times}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_memory_mb(fn) -> float:
    """Peak resident memory ``fn`` adds on top of what the process holds before it (Linux).

    Freed memory is handed back to the OS first and the high-water mark is reset, so a call that reuses memory an
    earlier call freed is still counted. Run it in a fresh process (`measure_in_fresh_process`) for clean figures.
    """
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_mb("VmRSS")
    fn()
    return max(0.0, _status_mb("VmHWM") - before)


def peak_allocated_mb(fn) -> float:
    """Peak of the memory torch's CPU allocator hands out during ``fn`` on top of what is allocated before it.

    Counts tensors only: not what the C allocator keeps of freed memory, thread stacks or library scratch, which
    `peak_extra_memory_mb` (resident memory) includes. So it is free of the C allocator's ±50 MB retention noise and
    is what ``torch.cuda.max_memory_allocated`` reports on a GPU. Read off torch.profiler's allocation events.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            changes.append((node.start_time_ns, node.extra_fields.alloc_size))
    level = peak = 0
    for _, size in sorted(changes):
        level += size
        peak = max(peak, level)
    return peak / 2**20


def measure_in_fresh_process(script: str, args: list[str], timeout: float = 3600) -> dict:
    """Runs ``python script *args`` and parses the JSON object it prints last (used to measure peak memory alone)."""
    result = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )
    if result.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def call_with_threads(fn, spec: dict) -> dict:
    """``fn(spec)`` with torch's threads set to ``spec["threads"]`` (if set), restored afterwards."""
    threads = torch.get_num_threads()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        return fn(spec)
    finally:
        torch.set_num_threads(threads)


def training_arguments(spec: dict, *, weight_decay: float, warmup_steps: float) -> dict:
    """The `TrainingArguments` fields every benchmark run shares: ``spec``'s batch size, learning rate, epochs and
    seed; linear schedule; no evaluation, checkpoints, reporting or progress bars during the timed training."""
    return dict(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        per_device_eval_batch_size=2 * spec["batch_size"],
        learning_rate=spec["learning_rate"],
        num_train_epochs=spec["epochs"],
        max_steps=spec.get("max_steps") or -1,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        lr_scheduler_type="linear",
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10,
        report_to=[],
        seed=spec["seed"],
        data_seed=spec["seed"],
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,
    )


def add_run_arguments(parser, *, quick_help: str = "toy sizes: checks the pipeline in minutes") -> None:
    """The command-line options of a benchmark that trains in worker processes (`run_training`)."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--max-steps", type=int, default=0, help="stop every run after this many steps (0: epochs)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--in-process", action="store_true", help="train in this process (no clean memory figures)")
    parser.add_argument("--out", default=None, help="file name under results/ (or a path); default by mode")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def train_with_peak_memory(trainer) -> tuple:
    """``trainer.train()`` timed, with the peak resident memory it adds: ``(train_output, seconds, peak_mb)``."""
    result = {}

    def train():
        start = time.perf_counter()
        result["train_output"] = trainer.train()
        result["seconds"] = time.perf_counter() - start

    peak_mb = peak_extra_memory_mb(train)
    return result["train_output"], result["seconds"], peak_mb


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of a few per-seed figures."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_training(script: str, fn, spec: dict, *, in_process: bool, timeout: float) -> dict:
    """One training run ``fn(spec)``: in this process, or (for clean memory figures) in a fresh ``script --worker
    SPEC`` whose result is the last line of its stdout."""
    if in_process:
        return call_with_threads(fn, spec)
    return measure_in_fresh_process(script, ["--worker", json.dumps(spec)], timeout=timeout)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
