"""Keep the README's result tables in sync with the committed benchmark results.

    python benchmarks/update_readme.py          # rewrites the README blocks from benchmarks/results/*.json
    python benchmarks/update_readme.py --check  # exits 1 if a block differs from what its JSON renders

Each table lives between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in README.md and is produced by the
``render(payload)`` function of the benchmark that wrote ``results/NAME.json``. A test runs ``--check``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
# results/NAME.json -> the script whose render() draws its table
SOURCES = {
    "attention_cpu": "bench_attention.py",
    "models_cpu": "bench_models.py",
    "models_cpu_6layers": "bench_models.py",
    "generate_cpu": "bench_generate.py",
    "fidelity_minilm": "bench_fidelity.py",
    "retrieval": "bench_retrieval.py",
    "finetune": "bench_finetune.py",
    "headlines": "bench_headlines.py",
}


def _render(name: str) -> str:
    sys.path.insert(0, str(HERE))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / SOURCES[name])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.render(json.loads((HERE / "results" / f"{name}.json").read_text())).strip()
    finally:
        sys.path.remove(str(HERE))


def blocks(text: str) -> dict[str, str]:
    """The results blocks in ``text``: NAME -> current content."""
    pattern = re.compile(r"<!-- results:(\w+) -->\n(.*?)<!-- /results:\1 -->", re.S)
    return {match.group(1): match.group(2).strip() for match in pattern.finditer(text)}


def expected_blocks(text: str) -> dict[str, str]:
    found = blocks(text)
    unknown = sorted(set(found) - set(SOURCES))
    if unknown:
        raise ValueError(f"README has results blocks with no known source: {unknown}")
    missing = [name for name in found if not (HERE / "results" / f"{name}.json").exists()]
    if missing:
        raise FileNotFoundError(f"README shows results whose JSON is not committed: {missing}")
    return {name: _render(name) for name in found}


def update(text: str) -> str:
    for name, body in expected_blocks(text).items():
        text = re.sub(
            rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)",
            lambda m, body=body: m.group(1) + body + "\n" + m.group(2),
            text,
            flags=re.S,
        )
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = update(text)
    if args.check:
        stale = [name for name, body in expected_blocks(text).items() if blocks(text)[name] != body]
        if stale:
            print(f"README results out of date: {stale}; run python benchmarks/update_readme.py")
            return 1
        print(f"README results in sync ({len(blocks(text))} blocks)")
        return 0
    README.write_text(new)
    print(f"updated {len(blocks(new))} results blocks in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
