"""The seed systems' own training code, driven the way their authors drive it, for
``bench/fidelity.py``. Runs in a separate virtual environment holding the authors' versions
(not this project's), with their repository checked out at a pinned commit: nothing of theirs
is imported by the project or copied into it; this file only calls it.

    python fidelity_authors.py sugd --code CHECKOUT --model DIR --data DIR --settings JSON \
        --out DIR

Writes ``losses.json`` (the loss of every optimizer step, as their ``compute_loss`` returned
it) and ``model/`` (their final weights) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainingArguments


def record_losses(trainer_class) -> list[float]:
    """Every training loss their ``compute_loss`` returns, at full precision (the Trainer's
    own log rounds to 4 decimals and averages over ``logging_steps``). Only records."""
    losses: list[float] = []
    original = trainer_class.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        result = original(self, model, inputs, *args, **kwargs)
        loss = result[0] if isinstance(result, tuple) else result
        if model.training:
            losses.append(float(loss.detach()))
        return result

    trainer_class.compute_loss = compute_loss
    return losses


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    """The target's tokenizer: its ``tokenizer.json`` and special tokens (transformers 5 names
    the class ``TokenizersBackend``, which their version does not know)."""
    return PreTrainedTokenizerFast.from_pretrained(model_dir)


def trainer_arguments(out: Path, settings: dict, **specific) -> TrainingArguments:
    """Their ``TrainingArguments`` on the CPU in fp32, with nothing saved or evaluated along
    the way (neither changes a step's loss)."""
    return TrainingArguments(output_dir=str(out / "trainer"), learning_rate=settings["lr"],
                             num_train_epochs=settings["epochs"], seed=settings["seed"],
                             report_to="none", use_cpu=True, logging_steps=1, **specific)


def sugd(code: Path, model_dir: Path, data: Path, settings: dict, out: Path) -> list[float]:
    """``SUGD.ipynb`` of iraklis07/llm-unlearning with ``configs/sequential_args.json``'s
    fields from ``settings``: their ``DatasetProcessor``, their collator, their last-k freeze
    (the notebook's loop, which leaves embeddings, final norm and head trainable), their
    ``SequentialUnlearning`` with ``split_retain``."""
    from methods import AscentPlusDescentDataCollator, SequentialUnlearning, sequential
    from utils.data import DatasetProcessor

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    dataset = DatasetProcessor(data_dir=str(data), tokenizer=tokenizer)(
        split="train", task="all", split_tasks=False, split_retain=False)
    collator = AscentPlusDescentDataCollator(tokenizer=tokenizer, padding="longest",
                                             pad_to_multiple_of=8)
    layers = model.model.layers
    for i, layer in enumerate(layers):  # as the notebook's train_last_k cell
        for param in layer.parameters():
            param.requires_grad = i >= len(layers) - settings["k"]
    args = trainer_arguments(out, settings, per_device_train_batch_size=1,
                             gradient_accumulation_steps=1, save_strategy="no",
                             eval_strategy="no")
    losses = record_losses(sequential.AscentPlusDescentTrainer)
    unlearning = SequentialUnlearning(
        model=model, tokenizer=tokenizer, data_collator=collator, training_args=args,
        forget_dataset=dataset["forget"], retain_dataset=dataset["retain"], sequential=True,
        chunk_size=settings["chunk_size"], positive_ratio=settings["positive_ratio"],
        positive_factor=settings["positive_factor"], retain_loss="CE")
    unlearning.train(split_retain=True)
    model.save_pretrained(out / "model")
    return losses


# the tiny target's tokenizer has no chat template; the prompt, then a space (the project's side
# is handed the same token ids, so any template compares)
CHAT_TEMPLATE = "{{ messages[0]['content'] }} "


def sha256(code: Path, model_dir: Path, data: Path, settings: dict, out: Path) -> list[float]:
    """``unlearn.py`` of LAB-FLAIR/Constrained-Unlearning-for-LLM as its ``unlearn()`` sets it
    up: their ``DataGenerator`` (the prompt through the chat template, the output tokenized
    alone), their ``CustomDataCollator`` (left padding), their freeze of all but the MLPs of
    ``trainable_layers``, their ``AscentPlusDescentTrainer`` (batches of 12 × 10 from a random
    sampler, the retain weight's epoch-0 reference) and its ``TrainingArguments``. Two shims,
    each what their code needs to run at all under its pinned transformers 4.49: their
    ``compute_loss`` is called without ``num_items_in_batch`` (which it does not take), and the
    Trainer divides each micro-batch's loss by the accumulation steps as the Trainer their
    code was written for did (4.49 stops dividing for a model whose forward takes **kwargs).
    Left out: their evaluation every 4 steps for the best checkpoint (the rows it needs are
    held out here, and in epoch 0 those evaluation batches add to the retain reference).
    Writes ``order.json``: the rows of every micro-batch as their sampler drew them."""
    import importlib.util

    import pandas as pd
    spec = importlib.util.spec_from_file_location("their_unlearn", code / "unlearn.py")
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side, tokenizer.chat_template = "left", CHAT_TEMPLATE
    # ids and mask only, as OLMo's tokenizer returns them (their code unpacks exactly two)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    frames = {split: pd.read_json(data / f"{split}.jsonl", lines=True)
              for split in ("forget", "retain")}
    dataset = theirs.DataGenerator(frames["forget"], frames["retain"], tokenizer)
    # dataset index -> row, as DataGenerator orders them (forget rows by task, then retain)
    rows = [(split, r["id"]) for split in ("forget", "retain")
            for r in frames[split].sort_values("task", ignore_index=True).to_dict("records")]
    where = {tuple(ids): i for i, ids in enumerate(dataset.input_ids)}
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    for k, v in model.named_parameters():  # their freeze: MLPs of the trainable layers only
        parts = k.split(".")
        keep = (len(parts) > 3 and parts[2].isdigit()
                and int(parts[2]) in settings["trainable_layers"] and parts[3] == "mlp")
        v.requires_grad_(keep)
    losses, order = record_losses(theirs.AscentPlusDescentTrainer), []

    class Shimmed(theirs.AscentPlusDescentTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:  # which rows this micro-batch holds (left padding dropped)
                order.append([rows[where[tuple(ids[mask.bool()].tolist())]] for ids, mask
                              in zip(inputs["input_ids"], inputs["attention_mask"])])
            return super().compute_loss(model, inputs, return_outputs)

    args = trainer_arguments(out, settings, per_device_train_batch_size=12,
                             gradient_accumulation_steps=10, remove_unused_columns=False,
                             save_strategy="no", eval_strategy="no")
    trainer = Shimmed(model=model, train_dataset=dataset, tokenizer=tokenizer, args=args,
                      data_collator=theirs.CustomDataCollator(tokenizer=tokenizer))
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    model.save_pretrained(out / "model")
    (out / "order.json").write_text(json.dumps(order))
    return losses


SYSTEMS = {"sugd": sugd, "sha256": sha256}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("system", choices=sorted(SYSTEMS))
    p.add_argument("--code", type=Path, required=True, help="their checkout")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="rows in their file layout")
    p.add_argument("--settings", required=True, help="JSON of the run's settings")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    sys.path.insert(0, str(args.code))
    torch.use_deterministic_algorithms(True)
    losses = SYSTEMS[args.system](args.code, args.model, args.data, json.loads(args.settings),
                                  args.out)
    (args.out / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main()
