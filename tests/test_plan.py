"""The memory plan: planned from the config alone, it counts what the run trains and refuses,
before any output exists, a run that cannot fit, naming the settings that would."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from unlearn import MemoryPlanError, memory_plan, plan, run
from unlearn.cli import main
from unlearn.methods import METHODS, get_method
from unlearn.models import load_model
from unlearn.plan import FP32, HEADROOM, plan_run

FAST = dict(epochs=1, batch_size=4, select="none")


@pytest.mark.parametrize("settings", [dict(layers="last:2", modules="mlp"),
                                      dict(lora=True, layers="last:1")])
def test_the_plan_trains_what_the_run_trains(tiny_target, synth_dir, tmp_path, settings):
    planned = memory_plan("gd", tiny_target[0], **FAST, **settings)
    record = run("gd", tiny_target[0], synth_dir, tmp_path / "m", mia=None, **FAST, **settings)
    assert planned.trainable == record["trainable_parameters"] > 0
    assert record["memory_plan"]["peak_mb"] == pytest.approx(planned.peak / 2**20)
    weights = sum(p.numel() for p in load_model(tiny_target[0])[0].parameters()) * FP32
    parts = planned.parts
    assert parts["gradients"] == planned.trainable * 4 and parts["optimizer"] == 2 * 4 * (
        planned.trainable)
    assert parts["weights"] >= weights and parts["references"] == 0  # gd reads no copy
    assert record["rollback"] is True  # the plan had room for the NaN rollback's copy


def test_the_rollback_copy_is_given_up_first_where_memory_is_short(tiny_target):
    gd = get_method("gd")
    roomy = plan_run(gd, gd.Config(), tiny_target[0], device="cpu", available=2**40)
    rollback = roomy.parts["rollback"]
    assert rollback > 0
    # room for everything but the rollback copy: the plan drops it and fits
    short = (roomy.peak - rollback / 2) / HEADROOM
    tight = plan_run(gd, gd.Config(), tiny_target[0], device="cpu", available=short)
    assert tight.fits and tight.parts["rollback"] == 0
    assert tight.parts == {**roomy.parts, "rollback": 0}
    # no room even without it: refused with the copy still counted
    tighter = plan_run(gd, gd.Config(), tiny_target[0], device="cpu",
                       available=(roomy.peak - 2 * rollback) / HEADROOM)
    assert not tighter.fits and tighter.parts["rollback"] == rollback


def test_a_frozen_copy_is_planned_only_where_lora_cannot_stand_in(tiny_target):
    kl = get_method("kl")  # reads the source's logits while training
    fp32 = kl.Config().override(precision="fp32")  # the copy's dtype: test_unlearn's concern
    weights = plan_run(kl, fp32.override(lora=True), tiny_target[0]).parts["weights"]
    assert plan_run(kl, fp32, tiny_target[0]).parts["references"] > 0.9 * weights
    assert plan_run(kl, fp32.override(lora=True), tiny_target[0]).parts["references"] == 0


def test_zero3_splits_weights_gradients_and_optimizer_states(tiny_target):
    gd = get_method("gd")
    one = plan_run(gd, gd.Config(), tiny_target[0], processes=1, sharded=False)
    two = plan_run(gd, gd.Config(), tiny_target[0], processes=2, sharded=True)
    assert two.parts["optimizer"] == one.parts["optimizer"] // 2
    assert two.parts["gradients"] == one.parts["gradients"] // 2
    assert one.parts["weights"] // 2 < two.parts["weights"] < one.parts["weights"]  # + a layer
    assert two.parts["rollback"] == 0 < one.parts["rollback"]  # no rollback copy of a shard
    assert two.parts["activations"] == one.parts["activations"]  # each its own micro-batch


def test_checkpointing_and_a_smaller_batch_plan_fewer_activations(tiny_target):
    gd = get_method("gd")
    base = plan_run(gd, gd.Config(), tiny_target[0]).parts
    ckpt = plan_run(gd, gd.Config().override(gradient_checkpointing=True), tiny_target[0]).parts
    half = plan_run(gd, gd.Config().override(batch_size=4), tiny_target[0]).parts
    assert ckpt["activations"] < base["activations"] / 2
    assert half["activations"] == base["activations"] // 2
    assert half["logits"] == base["logits"] // 2


def test_a_run_that_cannot_fit_is_refused_before_any_output(tiny_target, synth_dir, tmp_path,
                                                            monkeypatch, capsys):
    gd = get_method("gd")
    full = plan_run(gd, gd.Config(), tiny_target[0]).peak
    lora = plan_run(gd, gd.Config().override(lora=True), tiny_target[0]).peak
    assert lora < full
    room = int((full + lora) / 2 / HEADROOM)  # LoRA fits, full fine-tuning does not
    monkeypatch.setattr(plan, "device_memory", lambda: ("cpu", room))
    with pytest.raises(MemoryPlanError, match="would fit: lora=true"):
        run("gd", tiny_target[0], synth_dir, tmp_path / "m", mia=None, epochs=1)
    assert not list(tmp_path.iterdir())  # nothing was written, not even a staging directory
    args = ["run", "--method", "gd", "--model", str(tiny_target[0]), "--data", str(synth_dir),
            "--out", str(tmp_path / "m")]
    assert main(args + ["--plan"]) == 0
    printed = capsys.readouterr().out
    assert "memory plan per device" in printed and "optimizer" in printed
    assert main(args) == 2 and "lora=true" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    record = run("gd", tiny_target[0], synth_dir, tmp_path / "m", mia=None, epochs=1, lora=True)
    assert json.loads((tmp_path / "m" / "run.json").read_text())["memory_plan"] == (
        record["memory_plan"])  # the suggestion runs


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"merge"}))  # merge: two npo_kl runs
def test_the_plan_holds_as_many_rows_as_a_micro_batch_holds(name):
    """The activations are planned for ``rows_per_batch_row × batch_size`` rows: what the
    method's steps put in one micro-batch (GD pairs each forget row with a retain row)."""
    method = get_method(name)
    config = method.Config().override(batch_size=4, grad_accum=1, epochs=1)
    stages = method(config).stages(list(range(12)), list(range(100, 160)), random.Random(0))
    steps = [step for stage in stages for epoch in stage for step in epoch]
    assert max(len(step) for step in steps) == method.rows_per_batch_row * 4


def test_eval_and_locate_plan_their_phases_and_refuse_before_any_output(tiny_target, synth_dir,
                                                                        tmp_path, monkeypatch):
    import torch

    from unlearn.data import load_lume
    from unlearn.evaluation import scoring
    from unlearn.measure import memory
    from unlearn.tracing import locate

    model, _ = load_model(tiny_target[0])
    weights = sum(p.numel() for p in model.parameters()) * FP32  # tied embeddings counted once
    lume = load_lume(synth_dir)
    short = scoring.memory_plan(tiny_target[0], lume, None, None, 1, torch.float32)
    long = scoring.memory_plan(tiny_target[0], lume, None, None, 4096, torch.float32)
    assert short.parts["weights"] == pytest.approx(weights, rel=1e-3)  # and buffers (RoPE's)
    # thousands of new tokens: generation's KV cache outgrows every other phase
    assert "generation" in long.parts and long.peak > short.peak
    room = int(weights / HEADROOM)  # the weights fit, nothing else does
    monkeypatch.setattr(memory, "device_memory", lambda: ("cpu", room))
    with pytest.raises(MemoryPlanError, match="--dtype bf16"):
        scoring.evaluate(tiny_target[0], synth_dir, tmp_path / "e", mia=None, mmlu=None)
    with pytest.raises(MemoryPlanError, match="unlearn locate"):
        locate(tiny_target[0], synth_dir, tmp_path / "l", samples=2)
    assert not list(tmp_path.iterdir())  # nothing was written


def test_a_cpu_reads_the_checkpoint_as_saved_beside_the_weights_it_makes(tiny_target, tmp_path,
                                                                       monkeypatch):
    """Loading is a phase of its own: a bf16 checkpoint read into fp32 weights holds both (a
    model whose other phases are small, as tracing's, peaks there); a GPU's copy is made from
    the CPU's, so its device never holds the checkpoint."""
    import torch

    from unlearn.measure import memory
    model, tokenizer = load_model(tiny_target[0])
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    weights = sum(p.numel() for p in model.parameters())
    plan = memory.plan_inference(tmp_path / "bf16", torch.float32, forward=1)
    assert plan.parts["loading"] == pytest.approx(2 * weights, rel=1e-3)  # bf16, beside fp32
    assert plan.parts["weights"] == pytest.approx(4 * weights, rel=1e-3)
    monkeypatch.setattr(memory, "device_memory", lambda: ("cuda:0", 80 << 30))
    assert "loading" not in memory.plan_inference(tmp_path / "bf16", torch.float32,
                                                  forward=1).parts


FREED_BLOCKS = """
import sys, torch
from unlearn.measure.memory import MemoryPlan, settle_allocator
def rss_mb():
    status = open("/proc/self/status").read().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
peak = {"tight": 30, "roomy": 20}[sys.argv[1]]  # GB of a 100 GB CPU
plan = MemoryPlan({"weights": peak << 30}, "cpu", 100 << 30, 1, False, 0)
settled = settle_allocator(plan)
if sys.argv[1] == "tight" and not settled:
    sys.exit(3)  # not glibc: nothing to set
if sys.argv[1] == "roomy" and settled:
    sys.exit(4)
warm = torch.ones(4 << 20); del warm  # a 16 MiB free: glibc's own threshold rises past 4 MiB
freed, kept = [], []
for _ in range(32):  # 4 MiB blocks, every other one kept: the freed ones cannot be trimmed
    freed.append(torch.ones(1 << 20)); kept.append(torch.ones(1 << 20))
before = rss_mb()
del freed
print(before - rss_mb())
"""


def test_a_tight_plan_returns_freed_tensors_to_the_system_and_a_roomy_one_keeps_speed():
    """What the plan counts is live tensors; the process's resident set follows them only once
    freed blocks go back to the system, which costs time, so only a plan filling more than a
    quarter of a CPU's memory asks for it."""
    def returned(plan: str) -> float:
        done = subprocess.run([sys.executable, "-c", FREED_BLOCKS, plan], capture_output=True,
                              text=True)
        if done.returncode == 3:
            pytest.skip("the C library is not glibc: its allocator is left as it is")
        assert done.returncode == 0, done.stderr
        return float(done.stdout)
    if not Path("/proc/self/status").is_file():
        pytest.skip("no /proc to read the resident set from")
    assert returned("tight") >= 120  # 32 freed blocks of 4 MiB
    assert returned("roomy") < 8  # glibc's default keeps them in its heap
