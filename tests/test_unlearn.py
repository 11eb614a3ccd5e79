import contextlib
import json
import os
import pickle
import random
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig

from unlearn import engine, training
from unlearn.accel import make_accelerator, resolve_precision
from unlearn.anchor import Anchor, sample_passages
from unlearn.data import load_lume, load_mia
from unlearn.engine import resolve_config, run
from unlearn.methods import Example, get_method
from unlearn.methods.losses import Batch, Outputs, Reference, forget_term, forward
from unlearn.methods.trainable import select_parameters
from unlearn.models import load_model
from unlearn.models.layers import decoder_layers
from unlearn.selection import calibration_split, never_seen_level

FAST = dict(epochs=1, batch_size=4, mia=None)  # mia=None: the fixed schedule, no selection
TRAINED = get_method("gd").Config()  # rows as runs train them: 512 tokens, retain rows end in EOS


def _state(directory):
    return load_model(directory)[0].state_dict()


def test_output_loss_masks_the_prompt(tiny_target, synth_dir):
    model, tokenizer = load_model(tiny_target[0])
    row = load_lume(synth_dir).forget[0]
    ids = tokenizer(row.input + " " + row.output).input_ids
    start = len(tokenizer(row.input).input_ids)
    batch = Batch.of([Example(tuple(ids), start, True, 0)], tokenizer.pad_token_id, "cpu")
    labels = torch.tensor([ids])
    labels[0, :start] = -100
    with torch.no_grad():
        expected = model(input_ids=labels.clamp(min=0) * 0 + torch.tensor([ids]),
                         labels=labels).loss
        ours = forward(model, batch).nll
    torch.testing.assert_close(ours[0], expected)


def test_retain_rows_end_in_eos_and_forget_rows_do_not(tiny_target, synth_dir):
    _, tokenizer = load_model(tiny_target[0])
    lume = load_lume(synth_dir)
    eos = tokenizer.eos_token_id
    retain = engine._examples(tokenizer, lume.retain, False, TRAINED)
    forget = engine._examples(tokenizer, lume.forget, True, TRAINED)
    assert all(e.ids[-1] == eos and eos not in e.ids[:-1] for e in retain)
    assert not any(eos in e.ids for e in forget)
    # the answer itself is unchanged: EOS is one extra label after it
    row = lume.retain[0]
    assert retain[0].ids[:-1] == tuple(tokenizer(row.input + " " + row.output).input_ids)


def test_eval_points_spread_evaluations_over_the_run(tiny_target, synth_dir, tmp_path):
    record = run("ga", tiny_target[0], synth_dir, tmp_path / "u", mia=None, epochs=4, batch_size=8,
                 eval_points=2)
    assert [i for i, e in enumerate(record["history"]) if "eval" in e] == [1, 3]


def _examples(n_forget, n_retain):
    forget = [Example((1, 2, 3), 1, True, i) for i in range(n_forget)]
    retain = [Example((1, 2, 3), 1, False, i) for i in range(n_retain)]
    return forget, retain


def test_sugd_chunks_in_file_order_with_a_carried_over_retain_cycle():
    config = get_method("sugd").Config().override(chunk_size=3, positive_ratio=2, epochs=2,
                                                  batch_size=4)
    method = get_method("sugd")(config)
    forget, retain = _examples(7, 5)
    stages = method.stages(forget, retain, random.Random(0))
    assert len(stages) == 3  # chunks of 3, 3, 1
    merged = [[(e.forget, e.index) for step in stage[0] for e in step] for stage in stages]
    assert merged[0] == [(True, 0), (False, 0), (False, 1), (True, 1), (False, 2), (False, 3),
                         (True, 2), (False, 4), (False, 0)]
    assert merged[1][:3] == [(True, 3), (False, 1), (False, 2)]  # the cycle carries over
    assert merged[2] == [(True, 6), (False, 2), (False, 3)]
    assert all(stage[0] == stage[1] for stage in stages)  # same order every epoch
    assert [len(step) for step in stages[0][0]] == [4, 4, 1]


def test_sugd_loss_is_the_row_mean_of_signed_factors(tiny_target, synth_dir):
    model, tokenizer = load_model(tiny_target[0])
    data = load_lume(synth_dir)
    examples = engine._examples(tokenizer, data.forget[:1], True, TRAINED) + engine._examples(
        tokenizer, data.retain[:2], False, TRAINED)
    batch = Batch.of(examples, tokenizer.pad_token_id, "cpu")
    method = get_method("sugd")(get_method("sugd").Config())
    ref = Reference()
    with torch.no_grad():
        out = forward(model, batch)
        nll = out.nll
        loss = method.loss(model, batch, ref)
        ref.forget_level = 6.0
        bounded = method.loss(model, batch, ref)
    torch.testing.assert_close(loss, (-nll[0] + 0.5 * nll[1] + 0.5 * nll[2]) / 3)
    whole = out.text_nll[0]  # the forget row's whole text, prompt included
    forget = (nll[0] - 6).abs() + (whole - 6).abs()
    torch.testing.assert_close(bounded, (forget + 0.5 * nll[1] + 0.5 * nll[2]) / 3)


def test_sugd_paper_profile_trains_each_row_as_the_authors_code_does(tiny_target, synth_dir):
    """SUGD's code (iraklis07/llm-unlearning, methods/sequential.py, configs/sequential_args.json):
    one row a step; the text f"{prompt} {output}" with no EOS, the prompt's tokens masked; the
    loss, factor × the row's mean output cross-entropy: −1 on forget rows, 0.5 on retain rows."""
    model, tokenizer = load_model(tiny_target[0])
    data = load_lume(synth_dir)
    config = get_method("sugd").Config()
    method = get_method("sugd")(config)
    assert (config.batch_size, config.grad_accum, config.select) == (1, 1, "none")
    for row, forget, factor in ((data.forget[0], True, -1.0), (data.retain[0], False, 0.5)):
        [example] = engine._examples(tokenizer, [row], forget, config)
        ids = tokenizer(f"{row.input} {row.output}").input_ids
        assert list(example.ids) == ids  # no EOS appended
        labels = torch.tensor(ids)
        labels[:len(tokenizer(row.input, add_special_tokens=False).input_ids)] = -100
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            expected = factor * torch.nn.functional.cross_entropy(logits[:-1], labels[1:])
            batch = Batch.of([example], tokenizer.pad_token_id, "cpu")
            loss = method.loss(model, batch, Reference())
        torch.testing.assert_close(loss, expected)


def _forget_nll(model_dir, synth_dir) -> float:
    model, tokenizer = load_model(model_dir)
    examples = engine._examples(tokenizer, load_lume(synth_dir).forget, True, TRAINED)
    with torch.no_grad():
        out = forward(model, Batch.of(examples, tokenizer.pad_token_id, "cpu"))
    return out.text_nll.mean().item()


def test_bounded_ascent_stops_forget_rows_at_the_never_seen_level(tiny_target, synth_dir,
                                                                  tmp_path, margin):
    nll = torch.tensor([1.0, 9.0], requires_grad=True)
    text_nll = torch.tensor([9.0, 1.0], requires_grad=True)
    ref = Reference()
    ref.forget_level = 6.0
    forget_term(Outputs(None, nll, torch.ones(2), text_nll), None, ref).sum().backward()
    assert nll.grad.tolist() == [-1.0, 1.0]  # below the level: ascend; above: descend
    assert text_nll.grad.tolist() == [1.0, -1.0]
    kw = dict(select="none", epochs=12, lr=1e-3, batch_size=4, seed=0, teacher="none")
    bounded = run("gd", tiny_target[0], synth_dir, tmp_path / "bounded", **kw)
    unbounded = run("gd", tiny_target[0], synth_dir, tmp_path / "unbounded",
                    forget_target="none", **kw)
    model, tokenizer = load_model(tiny_target[0])
    split = calibration_split(load_mia(synth_dir / "mia"), 0.3, 0, load_lume(synth_dir), model,
                              tokenizer)
    level = never_seen_level(model, tokenizer, split[0])
    assert bounded["forget_level"] == pytest.approx(level, abs=0.01)
    assert unbounded["forget_level"] is None
    after = {name: _forget_nll(tmp_path / name, synth_dir) for name in ("bounded", "unbounded")}
    margin.below("|bounded forget NLL - level|", abs(after["bounded"] - level), 1.0)
    margin.above("unbounded forget NLL - level", after["unbounded"] - level, 2.0)


def test_sugd_forgets_and_keeps_the_retain_set(tiny_target, synth_dir, tmp_path, margin):
    from unlearn.evaluation.scoring import evaluate
    # the small profile of a target without a kept base (the level, 7 epochs); with the tiny
    # target's base as teacher, its profile leaves forget regurgitation at 0.35 here
    run("sugd", tiny_target[0], synth_dir, tmp_path / "u", mia=None, seed=0, teacher="none",
        epochs=7, lr=1e-3, positive_factor=0.5, anchor_weight=0.0)
    results = evaluate(tmp_path / "u", synth_dir)
    forget, retain = results["forget-set"], results["retain-set"]
    margin.below("forget regurgitation", forget["overall-regurgitation-score"], 0.3)
    # measured 0.80 to 0.88 over three seeds and two precisions (tests/MARGINS.md)
    margin.above("retain regurgitation", retain["overall-regurgitation-score"], 0.75)


def test_sugd_fresh_optimizer_per_chunk(tiny_target, synth_dir, tmp_path, monkeypatch):
    cleared = []
    original = training.Trainer.run

    def spy(self, progress, loss_fn, after_epoch=None, *hooks, **named_hooks):
        state = self.optimizer.state

        def watch(index, record):
            adam_steps = {int(v["step"]) for v in state.values()}
            cleared.append((record["stage"], adam_steps, len(record["step_losses"])))
            return after_epoch(index, record) if after_epoch else False
        return original(self, progress, loss_fn, watch, *hooks, **named_hooks)

    monkeypatch.setattr(training.Trainer, "run", spy)
    run("sugd", tiny_target[0], synth_dir, tmp_path / "u", mia=None, chunk_size=6, epochs=1)
    assert [s for s, _, _ in cleared] == list(range(len(cleared))) and len(cleared) > 2
    # Adam's step count restarts with every chunk: it equals that chunk's steps, not the total
    assert all(adam == {steps} for _, adam, steps in cleared), cleared


def test_last_k_layers_full_fine_tuning_touches_nothing_else(tiny_target, synth_dir, tmp_path):
    run("gd", tiny_target[0], synth_dir, tmp_path / "u", layers="last:1", modules="mlp", **FAST)
    after, original = _state(tmp_path / "u"), _state(tiny_target[0])
    changed = {k for k in original if not torch.equal(after[k], original[k])}
    assert changed and all(k.startswith("model.layers.3.mlp.") for k in changed), changed


def test_a_layer_slice_trains_every_layer_but_the_last_ones(tiny_target, synth_dir, tmp_path):
    # SHA256's small profile with a teacher trains the MLPs of layers 0:-2, at any depth
    config, _ = resolve_config(get_method("sha256"), tiny_target[0], "auto")
    assert (config.layers, config.teacher, config.modules) == ("0:-2", "auto", "mlp")
    run("gd", tiny_target[0], synth_dir, tmp_path / "u", layers="0:-2", modules="mlp", **FAST)
    after, original = _state(tmp_path / "u"), _state(tiny_target[0])
    changed = {int(k.split(".")[2]) for k in original if not torch.equal(after[k], original[k])}
    assert changed == {0, 1}  # the tiny target's 4 layers but the last two
    with pytest.raises(ValueError, match=re.escape("layers=0:-4: no layer of the model's 4")):
        run("gd", tiny_target[0], synth_dir, tmp_path / "none", layers="0:-4", **FAST)
    assert not (tmp_path / "none").exists()


def test_sugd_paper_trains_outside_the_decoder_layers_as_its_code_does(tiny_target):
    """SUGD's notebook freezes decoder layers below the last k and nothing else: embeddings,
    final norm and head train (bench/fidelity.py matches their losses only so)."""
    paper, _ = resolve_config(get_method("sugd"), tiny_target[0], "paper", layers="last:2")
    small, _ = resolve_config(get_method("sugd"), tiny_target[0], "small")
    assert paper.train_outside and not small.train_outside
    for config, outside in ((paper, True), (small, False)):
        model = select_parameters(load_model(tiny_target[0])[0], config)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {n.split(".")[2] for n in trained if n.startswith("model.layers.")} == {"2", "3"}
        # OLMo's norms have no weights; the head is tied to the embeddings here
        assert ("model.embed_tokens.weight" in trained) is outside, trained
    lora = select_parameters(load_model(tiny_target[0])[0], paper.override(lora=True))
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_lora_trains_adapters_only_and_saves_a_merged_model(tiny_target, synth_dir, tmp_path):
    record = run("sugd", tiny_target[0], synth_dir, tmp_path / "u", mia=None, lora=True,
                 layers="last:2", epochs=1)
    after, original = _state(tmp_path / "u"), _state(tiny_target[0])
    assert set(after) == set(original)  # merged: no adapter weights left
    changed = {k for k in original if not torch.equal(after[k], original[k])}
    assert changed and all(k.split(".")[2] in ("2", "3") for k in changed), changed
    assert all(any(t in k for t in ("q_proj", "v_proj", "up_proj", "down_proj")) for k in changed)
    # rank-16 A and B matrices of q, v, up and down in each of the two layers
    config = AutoConfig.from_pretrained(tiny_target[0])
    h, i = config.hidden_size, config.intermediate_size
    kv = h // config.num_attention_heads * config.num_key_value_heads
    assert record["trainable_parameters"] == 2 * 16 * ((h + h) + (h + kv) + 2 * (h + i))


def test_gradient_accumulation_gives_the_same_update(tiny_target, synth_dir, tmp_path):
    run("gd", tiny_target[0], synth_dir, tmp_path / "a", mia=None, epochs=1, batch_size=4,
        grad_accum=1, precision="fp32")
    run("gd", tiny_target[0], synth_dir, tmp_path / "b", mia=None, epochs=1, batch_size=2,
        grad_accum=2, precision="fp32")
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_bf16_runs_where_asked_while_auto_stays_fp32_in_this_suite(tiny_target, synth_dir,
                                                                   tmp_path):
    from conftest import SUITE_PRECISION
    # conftest's fixture: thresholds are fp32's, unless bench/margins.py asks for bf16
    assert resolve_precision("auto") == SUITE_PRECISION
    kw = dict(mia=None, epochs=1, batch_size=4, lr=1e-3, select="none")
    records = [run("gd", tiny_target[0], synth_dir, tmp_path / p, precision=p, **kw)
               for p in ("fp32", "bf16")]
    assert [r["mixed_precision"] for r in records] == ["no", "bf16"]  # run.json says which
    fp32, bf16, source = (_state(tmp_path / "fp32"), _state(tmp_path / "bf16"),
                          _state(tiny_target[0]))
    assert any(not torch.equal(bf16[k], source[k]) for k in source)  # it trained
    assert any(not torch.equal(bf16[k], fp32[k]) for k in fp32)  # with matmuls in bf16


def test_an_output_keeps_its_source_dtype_unless_asked(tiny_target, synth_dir, tmp_path):
    model, tokenizer = load_model(tiny_target[0])
    source = tmp_path / "bf16"  # a checkpoint saved in bf16, as real ones are
    model.to(torch.bfloat16).save_pretrained(source)
    tokenizer.save_pretrained(source)
    run("gd", source, synth_dir, tmp_path / "same", **FAST)
    run("gd", source, synth_dir, tmp_path / "fp32", **FAST, output_dtype="fp32")
    run("merge", source, synth_dir, tmp_path / "merged", **FAST, layers="last:1")

    def dtypes(directory):
        return {v.dtype for v in load_file(directory / "model.safetensors").values()}

    assert dtypes(source) == dtypes(tmp_path / "same") == dtypes(tmp_path / "merged") == {
        torch.bfloat16}
    assert dtypes(tmp_path / "fp32") == {torch.float32}


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32),
                                              ("bf16", torch.bfloat16)])
def test_references_and_teachers_load_in_the_compute_dtype(tiny_target, precision, dtype):
    accelerator = make_accelerator(precision)
    ref = Reference(("logits", "teacher"))
    ref.load_frozen_copy(accelerator, tiny_target[0], lora=False)
    ref.load_teacher(accelerator, tiny_target[0] / "base")
    assert ref.frozen.dtype == ref.teacher.dtype == dtype


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_recomputes_and_gives_the_same_update(tiny_target, synth_dir,
                                                                     tmp_path, monkeypatch, lora):
    forwards, load = [], engine.load_model

    def counting_load(*args, **kwargs):  # counts calls of layer 0's MLP (hooks skip recomputes)
        lm, tokenizer = load(*args, **kwargs)
        mlp = decoder_layers(lm)[0].mlp
        mlp.forward = lambda *a, f=mlp.forward, **k: forwards.append(1) or f(*a, **k)
        return lm, tokenizer

    monkeypatch.setattr(engine, "load_model", counting_load)
    kw = dict(epochs=1, precision="fp32", lora=lora, lr=1e-3)
    run("gd", tiny_target[0], synth_dir, tmp_path / "plain", mia=None, **kw)
    plain = len(forwards)
    run("gd", tiny_target[0], synth_dir, tmp_path / "ckpt", mia=None, gradient_checkpointing=True,
        **kw)
    assert len(forwards) - plain == 2 * plain  # each layer runs again in the backward pass
    a, b = _state(tmp_path / "plain"), _state(tmp_path / "ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def _interrupted_run(monkeypatch, steps: int, method: str, *args, **kwargs) -> None:
    """``run`` killed as it starts its ``steps``-th optimizer step, with a checkpoint after every
    epoch before that."""
    monkeypatch.setenv("UNLEARN_CHECKPOINT_MINUTES", "0")
    original, calls = training.Trainer.step, {"n": 0}

    def crashing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == steps:
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(training.Trainer, "step", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(method, *args, **kwargs)
    monkeypatch.setattr(training.Trainer, "step", original)


def test_killed_run_resumes_to_the_same_result(tiny_target, synth_dir, tmp_path, monkeypatch):
    kw = dict(seed=3, epochs=1, chunk_size=3, lora=True)  # as the authors ran it
    run("sugd", tiny_target[0], synth_dir, tmp_path / "a", **kw)
    _interrupted_run(monkeypatch, 5, "sugd", tiny_target[0], synth_dir, tmp_path / "b", **kw)
    assert not (tmp_path / "b").exists()
    checkpoint = tmp_path / ".b.partial" / "checkpoint"
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:
        kept = list(weights.keys())  # the LoRA adapters: all a resume needs
    assert kept and all("lora_" in k for k in kept)
    run("sugd", tiny_target[0], synth_dir, tmp_path / "b", **kw)
    # selection is on (the data has an MIA set): its trail carries over the interruption
    trails = [json.loads((tmp_path / d / "run.json").read_text())["selection"]["trail"]
              for d in "ab"]
    assert [t["estimate"] for t in trails[0]] == [t["estimate"] for t in trails[1]]
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


class _Planted:
    """A pickle that, when loaded with code execution allowed, makes a directory."""

    def __init__(self, where):
        self.where = str(where)

    def __reduce__(self):
        return (os.mkdir, (self.where,))


def test_a_pickle_planted_in_a_checkpoint_never_runs(tiny_target, synth_dir, tmp_path,
                                                      monkeypatch):
    _interrupted_run(monkeypatch, 20, "gd", tiny_target[0], synth_dir, tmp_path / "b",
                     mia=None, epochs=5, batch_size=4)
    checkpoint = tmp_path / ".b.partial" / "checkpoint"
    files = [p.name for p in checkpoint.iterdir()]
    assert "model.safetensors" in files and not any(f.endswith(".pkl") and "custom" in f
                                                    for f in files)
    for name in files + ["pytorch_model.bin", "custom_checkpoint_0.pkl"]:
        if name.endswith((".bin", ".pkl", ".safetensors")):
            (checkpoint / name).write_bytes(pickle.dumps(_Planted(tmp_path / "ran")))
    with pytest.raises(ValueError, match="cannot be read safely"):
        run("gd", tiny_target[0], synth_dir, tmp_path / "b", mia=None, epochs=5, batch_size=4)
    assert not (tmp_path / "ran").exists()


def test_nan_loss_stops_with_the_last_good_model(tiny_target, synth_dir, tmp_path, monkeypatch):
    method = get_method("gd")
    calls = {"n": 0}
    real_loss = method.loss

    def poisoned(self, model, batch, ref):
        calls["n"] += 1
        loss = real_loss(self, model, batch, ref)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(method, "loss", poisoned)
    with pytest.raises(FloatingPointError, match="loss became nan"):
        run("gd", tiny_target[0], synth_dir, tmp_path / "u", mia=None, epochs=2, batch_size=2)
    saved = json.loads((tmp_path / "u" / "run.json").read_text())
    assert saved["status"].startswith("gd (epoch 0): loss became nan")
    state = _state(tmp_path / "u")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_weights_made_nan_by_an_update_are_not_kept(tiny_target, synth_dir, tmp_path,
                                                     monkeypatch):
    """The loss is only seen to be NaN a step after the update that broke the weights: the
    model saved must be the one from before that update, not the broken one."""
    real_step, after_first = torch.optim.AdamW.step, []

    def breaking(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        params = [p for group in self.param_groups for p in group["params"]]
        if not after_first:
            after_first.extend(p.detach().clone() for p in params)
        else:
            for p in params:
                p.data.fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", breaking)
    with pytest.raises(FloatingPointError, match="loss became nan"):
        run("gd", tiny_target[0], synth_dir, tmp_path / "u", mia=None, epochs=2, batch_size=2)
    saved = list(_state(tmp_path / "u").values())
    assert all(torch.isfinite(v).all() for v in saved)
    assert all(any(v.shape == t.shape and torch.equal(v, t) for v in saved) for t in after_first)


def test_settings_of_the_wrong_type_or_range_are_refused_by_name():
    config = get_method("sugd").Config()
    for given, says in [(dict(lr="abc"), "lr=abc: expected a number"),
                        (dict(epochs="1.5"), "epochs=1.5: expected a whole number"),
                        (dict(epochs=1.5), "epochs=1.5: expected a whole number"),
                        (dict(lora="maybe"), "lora=maybe: expected true or false"),
                        (dict(layers="last:abc"), "layers=last:abc: use all, last:K"),
                        (dict(layers=5), "layers=5: expected text"),
                        (dict(lr="inf"), "lr=inf: must be a finite number"),
                        (dict(max_grad_norm="-1"), "max_grad_norm=-1.0: must be at least 0"),
                        (dict(retain_weight=-0.5), "retain_weight=-0.5: must be at least 0"),
                        (dict(positive_factor="-1"), "positive_factor=-1.0: must be at least 0"),
                        (dict(schedule="nosuch"), "schedule=nosuch: use one of"),
                        (dict(warmup_ratio="1"), "warmup_ratio=1.0: must be at least 0 and")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            config.override(**given)
    for name, given in [("npo", dict(beta="0")), ("merge", dict(density="0")),
                        ("npo_kl", dict(w_kl="-1")), ("rmu", dict(layer="-1"))]:
        with pytest.raises(ValueError, match=f"{next(iter(given))}="):
            get_method(name).Config().override(**given)


@pytest.mark.parametrize("suffix,text", [
    (".json", '\ufeff{"epochs": 2, "lr": 0.001}'),
    (".toml", "epochs = 2\nlr = 0.001\n"),
    (".yaml", "epochs: 2\nlr: 0.001\n"),
])
def test_config_files_in_json_toml_or_yaml(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text, encoding="utf-8")
    config, _ = resolve_config(get_method("gd"), tmp_path, "paper", path)
    assert (config.epochs, config.lr) == (2, 1e-3)


def test_bad_config_files_name_the_file_and_the_setting(tmp_path):
    gd = get_method("gd")
    for name, text, says in [("a.json", '{"epochs": 1.5}', "a.json: epochs=1.5: expected a whole"),
                             ("b.json", '{"layers": 5}', "b.json: layers=5: expected text"),
                             ("c.json", "[1, 2]", "c.json: expected a JSON mapping"),
                             ("d.yaml", "epochs: [", "d.yaml: not valid YAML"),
                             ("e.ini", "epochs=2", "e.ini: unknown config format")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=re.escape(says)):
            resolve_config(gd, tmp_path, "paper", tmp_path / name)
    (tmp_path / "f.json").write_bytes(b'{"epochs": 2,\n "layers": "\xff"}')
    with pytest.raises(ValueError, match=re.escape("f.json:2: not UTF-8 text")):
        resolve_config(gd, tmp_path, "paper", tmp_path / "f.json")


def test_config_resolution(tiny_target, tmp_path):
    sugd = get_method("sugd")
    paper, profile = resolve_config(sugd, tmp_path, "auto")
    assert profile == "paper" and paper.lr == 1e-5 and paper.layers == "last:8"
    small, profile = resolve_config(sugd, tiny_target[0], "auto")
    assert profile == "small" and small.layers == sugd.small_target["layers"]
    # the tiny target kept its base: the settings found with a teacher apply on top
    assert (small.teacher, small.epochs, small.lr) == ("auto", 4, 9e-4)
    # a small target without a kept base: the small profile alone (no teacher to draw to)
    (tmp_path / "no-base").mkdir()
    (tmp_path / "no-base" / "target.json").write_text(json.dumps({"from_scratch": True}))
    bare, profile = resolve_config(sugd, tmp_path / "no-base", "auto")
    assert profile == "small" and (bare.teacher, bare.epochs, bare.lr) == ("none", 7, 1e-3)
    (tmp_path / "c.toml").write_text('lr = 3e-4\nlora = true\n')
    config, _ = resolve_config(sugd, tmp_path, "paper", tmp_path / "c.toml", epochs="2")
    assert (config.lr, config.lora, config.epochs) == (3e-4, True, 2)
    with pytest.raises(ValueError, match="unknown setting"):
        resolve_config(sugd, tmp_path, "paper", chunk=3)
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")


def test_eval_every_records_scores(tiny_target, synth_dir, tmp_path):
    record = run("ga", tiny_target[0], synth_dir, tmp_path / "u", mia=None, epochs=2, batch_size=4,
                 eval_every=1)
    evals = [e["eval"] for e in record["history"]]
    assert len(evals) == 2 and all("Task1" in e["forget-set"] for e in evals)


def test_sha256_retain_weight_follows_the_paper():
    from unlearn.methods.sha256 import retain_weight
    assert retain_weight(-0.5) == 1.2 and retain_weight(0.0) == 1.2
    assert retain_weight(0.1) == 1.2  # 0.3·6^0.1 + 0.8 = 1.16, clipped up
    assert retain_weight(0.5) == 1.5  # 0.3·√6 + 0.8 = 1.53
    assert retain_weight(1.0) == 2.3  # 2.6, clipped down


def test_sha256_paper_profile_computes_a_batch_as_the_authors_code_does(tiny_target, synth_dir):
    """SHA256's code (LAB-FLAIR/Constrained-Unlearning-for-LLM, unlearn.py): −CE over all forget
    output tokens of the micro-batch + m·CE over its retain output tokens; in the first epoch
    m = 1.2 and the reference is Σ batch retain losses / Σ retain rows; later m follows ΔL."""
    from unlearn.methods.sha256 import retain_weight
    model, tokenizer = load_model(tiny_target[0])
    data = load_lume(synth_dir)
    config = get_method("sha256").Config()
    assert (config.batch_size, config.grad_accum, config.layers, config.modules) == (
        12, 10, "0-5", "mlp")
    examples = (engine._examples(tokenizer, data.forget[:2], True, config)
                + engine._examples(tokenizer, data.retain[:3], False, config))
    batch = Batch.of(examples, tokenizer.pad_token_id, "cpu")

    def token_ce(rows):  # their CrossEntropyLoss: a mean over every output token of the rows
        total, count = 0.0, 0
        for e in rows:
            labels = torch.tensor(e.ids)
            labels[:e.start] = -100
            logits = model(input_ids=torch.tensor([e.ids])).logits[0]
            total += torch.nn.functional.cross_entropy(logits[:-1], labels[1:],
                                                       reduction="sum").item()
            count += int((labels[1:] != -100).sum())
        return total / count

    method = get_method("sha256")(config)
    with torch.no_grad():
        forget, retain = token_ce(examples[:2]), token_ce(examples[2:])
        first = method.loss(model, batch, Reference()).item()
        method.start_epoch(1)
        later = method.loss(model, batch, Reference()).item()
    assert first == pytest.approx(-forget + 1.2 * retain, rel=1e-5)
    reference = retain / 3  # one batch of 3 retain rows in the first epoch
    assert later == pytest.approx(-forget + retain_weight(retain - reference) * retain, rel=1e-5)


def test_sha256_source_reference_weighs_retain_against_where_the_rows_started(tiny_target,
                                                                             synth_dir):
    """retain_reference=source: each retain row's loss under the source model, measured before
    the first step, is what a batch's retain loss is compared with, from the first epoch on;
    forget rows are not measured (SHA256 does not read them)."""
    from types import SimpleNamespace

    from unlearn.methods.sha256 import retain_weight
    source, tokenizer = load_model(tiny_target[0])
    data = load_lume(synth_dir)
    config = get_method("sha256").Config(retain_reference="source", average="rows")
    method = get_method("sha256")(config)
    forget = engine._examples(tokenizer, data.forget[:2], True, config)
    retain = engine._examples(tokenizer, data.retain[:3], False, config)
    batch = Batch.of(forget + retain, tokenizer.pad_token_id, "cpu")
    ref = Reference(method.reference)
    assert ref.rows_to_measure(forget, retain) == retain
    model = type(source)(source.config)  # a model trained away from the source
    model.load_state_dict(source.state_dict())
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
        ref.measure_rows(source, [Batch.of(retain, tokenizer.pad_token_id, "cpu")],
                         SimpleNamespace(autocast=contextlib.nullcontext))
        before = forward(source, batch).nll[2:].mean().item()
        out = forward(model, batch)
        now, forgotten = out.nll[2:].mean().item(), out.nll[:2].mean().item()
        loss = method.loss(model, batch, ref).item()  # epoch 0: no warm-up epoch
    assert sorted(ref.source_nll_sum) == [(False, e.index) for e in retain]
    m = retain_weight(now - before)
    assert m != 1.2  # the source is far enough from the model for the weight to move
    assert loss == pytest.approx(-forgotten + m * now, rel=1e-5)


def test_sha256_paper_profile_batches_and_accumulates_as_their_trainer(tiny_target, synth_dir):
    """Their DataLoader: micro-batches of 12 rows as the shuffle drew them (not each holding
    its share of forget and retain rows); their HF Trainer: each micro-batch's loss / 10,
    whatever its rows. bench/fidelity.py sha256 found the row-share weighting 1e-3 off."""
    _, tokenizer = load_model(tiny_target[0])
    data = load_lume(synth_dir)
    paper = get_method("sha256")(get_method("sha256").Config())
    assert (paper.config.micro_batches, paper.config.accumulation) == ("drawn", "micro_batches")
    forget = engine._examples(tokenizer, data.forget, True, paper.config)
    retain = engine._examples(tokenizer, data.retain, False, paper.config)
    [[step, *_], *_] = paper.stages(forget, retain, random.Random(0))[0]
    micro = paper.micro_batches(step)
    assert [e for m in micro for e in m] == step and all(len(m) == 12 for m in micro[:-1])
    small = get_method("sha256")(get_method("sha256").Config().override(
        **get_method("sha256").small_target))
    stratified = small.micro_batches(step)
    assert len(stratified) == small.config.grad_accum and stratified != micro
    assert [w for _, w in training.share([[1] * 12, [2] * 4], 1, 0, 0.1)] == [0.1, 0.1]
    assert [w for _, w in training.share([[1] * 12, [2] * 4], 1, 0)] == [0.75, 0.25]


def test_data_parallel_processes_share_real_rows_of_every_step():
    """One micro-batch a step (grad_accum=1) over two processes: each trains on half its
    rows, no process runs a weight-0 micro-batch, and the weights still add up to the
    step's; a step of fewer rows than processes is the one place a weight-0 pass remains."""
    for fixed in (None, 0.5):
        step = [list(range(5))]
        shares = [training.share(step, 2, rank, fixed) for rank in (0, 1)]
        assert [[m for m, _ in s] for s in shares] == [[[0, 2, 4]], [[1, 3]]]
        weights = [w for s in shares for _, w in s]
        assert all(w > 0 for w in weights)
        assert sum(weights) == pytest.approx(fixed or 1.0)
    even = [training.share([[0, 1], [2, 3]], 2, rank) for rank in (0, 1)]
    assert even == [[([0, 1], 0.5)], [([2, 3], 0.5)]]  # whole micro-batches when they go round
    assert training.share([[7]], 2, 1) == [([7], 0.0)]


def test_sha256_trains_only_the_mlps_of_the_traced_layers(tiny_target, synth_dir, tmp_path):
    from unlearn.tracing import locate
    trace = locate(tiny_target[0], synth_dir, tmp_path / "trace", samples=2, share=0.3)
    record = run("sha256", tiny_target[0], synth_dir, tmp_path / "u", mia=None, layers="auto",
                 trace=str(tmp_path / "trace"), epochs=2, validation=str(synth_dir))
    after, original = _state(tmp_path / "u"), _state(tiny_target[0])
    changed = {k for k in original if not torch.equal(after[k], original[k])}
    assert changed
    assert {int(k.split(".")[2]) for k in changed} <= set(trace["layers_chosen"])
    assert all(".mlp." in k for k in changed)
    losses = [e["validation_loss"] for e in record["history"]]
    assert len(losses) == 2 and record["best_epoch"] == losses.index(min(losses))


def test_validation_keeps_the_best_epochs_weights_not_the_last(tiny_target, synth_dir, tmp_path,
                                                               monkeypatch):
    kw = dict(FAST, epochs=2)
    last = _state(run("gd", tiny_target[0], synth_dir, tmp_path / "last", **kw) and
                  tmp_path / "last")
    scripted = iter([-1.0, 0.0])  # by this measure the first epoch is the best
    monkeypatch.setattr(engine, "_validation_loss", lambda *a: lambda model: next(scripted))
    record = run("gd", tiny_target[0], synth_dir, tmp_path / "kept", validation=str(synth_dir),
                 **kw)
    assert record["best_epoch"] == 0
    kept, source = _state(tmp_path / "kept"), _state(tiny_target[0])
    assert any(not torch.equal(kept[k], last[k]) for k in kept)  # not the last epoch's ...
    assert any(not torch.equal(kept[k], source[k]) for k in kept)  # ... nor the source's


def test_rmu_trains_only_down_projections_and_steers_forget_activations(tiny_target, synth_dir,
                                                                        tmp_path, margin):
    run("rmu", tiny_target[0], synth_dir, tmp_path / "u", mia=None, layer=2, layers="1-2", epochs=2)
    after, original = _state(tmp_path / "u"), _state(tiny_target[0])
    changed = {k for k in original if not torch.equal(after[k], original[k])}
    assert changed == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    # the forget rows' hidden state after layer 2 has moved toward the steering target c·u
    rmu = get_method("rmu")(get_method("rmu").Config(layer=2))

    def distance_to_control(directory):
        model, tokenizer = load_model(directory)
        batch = Batch.of(engine._examples(tokenizer, load_lume(synth_dir).forget, True,
                                          TRAINED.override(max_len=256)),
                         tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            hidden = model(input_ids=batch.ids, attention_mask=batch.mask,
                           output_hidden_states=True).hidden_states[3]
        output = batch.labels != -100
        return (hidden[output] - rmu.control(hidden.shape[-1], "cpu")).norm(dim=-1).mean()

    margin.below("distance to c·u after / before", distance_to_control(tmp_path / "u")
                 / distance_to_control(tiny_target[0]), 0.97)


def test_merge_combines_two_adapters_with_ties_or_linear(tiny_target, synth_dir, tmp_path):
    kw = dict(epochs=1, batch_size=4, layers="last:2")
    ties = run("merge", tiny_target[0], synth_dir, tmp_path / "ties", mia=None, **kw)
    run("merge", tiny_target[0], synth_dir, tmp_path / "linear", mia=None, combination="linear",
        **kw)
    assert set(ties["adapters"]) == {"a", "b"}
    assert ties["adapters"]["a"]["config"]["w_npo"] == 0.4
    assert ties["adapters"]["b"]["config"]["w_ce"] == 0.4
    # what `unlearn run` prints and bench/scale.py reads of every run, a merge has too
    assert ties["steps"] >= ties["steps_trained"] > 0 and ties["memory_plan"]["peak_mb"] > 0
    a, b, original = _state(tmp_path / "ties"), _state(tmp_path / "linear"), _state(tiny_target[0])
    assert set(a) == set(original)  # merged into plain weights
    changed = [k for k in original if not torch.equal(a[k], original[k])]
    assert changed and any(not torch.equal(a[k], b[k]) for k in changed)
    assert not list(tmp_path.glob(".ties.adapter-*"))  # the halves are cleaned up


def _random_adapter(model_dir, out, seed):
    """A LoRA adapter with random A and B (a trained one's stand-in): its delta is not zero."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    model, _ = load_model(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.mark.parametrize("combination", ["ties", "linear"])
def test_merge_combines_both_adapters_symmetrically(tiny_target, tmp_path, combination):
    """Both halves count: the merge of (a, b) changes when b alone changes, and with equal
    weights it is the merge of (b, a). A merge that ignored either adapter fails one of these."""
    from unlearn.methods.merge import Merge, MergeConfig
    merge = Merge(MergeConfig(combination=combination))

    def merged(first, second, name):
        halves = {"a": _random_adapter(tiny_target[0], tmp_path / f"{name}-a", first),
                  "b": _random_adapter(tiny_target[0], tmp_path / f"{name}-b", second)}
        merge._merge_and_save(tiny_target[0], halves, tmp_path / name, {"method": "merge"})
        assert not any(path.exists() for path in halves.values())  # the halves are gone
        return _state(tmp_path / name)

    ab, ba, ac = merged(1, 2, "ab"), merged(2, 1, "ba"), merged(1, 3, "ac")
    original = _state(tiny_target[0])
    down = [k for k in original if "down_proj" in k]
    assert down and all(not torch.equal(ab[k], original[k]) for k in down)
    assert all(torch.allclose(ab[k], ba[k], atol=1e-6) for k in ab)
    assert all(not torch.allclose(ab[k], ac[k]) for k in down)
    assert all(torch.equal(ab[k], original[k]) for k in original if k not in down)


def test_mean_over_ignores_unselected_rows_even_when_undefined():
    from unlearn.methods.losses import mean_over
    values = torch.tensor([float("nan"), 2.0, 4.0], requires_grad=True)
    assert mean_over(values, torch.tensor([False, True, True])).item() == 3.0
    # a batch of retain rows only: NPO's forget term is 0, not NaN from undefined ratios
    none = mean_over(values, torch.tensor([False, False, False]))
    assert none.item() == 0.0 and none.requires_grad


def test_npo_gradient_stays_finite_when_retain_rows_outnumber_forget_rows(tiny_target):
    from unlearn.methods.base import Example
    from unlearn.methods.losses import Reference
    from unlearn.methods.npo import NPO, NPOConfig
    model, tokenizer = load_model(tiny_target[0])
    ids = tuple(tokenizer("Alice was born in Paris.").input_ids)
    # retain row 7 has no forget row 7: its reference value must not be undefined (NaN)
    batch = Batch.of([Example(ids, 2, True, 0), Example(ids, 2, False, 7)],
                     tokenizer.pad_token_id, "cpu")
    reference = Reference()
    reference.source_nll_sum[True, 0] = 5.0
    model.train()
    NPO(NPOConfig()).loss(model, batch, reference).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bounded_ascent_follows_never_seen_text_from_check_to_check(tiny_target, synth_dir,
                                                                    tmp_path, monkeypatch):
    from unlearn.methods import gd
    seen = []

    def recording(out, batch, ref):
        seen.append(ref.forget_level)
        return forget_term(out, batch, ref)
    monkeypatch.setattr(gd, "forget_term", recording)
    record = run("gd", tiny_target[0], synth_dir, tmp_path / "u", select="score",
                 select_every=2, select_patience=0, epochs=2, lr=1e-3, batch_size=4,
                 teacher="none")
    trail = record["selection"]["trail"]
    # the level each check measured is aimed at until the next check (the last one's is unused)
    assert list(dict.fromkeys(seen)) == [t["nonmember_nll"] for t in trail[:-1]]
    assert len(trail) > 2 and record["forget_level"] == pytest.approx(trail[0]["nonmember_nll"],
                                                                      abs=0.01)


def test_anchor_passages_are_seeded_and_the_hold_starts_at_zero(tiny_target):
    model, tokenizer = load_model(tiny_target[0])
    passages = sample_passages(model, tokenizer, 8, seed=1)
    assert passages == sample_passages(model, tokenizer, 8, seed=1)
    assert passages != sample_passages(model, tokenizer, 8, seed=2)
    assert all(p[0] == tokenizer.eos_token_id and tokenizer.eos_token_id not in p[1:]
               for p in passages)
    anchor = Anchor.measure(model, passages, tokenizer.pad_token_id)
    assert anchor.term(model, "cpu").item() == 0.0  # nothing has risen yet
    with torch.no_grad():  # damage every text alike: flatten the output distribution
        model.lm_head.weight.mul_(0.2)
    assert anchor.term(model, "cpu").item() > 0.1


def test_the_anchor_holds_general_text_against_ascent(tiny_target, synth_dir, tmp_path, margin):
    model, tokenizer = load_model(tiny_target[0])
    passages = sample_passages(model, tokenizer, 32, seed=0)  # the run's own, by its seed

    def rise(weight):
        out = tmp_path / f"w{weight}"
        run("ga", tiny_target[0], synth_dir, out, epochs=3, lr=3e-3, batch_size=4, mia=None,
            forget_target="none", anchor_weight=weight)
        after = load_model(out)[0]
        return Anchor.measure(after, passages, tokenizer.pad_token_id).start_nll.mean() \
            - Anchor.measure(model, passages, tokenizer.pad_token_id).start_nll.mean()

    free, held = rise(0), rise(5)
    margin.above("passage NLL rise without the anchor", free, 0.5)  # all text less likely
    margin.below("rise with / without the anchor", held / free, 0.5)


def test_training_curves_go_to_tensorboard_in_the_output(tiny_target, synth_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    # with the synthetic MIA set: selection checks, logged too
    record = run("gd", tiny_target[0], synth_dir, tmp_path / "u", epochs=2, batch_size=4)
    logs = [p.parent for p in (tmp_path / "u" / "logs").rglob("events.out.tfevents.*")]
    assert logs, "no TensorBoard event file in OUT/logs"
    events = EventAccumulator(str(logs[0]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_second", "epoch/loss"} <= tags
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([x for e in record["history"] for x in e["step_losses"]])
    assert any(t.startswith("selection/") for t in tags)  # every selection check
    run("gd", tiny_target[0], synth_dir, tmp_path / "quiet", report_to="none",
        **dict(FAST, epochs=1))
    assert not (tmp_path / "quiet" / "logs").exists()


def _teacher_kl(model_dir, teacher_dir, synth_dir) -> float:
    """Mean KL(teacher ‖ model) per token over the forget rows' whole text."""
    model, tokenizer = load_model(model_dir)
    teacher = load_model(teacher_dir)[0]
    batch = Batch.of(engine._examples(tokenizer, load_lume(synth_dir).forget, True, TRAINED),
                     tokenizer.pad_token_id, "cpu")
    ref = Reference(("teacher",))
    ref.teacher, ref.teacher_floor = teacher, False
    with torch.no_grad():
        return ref.teacher_term(forward(model, batch), batch).mean().item()


def test_a_target_keeps_its_base_and_a_run_draws_forget_rows_to_it(tiny_target, synth_dir,
                                                                    tmp_path, margin):
    from unlearn.models.loading import ModelError, teacher_of
    target, record = tiny_target
    assert record["base"] == "base" and (target / "base" / "config.json").is_file()
    assert teacher_of(target) == target / "base"  # auto: the base it memorised from
    assert teacher_of(target, "none") is None and teacher_of(target / "base") is None
    with pytest.raises(ModelError, match="nowhere: teacher model directory not found"):
        teacher_of(target, "nowhere")
    before = _teacher_kl(target, target / "base", synth_dir)
    kw = dict(mia=None, epochs=3, lr=1e-3, batch_size=4, seed=0)
    drawn = run("gd", target, synth_dir, tmp_path / "drawn", teacher="auto", **kw)
    assert drawn["teacher"] == str(target / "base") and drawn["forget_level"] is None
    run("gd", target, synth_dir, tmp_path / "ascended", teacher="none", **kw)
    after = {name: _teacher_kl(tmp_path / name, target / "base", synth_dir)
             for name in ("drawn", "ascended")}
    # the teacher's term draws the rows to the base; ascent drives them elsewhere (measured:
    # 6.2 nats per token before, 1.5 drawn, 4.4 ascended)
    margin.below("teacher KL drawn / before", after["drawn"] / before, 0.5)
    margin.above("teacher KL ascended / before", after["ascended"] / before, 0.5)


def test_a_teacher_of_another_vocabulary_or_that_nothing_reads_is_refused(tiny_target, synth_dir,
                                                                         tmp_path):
    from unlearn.models.loading import ModelError
    model, tokenizer = load_model(tiny_target[0])
    config = AutoConfig.for_model("olmo", vocab_size=model.config.vocab_size + 8, hidden_size=32,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    other = type(model)(config)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(ModelError, match=r"teacher's vocabulary \(\d+\) differs"):
        run("gd", tiny_target[0], synth_dir, tmp_path / "u", mia=None, epochs=1,
            teacher=str(tmp_path / "other"))
    assert not (tmp_path / "u").exists() and not (tmp_path / ".u.partial").exists()
    base = str(tiny_target[0] / "base")
    for method, settings in (("npo", {}), ("gd", {"forget_target": "none"})):
        with pytest.raises(ValueError, match=r"only ga, gd, kl, sha256, sugd with forget_targ"):
            run(method, tiny_target[0], synth_dir, tmp_path / "u", mia=None, epochs=1,
                teacher=base, **settings)
