"""Runs as users launch them: separate processes, data parallel under `accelerate launch`, and
a process killed with SIGKILL then rerun."""

import errno
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from unlearn import run
from unlearn.io import staging_path
from unlearn.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["precision=fp32", "epochs=2", "batch_size=4", "grad_accum=2", "select=none"]


def _state(directory):
    return load_model(directory)[0].state_dict()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(model, data, out, *extra) -> list[str]:
    return ["-m", "unlearn.cli", "run", "--method", "gd", "--model", str(model), "--data",
            str(data), "--out", str(out), "--seed", "0", *SETTINGS, *extra]


def test_two_processes_match_one_with_the_same_global_batch(tiny_target, synth_dir, tmp_path):
    """One micro-batch a step (grad_accum=1): each process trains on its part of every
    micro-batch (no weight-0 steps), and the averaged gradient is the one-process one."""
    settings = [s for s in SETTINGS if not s.startswith("grad_accum")] + ["grad_accum=1"]
    run("gd", tiny_target[0], synth_dir, tmp_path / "one", seed=0,
        **dict(s.split("=") for s in settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"),
                    "--main_process_port", str(_free_port()), "-m", "unlearn.cli", "run",
                    "--method", "gd", "--model", str(tiny_target[0]), "--data", str(synth_dir),
                    "--out", str(tmp_path / "two"), "--seed", "0", *settings],
                   check=True, env=env, cwd=ROOT, timeout=600)
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["status"] == "complete" and record["processes"] == 2
    alone = json.loads((tmp_path / "one" / "run.json").read_text())
    for shared, whole in zip(record["history"], alone["history"], strict=True):
        # the main process trained on its part of each step's tokens, not on all of them
        assert 0.25 * whole["tokens"] < shared["tokens"] < 0.75 * whole["tokens"]
    one, two = _state(tmp_path / "one"), _state(tmp_path / "two")
    changed = [k for k in one if not torch.equal(one[k], _state(tiny_target[0])[k])]
    assert changed  # the comparison is between trained weights, not two untouched copies
    for k in one:  # the same gradients, summed in another order
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def _require_deepspeed() -> None:
    """CI installs DeepSpeed (Makefile): a missing one fails these tests rather than skip them."""
    assert importlib.util.find_spec("deepspeed") is not None, (
        "DeepSpeed is not installed: `make install` installs it (ZeRO-3 is tested on CPU)")


def test_zero3_with_a_reference_model_matches_one_process(tiny_target, synth_dir, tmp_path):
    """DeepSpeed ZeRO-3 shards every weight across the processes; npo_kl needs the frozen
    reference twice (forget log-probabilities up front, logits every step), so both reference
    paths and the sharded training step must give the one-process model."""
    _require_deepspeed()
    # grad_accum=4: two micro-batches per process per step, so accumulation is exercised;
    # select=none: ZeRO-3 runs keep the last model (resolve_rule), so the one-process run must
    # too, or its selection may keep an earlier step and the two models differ by the rule
    settings = ["precision=fp32", "epochs=1", "batch_size=2", "grad_accum=4", "lr=1e-4",
                "lora=false", "select=none"]
    run("npo_kl", tiny_target[0], synth_dir, tmp_path / "one", seed=0,
        **dict(s.split("=") for s in settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / "zero3-cpu-2proc.yaml"),
                    "--main_process_port", str(_free_port()), "-m", "unlearn.cli", "run",
                    "--method", "npo_kl", "--model", str(tiny_target[0]), "--data",
                    str(synth_dir), "--out", str(tmp_path / "two"), "--seed", "0", *settings],
                   check=True, env=env, cwd=ROOT, timeout=600)
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["processes"] == 2
    # counted whole, though each process holds only a shard
    assert record["trainable_parameters"] == sum(p.numel() for p in
                                                 load_model(tiny_target[0])[0].parameters())
    one, two = _state(tmp_path / "one"), _state(tmp_path / "two")
    source = _state(tiny_target[0])
    assert any(not torch.equal(one[k], source[k]) for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_zero3_refuses_what_needs_whole_weights_mid_run(tiny_target, synth_dir, tmp_path):
    _require_deepspeed()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "configs" / "accelerate" / "zero3-cpu-2proc.yaml"),
                           "--main_process_port", str(_free_port()),
                           *_cli(tiny_target[0], synth_dir, tmp_path / "u", "lora=true")],
                          env=env, cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert done.returncode != 0
    assert "lora=true: not available under DeepSpeed ZeRO-3" in done.stderr
    assert not (tmp_path / "u").exists()


def test_fsdp_is_refused_what_needs_whole_weights_and_saves_through_accelerate():
    """FSDP runs on GPUs only (on CPUs accelerate falls back to DDP), so its accelerator is
    stood in for: a sharded run saves the state dict accelerate gathers, and keeping a best
    step is refused, naming FSDP and the launch that allows it."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from unlearn.accel import sharded, whole_state_dict
    from unlearn.engine import _check_sharded
    from unlearn.methods import get_method

    def accelerator(kind):
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=None),
                               get_state_dict=lambda model: {"gathered": model})

    fsdp, ddp = accelerator(DistributedType.FSDP), accelerator(DistributedType.MULTI_GPU)
    assert sharded(fsdp) and whole_state_dict(fsdp, "model") == {"gathered": "model"}
    assert not sharded(ddp) and whole_state_dict(ddp, "model") is None
    settings = get_method("gd").Config()
    with pytest.raises(ValueError, match="select=score: not available under FSDP.*ddp.yaml"):
        _check_sharded(fsdp, settings, "score", 0)
    _check_sharded(fsdp, settings, "none", 0)  # nothing that needs whole weights: it runs


def test_sigkilled_run_resumes_to_the_same_model(tiny_target, synth_dir, tmp_path):
    epochs = "epochs=6"  # enough left after the first checkpoint that the kill lands mid-run
    run("gd", tiny_target[0], synth_dir, tmp_path / "whole", seed=0,
        **dict(s.split("=") for s in [*SETTINGS, epochs]))
    out = tmp_path / "killed"
    env = {**os.environ, "UNLEARN_CHECKPOINT_MINUTES": "0"}  # a checkpoint every epoch
    process = subprocess.Popen([sys.executable, *_cli(tiny_target[0], synth_dir, out, epochs)],
                               env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    progress = staging_path(out) / "checkpoint" / "progress.json"
    deadline = time.monotonic() + 300
    while not (progress.exists() and json.loads(progress.read_text()).get("epoch")):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # mid-run: no chance to clean up
    process.wait()
    assert not out.exists()  # nothing half-written where the model goes
    subprocess.run([sys.executable, *_cli(tiny_target[0], synth_dir, out, epochs)], env=env,
                   cwd=ROOT, check=True, timeout=600)
    whole, resumed = _state(tmp_path / "whole"), _state(out)
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=0, msg=k)


def test_a_full_disk_leaves_no_partial_model(tiny_target, synth_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def disk_full(self, directory, *args, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half")  # a write cut short
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run("gd", tiny_target[0], synth_dir, tmp_path / "u", epochs=1, batch_size=8)
    assert not (tmp_path / "u").exists()


def test_settings_out_of_range_fail_before_any_work(tiny_target, synth_dir, tmp_path):
    with pytest.raises(ValueError, match=r"chunk_size=0: must be greater than 0"):
        run("sugd", tiny_target[0], synth_dir, tmp_path / "u", chunk_size=0)
    assert not list(tmp_path.iterdir())


def test_zero3_optimizer_offload_steps_at_the_schedules_learning_rate(tiny_target, synth_dir,
                                                                      tmp_path):
    """With optimizer offload accelerate swaps the torch AdamW for DeepSpeedCPUAdam built from
    its settings (lr: the placeholder 1.0); the schedule must drive the optimizer that steps.
    At lr 1.0 the weights would land far from the one-process run's."""
    _require_deepspeed()
    config = tmp_path / "offload.yaml"
    config.write_text((ROOT / "configs" / "accelerate" / "zero3-cpu-2proc.yaml").read_text()
                      .replace("zero_stage: 3", "zero_stage: 3\n  offload_optimizer_device: cpu"))
    settings = ["precision=fp32", "epochs=1", "batch_size=2", "grad_accum=2", "lr=1e-4",
                "select=none", "report_to=none", "lora=false"]
    run("gd", tiny_target[0], synth_dir, tmp_path / "one", seed=0, mia=None,
        **dict(s.split("=") for s in settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(config), "--main_process_port", str(_free_port()),
                    "-m", "unlearn.cli", "run", "--method", "gd", "--model", str(tiny_target[0]),
                    "--data", str(synth_dir), "--out", str(tmp_path / "offload"), "--mia", "none",
                    *settings],
                   check=True, env=env, cwd=ROOT, timeout=900)
    one, offload, source = (_state(tmp_path / "one"), _state(tmp_path / "offload"),
                            _state(tiny_target[0]))
    assert any(not torch.equal(one[k], source[k]) for k in one)
    for k in one:
        torch.testing.assert_close(offload[k], one[k], rtol=1e-3, atol=1e-5, msg=k)


def test_evaluation_shares_rows_between_processes_and_gives_the_one_process_results(
        tiny_target, synth_dir, tmp_path):
    from unlearn import evaluate
    one = evaluate(tiny_target[0], synth_dir, tmp_path / "one", mia=synth_dir / "mia",
                   mmlu=synth_dir / "mmlu")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"),
                    "--main_process_port", str(_free_port()), "-m", "unlearn.cli", "eval",
                    "--model", str(tiny_target[0]), "--data", str(synth_dir),
                    "--mia", str(synth_dir / "mia"), "--mmlu", str(synth_dir / "mmlu"),
                    "--out", str(tmp_path / "two")],
                   check=True, env=env, cwd=ROOT, timeout=600)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    # a row's loss comes from another batch there, so equal up to float rounding
    assert two["aggregated-terms"] == pytest.approx(one["aggregated-terms"], abs=1e-9)
    for key in ("mia_loss_acc", "mmlu_average", "final-score"):
        assert two[key] == pytest.approx(one[key], abs=1e-9), key
    for name in ("forget_0.csv", "retain_0.csv"):  # every row, its generation, in one order
        a, b = (pd.read_csv(tmp_path / d / name, keep_default_na=False) for d in ("one", "two"))
        assert a.drop(columns="nll").equals(b.drop(columns="nll"))
        assert b["nll"].to_numpy() == pytest.approx(a["nll"].to_numpy(), rel=1e-5)
