"""Loading causal LMs and their tokenizers from local HF directories (no hub access)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..accel import process_state, use_tf32
from ..io import fingerprint


class ModelError(ValueError):
    """A model directory that cannot be used; the message says which and what to do."""


# files one of which every tokenizer that save_pretrained writes has: without any, transformers
# builds an empty tokenizer that encodes every text to [] (and a run would train on nothing)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
_PROBE = "The quick brown fox jumps over the lazy dog."


# the weights save_pretrained writes: one file, or shards listed by an index
# what ``eval``, ``audit`` and ``locate`` compute in (``--dtype``): auto is bf16 on a GPU, where
# it halves memory and time at no cost to the scores; fp32 on a CPU, where bf16 is slower
INFERENCE_DTYPES = {"auto": torch.bfloat16 if torch.cuda.is_available() else torch.float32,
                    "bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _check_tokenizer_files(path: Path) -> None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
                         f"model's tokenizer into it with tokenizer.save_pretrained")


def check_model_dir(path: str | Path) -> Path:
    """Refuse, before any work, a model directory that cannot load: missing, without
    config.json, tokenizer or weights, or missing a shard its index names. Reads no weights
    (a command checks every model it will load before loading the first)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: model directory not found")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json; pass a directory written by "
                         f"save_pretrained (a tokenizer alone is not a model)")
    _check_tokenizer_files(path)
    for index in (path / name for name in WEIGHT_INDEXES):
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ModelError(f"{index}: not a weight index (JSON with a weight_map); copy "
                                 f"the model again") from None
            missing = sorted(str(s) for s in shards if not (path / str(s)).is_file())
            if missing:
                raise ModelError(f"{path}: {len(missing)} weight shard(s) named in {index.name} "
                                 f"missing ({', '.join(missing[:3])}); copy the model again")
            return path
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"{path}: no weights (none of {', '.join(WEIGHT_FILES + WEIGHT_INDEXES)})"
                         f"; pass a directory written by save_pretrained")
    return path


def check_model_dirs(*paths: str | Path | None) -> None:
    """:func:`check_model_dir` of every path given (None: a role left empty)."""
    for path in paths:
        if path is not None:
            check_model_dir(path)


def load_tokenizer(path: str | Path):
    """The directory's tokenizer, with a pad token (OLMo ships none: its EOS stands in)."""
    path = Path(path)
    _check_tokenizer_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: no usable tokenizer ({e.__class__.__name__}); the directory "
                         f"must hold the files tokenizer.save_pretrained writes") from e
    if not tokenizer(_PROBE).input_ids:
        raise ModelError(f"{path}: the tokenizer encodes text to no tokens; save the model's "
                         f"own tokenizer into it with tokenizer.save_pretrained")
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{path}: the tokenizer has no end-of-sequence token; set eos_token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def best_device() -> str | None:
    """Where a model is measured: this process's GPU when there is one (under `accelerate
    launch` each process has its own; "cuda" alone would put them all on the first), else where
    it loads (the CPU). On a GPU its fp32 matmuls run in TF32 from then on."""
    if not torch.cuda.is_available():
        return None
    use_tf32()
    return str(process_state().device)


def inference_dtype(name: str) -> torch.dtype:
    """The torch dtype a ``--dtype`` name stands for (see ``INFERENCE_DTYPES``)."""
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"dtype={name}: use one of {', '.join(INFERENCE_DTYPES)}")
    return INFERENCE_DTYPES[name]


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | None = None):
    """``(model, tokenizer)`` from a local HF directory holding any causal LM.

    Raises :class:`ModelError` naming the directory when it is missing, holds no model config,
    or holds a model that is not a causal LM.
    """
    path = check_model_dir(path)
    tokenizer = load_tokenizer(path)  # before the weights: a bad tokenizer fails at once
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                     local_files_only=True)
    except SafetensorError as e:
        raise ModelError(f"{path}: its weights file is corrupt or truncated ({e}); copy the "
                         f"model again") from e
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{path}: not a causal language model that transformers can load "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from e
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def saved_dtype(path: str | Path) -> torch.dtype:
    """The dtype the directory's weights were saved in, as its config records it (fp32 where it
    records none): what an unlearned copy is written back in."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def model_fingerprint(path: str | Path) -> str:
    """What identifies the model in a directory without reading its weights: where it is, and
    the name, size and modification time of each file in it (a retrained model differs)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: model directory not found")
    files = sorted(p for p in path.iterdir() if p.is_file())
    return fingerprint(str(path.resolve()),
                       [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def same_weights(a: str | Path, b: str | Path) -> bool:
    """Whether two model directories hold the same weights byte for byte (a copy of a model is
    that model): the weight files' names and sizes, then their bytes up to the first
    difference, which a changed model shows within its first changed tensor."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    listed = [sorted((p.name, p.stat().st_size) for p in d.iterdir()
                     if p.is_file() and p.suffix in (".safetensors", ".bin")) for d in (a, b)]
    if not listed[0] or listed[0] != listed[1]:
        return False
    for name, _ in listed[0]:
        with open(a / name, "rb") as left, open(b / name, "rb") as right:
            while chunk := left.read(2**24):
                if chunk != right.read(len(chunk)):
                    return False
    return True


def check_oracle(oracle: str | Path | None, source: str | Path, option: str) -> None:
    """Refuse an ``oracle`` (when given) with the same weights as ``source``, the model it is to
    be set against (``option`` names it in the message)."""
    if oracle is not None and same_weights(oracle, source):
        raise ModelError(f"--oracle {oracle} holds the same weights as {option} {source}: the "
                         f"oracle is a model never trained on the forget set; give that model, "
                         f"or leave --oracle out")


def trained_from_scratch(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` is a target this package trained from scratch, directly or through
    a base it built (``init``): such small models need the ``small`` method profile."""
    record = Path(model_dir) / "target.json"
    if not record.is_file():
        return False
    made = json.loads(record.read_text())
    return made.get("from_scratch", made.get("init") is None)


def teacher_of(model_dir: str | Path, teacher: str = "auto") -> Path | None:
    """The model ``model_dir`` was fine-tuned from, which never saw the documents it memorised:
    unlearning draws forget rows to its predictions (``teacher``). "auto": for a target this
    package built, the base it memorised from (``target.json``'s ``base``; older records:
    ``init``), and None for any other model; "none": no teacher; else a model directory (a
    user's model before their fine-tune), which must read the same tokens."""
    if teacher == "none":
        return None
    if teacher != "auto":
        found = Path(teacher)
        if not (found / "config.json").is_file():
            raise ModelError(f"{teacher}: teacher model directory not found (no config.json); "
                             f"pass the model this one was fine-tuned from, or teacher=none")
        vocab = [AutoConfig.from_pretrained(p, local_files_only=True).vocab_size
                 for p in (model_dir, found)]
        if vocab[0] != vocab[1]:
            raise ModelError(f"{teacher}: the teacher's vocabulary ({vocab[1]}) differs from "
                             f"{model_dir}'s ({vocab[0]}); pass the model this one was "
                             f"fine-tuned from, or teacher=none")
        return found
    record = Path(model_dir) / "target.json"
    if not record.is_file():
        return None
    made = json.loads(record.read_text())
    for found in (made.get("base") and Path(model_dir) / made["base"], made.get("init")):
        if found and (Path(found) / "config.json").is_file():
            return Path(found)
    return None
