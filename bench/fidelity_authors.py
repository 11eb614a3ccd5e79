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


SYSTEMS = {"sugd": sugd}


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
