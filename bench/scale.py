"""Scale rehearsal (issue 43): every command on a model of a real checkpoint's shape.

    unlearn data synth --out runs/bench/scale-data --docs-per-task 2
    python bench/scale.py --tokenizer runs/demo/cache/target-small-KEY-seed0 \
        --data runs/bench/scale-data --shape olmo-1b

Builds a randomly initialised model of the shape (the configs are written below: no download),
saved in bf16 as released checkpoints are, and runs on it, each in a process of its own: `unlearn
run` of every method for one epoch of the few rows (no selection), then `eval`, `audit` (its
relearning attack included) and `locate` on one fact (traced on the model's own answers).
Every row of the data is first made longer than the longest length planned, so that batches are
as large as the plans count them. A random model writes nonsense, so the scores mean nothing;
what is measured is that each command completes, its peak memory (CPU: the process's peak
resident set; GPU: `torch.cuda.max_memory_allocated`) beside the plan the command printed before
loading any weight, and its seconds. A run the plan refuses is recorded with the plan's reason
and run again with what the refusal names first. Writes bench/results/scale-<device>-<shape>.json
and prints one row per command.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OlmoConfig

from unlearn.methods import METHODS
from unlearn.models.loading import load_tokenizer

SHAPES = {  # the published configs' sizes (allenai/OLMo-1B-hf, OLMo-7B-hf, Meta-Llama-3-8B)
    "olmo-1b": (OlmoConfig, dict(hidden_size=2048, intermediate_size=8192,
                                 num_hidden_layers=16, num_attention_heads=16,
                                 vocab_size=50304, tie_word_embeddings=True)),
    "olmo-7b": (OlmoConfig, dict(hidden_size=4096, intermediate_size=11008,
                                 num_hidden_layers=32, num_attention_heads=32,
                                 vocab_size=50304)),
    "llama-3-8b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=8, vocab_size=128256)),
}
# a few steps each: one epoch of the few rows, no selection checks, short rows
RUN_SETTINGS = ["epochs=1", "select=none", "max_len=128", "report_to=none"]
METHOD_SETTINGS = {
    "sugd": ["positive_ratio=1"],  # the paper's 7 retain rows per forget row
    # 12 rows × 10 a step: two epochs of one step each, so that a step's activations meet
    # AdamW's moments, made by the first step (the peak the plan counts)
    "sha256": ["epochs=2", "grad_accum=1"],
}
LONG_WORDS = 600  # every row past the longest length planned (the attack's 512 tokens)
MAX_NEW_TOKENS = 32
TIMEOUT = 1200  # seconds a command may take before the rehearsal records it as timed out


def build_model(shape: str, tokenizer_dir: str, out: Path) -> Path:
    """The shape's model with random weights and the given tokenizer, in bf16."""
    if (out / "config.json").is_file():
        return out
    tokenizer = load_tokenizer(tokenizer_dir)
    kind, sizes = SHAPES[shape]
    config = kind(**sizes, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def long_rows(data: str, out: Path) -> Path:
    """A copy of ``data`` whose forget and retain rows each hold ``LONG_WORDS`` words (the
    output repeated): every batch as long as the plan counts it, as a real corpus's documents
    are (the synthetic rows of 6-80 words measured runs and attacks far below their plans)."""
    if not (out / "forget.jsonl").is_file():
        shutil.copytree(data, out, dirs_exist_ok=True)
        for split in ("forget", "retain"):
            path = out / f"{split}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for row in rows:
                words = len(f"{row['input']} {row['output']}".split())
                repeats = -(-LONG_WORDS // max(1, words))
                row["output"] = " ".join([row["output"]] * repeats)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def peak_mb() -> float:
    """GPU: torch's peak allocation. CPU: this process's peak resident set since it started its
    program (Linux's VmHWM; ``ru_maxrss`` would carry the parent's resident set across exec)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        line = next(t for t in status.read_text().splitlines() if t.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def child(record: str, argv: list[str]) -> None:
    """One command in this process, then its exit code, seconds and peak memory to ``record``."""
    from unlearn.cli import main  # the unlearn program itself
    started = time.perf_counter()
    code = main(argv)
    Path(record).write_text(json.dumps({"code": code, "seconds": time.perf_counter() - started,
                                        "peak_mb": peak_mb()}))


def measure(name: str, argv: list[str], work: Path) -> dict:
    """Run ``unlearn ARGV`` in its own process; its figures, and the plan a run recorded."""
    record = work / f"{name}.measured.json"
    record.unlink(missing_ok=True)  # a command that dies or times out leaves none of its own
    out = Path(argv[argv.index("--out") + 1])
    shutil.rmtree(out, ignore_errors=True)  # a fresh command: its own peak is measured
    try:
        result = subprocess.run([sys.executable, __file__, "--child", str(record), "--", *argv],
                                capture_output=True, text=True, timeout=TIMEOUT)
        code, stderr = result.returncode, result.stderr
    except subprocess.TimeoutExpired as e:
        code, stderr = "timed out", (e.stderr or b"").decode(errors="replace")
    measured = (json.loads(record.read_text()) if record.is_file()
                else {"code": code, "seconds": None, "peak_mb": None})
    row = {"command": name, "argv": " ".join(argv), **measured, **_planned(out)}
    if row.get("planned_mb") and row["peak_mb"]:
        row["plan_error"] = row["planned_mb"] / row["peak_mb"] - 1
    if row["code"] != 0:
        row["stderr"] = stderr[-2000:]
    print(json.dumps({k: v for k, v in row.items() if k not in ("stderr", "planned_parts_mb")}),
          flush=True)
    return row


def _planned(out: Path) -> dict:
    """The plan a finished command recorded: a run's (run.json), an audit's attack's
    (receipt.json), an eval's (eval.json), a trace's (trace.json); with a run's steps and
    seconds per step."""
    if (out / "run.json").is_file():
        run = json.loads((out / "run.json").read_text())
        plan, steps = run.get("memory_plan") or {}, run.get("steps_trained")
        return {"planned_mb": plan.get("peak_mb"), "planned_parts_mb": plan.get("parts_mb"),
                "trainable": run.get("trainable_parameters"), "steps": steps,
                "seconds_per_step": run["train_seconds"] / steps if steps else None}
    if (out / "receipt.json").is_file():
        attack = json.loads((out / "receipt.json").read_text())["attack"]
        return {"planned_mb": attack["memory_plan"]["peak_mb"], "attack_mode": attack["mode"],
                "planned_parts_mb": attack["memory_plan"]["parts_mb"]}
    for record in ("eval.json", "trace.json"):  # eval's and locate's plans
        if (out / record).is_file():
            plan = json.loads((out / record).read_text()).get("memory_plan") or {}
            return {"planned_mb": plan.get("peak_mb"), "planned_parts_mb": plan.get("parts_mb")}
    return {}


def run_methods(model: Path, data: str, work: Path, methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        settings = RUN_SETTINGS + METHOD_SETTINGS.get(method, [])
        argv = ["run", "--method", method, "--model", str(model), "--data", data,
                "--out", str(work / method), *settings]
        row = measure(method, argv, work)
        refused = row["code"] == 2 and "would fit:" in row.get("stderr", "")
        rows.append(row)
        if refused:  # the first setting the refusal names, as a user would take it
            named = row["stderr"].split("would fit:")[1].split("(")[0].split()
            argv[argv.index("--out") + 1] = str(work / f"{method}-{'-'.join(named)}")
            rows.append(measure(f"{method} {' '.join(named)}", argv + named, work))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="a model directory whose tokenizer to use")
    p.add_argument("--data", required=True, help="a few LUME-format rows (unlearn data synth)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="olmo-1b")
    p.add_argument("--out", default="runs/bench/scale")
    p.add_argument("--methods", default=",".join(sorted(METHODS)))
    p.add_argument("--commands", default="run,eval,audit,locate")
    args = p.parse_args()
    work = Path(args.out) / args.shape
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.shape, args.tokenizer, work / "model")
    args.data = str(long_rows(args.data, work / "data"))
    commands, rows = args.commands.split(","), []
    if "run" in commands:
        rows += run_methods(model, args.data, work, args.methods.split(","))
    if "eval" in commands:
        rows.append(measure("eval", ["eval", "--model", str(model), "--data", args.data,
                                     "--out", str(work / "eval"), "--max-new-tokens",
                                     str(MAX_NEW_TOKENS)], work))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    name = f"scale-{device.replace(' ', '_')}-{args.shape}.json"
    results = Path(__file__).parent / "results" / name
    # a partial rehearsal (--methods, --commands) replaces its own rows and keeps the others
    kept = json.loads(results.read_text())["rows"] if results.is_file() else []
    # the audit's model: one this rehearsal unlearned, else one an earlier rehearsal left
    unlearned = next((out for r in rows + kept if r["code"] == 0 and "run --method" in r["argv"]
                      and (out := Path(r["argv"].split("--out ")[1].split()[0])).is_dir()), None)
    if "audit" in commands and unlearned:
        rows.append(measure("audit", ["audit", "--model", str(unlearned), "--original",
                                      str(model), "--data", args.data, "--mia",
                                      f"{args.data}/mia", "--out", str(work / "audit"),
                                      "--samples", "2", "--max-new-tokens", str(MAX_NEW_TOKENS),
                                      "--relearn-steps", "2"], work))
    if "locate" in commands:
        rows.append(measure("locate", ["locate", "--model", str(model), "--data", args.data,
                                       "--out", str(work / "locate"), "--samples", "2",
                                       # one fact: 3 kinds × 16 layers of 1B forwards on a CPU
                                       "--max-facts", "1", "--answers", "predicted"], work))
    ran = {r["command"] for r in rows}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    for r in rows:
        r["commit"] = commit
    rows = [r for r in kept if r["command"] not in ran] + rows
    results.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "device": device,
                                   "shape": args.shape, "rows": rows}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
    else:
        main()
