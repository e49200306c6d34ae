"""The notebooks in notebooks/ run top to bottom, offline, and show what they promise.

CI executes them with ``DUALROUTE_NOTEBOOK_FAST=1`` (their small settings) through nbclient. The kernel is this very
interpreter: the ipykernel wheel ships a "python3" kernelspec in the virtual environment, but a user-level or
``JUPYTER_PATH`` kernelspec of the same name could point at another Python, so the tests write their own.
"""

import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient


NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["routing_visualised.ipynb", "convert_finetune_evaluate.ipynb"]


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    """A Jupyter data folder whose "python3" kernel runs ``sys.executable`` (the environment under test)."""
    folder = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(folder / "kernels" / "python3")
    return folder


def execute(name, tmp_path, jupyter_path, monkeypatch):
    """Runs a notebook in FAST mode in a fresh kernel (working directory ``tmp_path``); returns its text and images."""
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))  # read by the kernel manager nbclient creates
    env = dict(os.environ, DUALROUTE_NOTEBOOK_FAST="1", DUALROUTE_NOTEBOOK_OUT=str(tmp_path))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("MPLBACKEND", None)  # e.g. Agg in CI would keep figures out of the outputs; ipykernel picks inline
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute(env=env)
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    return text, images


def test_notebooks_are_saved_clean_and_parametrised():
    """Stored without outputs (the repository stays small) and with the FAST switch CI relies on."""
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    for name in NAMES:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.outputs == [] and cell.execution_count is None for cell in code), name
        assert 'os.environ.get("DUALROUTE_NOTEBOOK_FAST", "0") == "1"' in code[0].source, name
        assert notebook.metadata.kernelspec.name == "python3"


def test_kernelspec_runs_this_interpreter(jupyter_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.resource_dir).is_relative_to(jupyter_path)
    assert spec.argv[0] == sys.executable and spec.argv[1:3] == ["-m", "ipykernel_launcher"]


@pytest.mark.slow
def test_routing_visualised(tmp_path, jupyter_path, monkeypatch):
    text, images = execute("routing_visualised.ipynb", tmp_path, jupyter_path, monkeypatch)
    assert "copied: 101 tensors" in text and "new (initialised): 0 tensors" in text
    assert "256 tokens = 8 blocks of 32" in text  # FAST: a 256-token article
    assert len(images) == 2  # the layer x head grid, and routed vs dense for one layer
    assert "grid: 6 layers x 12 heads" in text  # every layer and head of MiniLM
    found = re.search(r"routing recall \(mean over layers\): ([\d.]+) with 4 of 8 blocks \(uniform share 0.500", text)
    assert found, text
    assert 0.5 < float(found.group(1)) <= 1.0  # routing keeps more than the share of blocks it reads


@pytest.mark.slow
def test_convert_finetune_evaluate(tmp_path, jupyter_path, monkeypatch):
    text, _ = execute("convert_finetune_evaluate.ipynb", tmp_path, jupyter_path, monkeypatch)
    assert "-> DualRouteForSequenceClassification" in text
    found = re.search(r"held-out accuracy ([\d.]+), f1 ([\d.]+) on 64 snippets", text)
    assert found, text
    assert all(0.0 <= float(value) <= 1.0 for value in found.groups())
    assert "identical logits after reload: True" in text
    folder = tmp_path / "rotten-tomatoes-dualroute"
    for file in ("config.json", "model.safetensors", "modeling_dualroute.py", "tokenizer.json"):
        assert (folder / file).exists(), file
    predictions = re.findall(r"^\s*(fresh|rotten) \(\d\.\d\d\)  ", text, flags=re.MULTILINE)
    assert len(predictions) == 5, text  # the pipeline classified every text
