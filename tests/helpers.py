"""Tiny configs, a local tokenizer and a subprocess runner shared by the model tests (no Hub access)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from modeling_dualroute import DualRouteConfig


REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a an of to and in is was it that for on with as by at from this be are or his her they we you not but "
    "good bad great awful film movie plot story actor scene music love hate boring fun long short code secret "
    "city river mountain king queen red blue green one two three four five six seven eight nine zero what is"
).split()


def load_benchmark(name: str):
    """Imports ``benchmarks/<name>.py`` as a module. benchmarks/ is not a package and its scripts import their
    siblings (``common``, other benchmarks), so the folder goes on ``sys.path``."""
    import importlib.util

    benchmarks = REPO / "benchmarks"
    if str(benchmarks) not in sys.path:
        sys.path.insert(0, str(benchmarks))
    spec = importlib.util.spec_from_file_location(name, benchmarks / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(**overrides) -> DualRouteConfig:
    """Odd sizes on purpose (seq 13 with block 4 gives a ragged last block)."""
    options = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        route_block_size=4,
        route_topk=2,
        route_global_blocks=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    options.update(overrides)
    return DualRouteConfig(**options)


def tiny_seq2seq_config(**overrides) -> DualRouteConfig:
    options = dict(is_encoder_decoder=True, decoder_layers=2, decoder_start_token_id=2, bos_token_id=2, eos_token_id=3)
    options.update(overrides)
    return tiny_config(**options)


def make_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3, built locally."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        bos_token="[CLS]",
        eos_token="[SEP]",
        model_max_length=model_max_length,
    )


def random_batch(config, batch: int = 3, length: int = 13, seed: int = 0, padded: bool = True):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, config.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        for b in range(1, batch):
            cut = length - 2 * b - 1
            attention_mask[b, cut:] = 0
            input_ids[b, cut:] = config.pad_token_id
    return input_ids, attention_mask


def run_python_without_package(code: str, cwd: Path, timeout: int = 600) -> str:
    """Runs ``code`` in a fresh interpreter where `modeling_dualroute` cannot be imported (remote-code checks)."""
    guard = textwrap.dedent(
        """
        import sys, importlib.abc
        class _HidePackage(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "modeling_dualroute" or name.startswith("modeling_dualroute."):
                    raise ModuleNotFoundError(f"No module named {name!r} (hidden for this test)")
                return None
        sys.meta_path.insert(0, _HidePackage())
        sys.path = [p for p in sys.path if p not in ("", ".", REPO)]
        """
    ).replace("REPO", repr(str(REPO)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(cwd / "hf_home"))
    result = subprocess.run(
        [sys.executable, "-c", guard + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed:\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-6000:]}")
    return result.stdout
