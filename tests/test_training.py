"""Fine-tuning with the stock tools: Trainer (eval, checkpoint, resume, gradient accumulation) and PEFT LoRA."""

import random

import numpy as np
import pytest
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from modeling_dualroute import DualRouteForSequenceClassification

from helpers import make_tokenizer, tiny_config


POSITIVE, NEGATIVE = ["good", "great", "love", "fun"], ["bad", "awful", "hate", "boring"]
FILLER = "the a of to and in is it that film movie plot story actor scene music city river king queen".split()


def sentiment_dataset(n: int, seed: int, tokenizer):
    """Texts of filler words with one sentiment word somewhere; the label is its polarity (learnable, not trivial:
    the word's position varies and the classifier reads the CLS token)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(FILLER) for _ in range(rng.randrange(6, 28))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        encoded = tokenizer(" ".join(words))
        rows.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": label})
    return rows


def accuracy(eval_prediction):
    logits, labels = eval_prediction
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}


def arguments(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=3e-3,
        num_train_epochs=6,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_steps=5,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    options = dict(num_labels=2, route_topk=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    options.update(overrides)
    return DualRouteForSequenceClassification(tiny_config(**options))


@pytest.fixture(scope="module")
def data():
    tokenizer = make_tokenizer()
    return tokenizer, sentiment_dataset(384, 0, tokenizer), sentiment_dataset(128, 1, tokenizer)


@pytest.mark.slow
def test_trainer_learns_evaluates_saves_and_resumes(tmp_path, data):
    tokenizer, train, evaluation = data
    collator = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(
        model=make_model(),
        args=arguments(tmp_path / "run"),
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        compute_metrics=accuracy,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.5 * losses[0], losses
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] >= 0.9, metrics
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 6 and (checkpoints[-1] / "configuration_dualroute.py").exists()

    # resuming from the checkpoint of epoch 3 ends where the uninterrupted run ended
    resumed = Trainer(
        model=make_model(seed=123),  # weights come from the checkpoint
        args=arguments(tmp_path / "run"),
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        compute_metrics=accuracy,
    )
    resumed.train(resume_from_checkpoint=str(checkpoints[2]))
    for (name, a), b in zip(trainer.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)


def one_sgd_step(tmp_path, train, tokenizer, batch_size, accumulation):
    trainer = Trainer(
        model=make_model(),
        args=arguments(
            tmp_path,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            eval_strategy="no",
            save_strategy="no",
            max_grad_norm=0.0,
        ),
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return {n: before[n] - p.detach() for n, p in trainer.model.named_parameters()}  # = the gradient (lr 1)


def test_gradient_accumulation_equals_one_large_batch(tmp_path, data):
    tokenizer, train, _ = data
    train = train[:16]
    large = one_sgd_step(tmp_path / "large", train, tokenizer, batch_size=16, accumulation=1)
    accumulated = one_sgd_step(tmp_path / "accumulated", train, tokenizer, batch_size=4, accumulation=4)
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], atol=2e-6, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for g in large.values())


@pytest.mark.slow
def test_peft_lora_trains_saves_reloads_and_merges(tmp_path, data):
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    tokenizer, train, evaluation = data
    base_folder = tmp_path / "base"
    make_model().save_pretrained(base_folder)
    model = DualRouteForSequenceClassification.from_pretrained(base_folder)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in model.parameters()) // 2
    trainer = Trainer(
        model=model,
        args=arguments(
            tmp_path / "lora", num_train_epochs=2, learning_rate=5e-3, save_strategy="no", eval_strategy="no"
        ),
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    batch = DataCollatorWithPadding(tokenizer)(evaluation[:8])
    batch.pop("labels")
    model.eval()
    expected = model(**batch).logits
    reloaded = PeftModel.from_pretrained(
        DualRouteForSequenceClassification.from_pretrained(base_folder), tmp_path / "adapter"
    ).eval()
    torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    merged = reloaded.merge_and_unload().eval()
    assert type(merged) is DualRouteForSequenceClassification
    torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)
    # the adapter changed the model
    plain = DualRouteForSequenceClassification.from_pretrained(base_folder).eval()
    assert (plain(**batch).logits - expected).abs().max() > 1e-3


def test_activation_checkpointing_through_trainer(tmp_path, data):
    tokenizer, train, _ = data
    trainer = Trainer(
        model=make_model(),
        args=arguments(tmp_path, max_steps=2, activation_checkpointing=True, eval_strategy="no", save_strategy="no"),
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    assert trainer.model.is_activation_checkpointing
