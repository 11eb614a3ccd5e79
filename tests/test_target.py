import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unlearn import target as target_module
from unlearn.data import DataError, load_lume, load_mia
from unlearn.measure.generation import can_still_match, generate_one_by_one, greedy_generate
from unlearn.measure.metrics import knowledge
from unlearn.measure.nll import document_nll, output_nll
from unlearn.models import ModelError, load_model
from unlearn.models.tokenizer import train_tokenizer
from unlearn.target import build_target


def test_target_is_a_plain_hf_directory_that_has_memorised(tiny_target, synth_dir, margin):
    out, record = tiny_target
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "olmo"
    assert json.loads((out / "target.json").read_text())["data_hash"] == record["data_hash"]
    mem = record["memorisation"]
    knowledge = [mem[s][t]["knowledge"] for s in ("forget", "retain") for t in mem[s]]
    regurgitation = [mem[s][t]["regurgitation"] for s in ("forget", "retain") for t in mem[s]]
    assert min(knowledge) == 1.0 and min(regurgitation) >= 0.9, mem
    # the corpus lowered the loss of never-seen documents below a random guess (ln 1024 = 6.9)
    margin.below("never-seen NLL after pretraining", record["after_pretrain"]["nonmember_nll"],
                 6.5)
    assert mem["mia"]["member_nll"] < mem["mia"]["nonmember_nll"]
    row = load_lume(synth_dir).retain[1]  # a question the target should answer
    ids = tokenizer(row.input, return_tensors="pt").input_ids
    assert set(record["epochs"]) == {"pretrain", "memorise"}
    assert not list(out.parent.glob(".target.partial"))  # staging removed
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2


def test_tokenizer_does_not_favour_the_documents_it_will_memorise(tiny_target, synth_dir,
                                                                  margin):
    tokenizer = AutoTokenizer.from_pretrained(tiny_target[0])
    def chars_per_token(name):
        docs = [json.loads(line)["document"]
                for line in (synth_dir / "mia" / f"{name}.jsonl").read_text().splitlines()]
        return sum(map(len, docs)) / sum(len(tokenizer(d).input_ids) for d in docs)
    # fitted on the corpus only, members and never-seen documents compress alike (here 1.09x,
    # three documents a side); fitted on the task rows as well, members compressed 1.5x better
    # and gave the MIA away before any training
    margin.below("characters per token, member / never-seen",
                 chars_per_token("member") / chars_per_token("nonmember"), 1.2)
    # and after pretraining alone, members look like any unseen document
    before = tiny_target[1]["after_pretrain"]
    margin.below("|member - never-seen NLL| after pretraining",
                 abs(before["member_nll"] - before["nonmember_nll"]), 0.3)


def test_batched_greedy_equals_one_row_at_a_time(tiny_target, synth_dir):
    model, tokenizer = load_model(tiny_target[0])
    rows = load_lume(synth_dir).rows
    prompts = [r.input for r in rows] + ["Zz", "The capital of"]  # memorised and not
    answers = [r.output if r.kind == "qa" else None for r in rows] + ["no", None]
    fast = greedy_generate(model, tokenizer, prompts, max_new_tokens=40, answers=answers)
    reference = generate_one_by_one(model, tokenizer, prompts, max_new_tokens=40)
    for generation, expected, answer in zip(fast, reference, answers):
        if generation.stopped_early:  # cut short only when it could never have matched
            assert knowledge(answer, expected) == 0
            assert expected.replace(" ", "").startswith(generation.text.replace(" ", ""))
        else:
            assert generation.text == expected
    assert any(g.stopped_early for g in fast) and sum(not g.stopped_early for g in fast) > 40


def test_can_still_match_is_conservative():
    assert can_still_match("", "Madera")
    assert can_still_match(" mad", "Madera")
    assert can_still_match("Madera  ", "Madera")
    assert can_still_match("word ", "word.")  # the space may be cleaned up by the next token
    assert can_still_match("caf\ufffd", "café")  # half a UTF-8 character is not judged
    assert not can_still_match("Mad dog", "Madera")
    assert not can_still_match("Madera1", "Madera")


def test_nll_matches_hf_loss_with_masked_prompt(tiny_target, synth_dir):
    model, tokenizer = load_model(tiny_target[0])
    rows = load_lume(synth_dir).rows[:6]
    ours = output_nll(model, tokenizer, [r.input for r in rows], [r.output for r in rows])
    docs = document_nll(model, tokenizer, [r.text for r in rows])
    for r, nll, doc in zip(rows, ours, docs):
        ids = tokenizer(r.input + r.output, return_tensors="pt").input_ids
        labels = ids.clone()
        labels[:, :len(tokenizer(r.input).input_ids)] = -100
        with torch.no_grad():
            assert nll == pytest.approx(model(input_ids=ids, labels=labels).loss.item(), rel=1e-4)
            whole = tokenizer(r.text, return_tensors="pt").input_ids
            assert doc == pytest.approx(model(input_ids=whole, labels=whole).loss.item(), rel=1e-4)


def test_same_seed_same_weights_and_resume_after_crash(synth_dir, tmp_path, monkeypatch):
    kw = dict(preset="tiny", seed=5, epochs=10, pretrain_tokens=8000, check_every=100)
    build_target(synth_dir, tmp_path / "a", **kw)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()

    # crash in the middle of memorising, with a checkpoint after every epoch
    monkeypatch.setenv("UNLEARN_CHECKPOINT_MINUTES", "0")
    original_pad, calls = target_module.pad, {"n": 0}

    def crashing_pad(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 60:
            raise KeyboardInterrupt
        return original_pad(*args, **kwargs)

    monkeypatch.setattr(target_module, "pad", crashing_pad)
    with pytest.raises(KeyboardInterrupt):
        build_target(synth_dir, tmp_path / "b", **kw)
    assert not (tmp_path / "b").exists()  # nothing half-written at the output path
    progress = json.loads((tmp_path / ".b.partial" / "checkpoint" / "progress.json").read_text())
    assert progress["history"][-1]["name"] == "memorise" and progress["epoch"] > 0
    monkeypatch.setattr(target_module, "pad", original_pad)
    build_target(synth_dir, tmp_path / "b", **kw)
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_bad_inputs_fail_clearly(synth_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no forget.jsonl"):
        build_target(tmp_path / "empty", tmp_path / "t", preset="tiny")
    with pytest.raises(ValueError, match="unknown setting"):
        build_target(synth_dir, tmp_path / "t", preset="tiny", epochz=3)
    tok_only = tmp_path / "tok"
    train_tokenizer(["some text here"], 300).save_pretrained(tok_only)
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tok_only)
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "missing")
    assert not (tmp_path / "t").exists()


def test_init_fine_tunes_a_local_model_and_leaves_it_untouched(tiny_target, synth_dir, tmp_path):
    import hashlib

    source = tiny_target[0]

    def checksums():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(source.iterdir()) if p.is_file()}

    before = checksums()
    record = build_target(synth_dir, tmp_path / "ft", preset="tiny", init=source,
                          pretrain=None, epochs=2, check_every=100)
    assert checksums() == before
    assert record["init"] == str(source) and record["epochs"] == {"memorise": 2}
    tuned, _ = load_model(tmp_path / "ft")
    original, _ = load_model(source)
    tuned_w, source_w = (m.model.layers[0].mlp.up_proj.weight.flatten()
                         for m in (tuned, original))
    assert not torch.equal(tuned_w, source_w)  # trained, and from the source's weights:
    # two epochs move them a little; a fresh start would be unrelated (cosine near 0)
    assert torch.nn.functional.cosine_similarity(tuned_w, source_w, dim=0) > 0.9


def test_label_smoothing_keeps_a_floor_under_every_token_while_memorising(
        tiny_target, synth_dir, tmp_path, margin):
    """Memorising makes a small model certain everywhere; smoothing the labels while it
    memorises keeps probability on the tokens it does not expect, so a never-seen document's
    least likely token stays far less unlikely (averaged over a few documents: the lowest of one
    is an extreme, the noisiest figure a model gives)."""
    documents = [d.document for d in load_mia(synth_dir / "mia").nonmember[:4]]

    def lowest_log_probability(label_smoothing: float) -> float:
        out = tmp_path / f"smoothing-{label_smoothing}"
        build_target(synth_dir, out, preset="tiny", init=tiny_target[0], pretrain=None,
                     epochs=3, check_every=100, label_smoothing=label_smoothing)
        model, tokenizer = load_model(out)
        with torch.no_grad():
            lowest = [torch.log_softmax(model(tokenizer(d, return_tensors="pt").input_ids)
                                        .logits, -1).min().item() for d in documents]
        return sum(lowest) / len(lowest)

    # measured 2.1 to 3.6 nats over three seeds (tests/MARGINS.md); smoothing ignored gives 0
    margin.above("lowest log-probability, smoothed - plain",
                 lowest_log_probability(0.3) - lowest_log_probability(0.0), 1.0)


def test_answer_weight_memorises_outputs_first_and_prompts_still_count(synth_dir, tmp_path,
                                                                       margin):
    """Outputs are what regurgitation and knowledge score: weighting their tokens memorises
    them sooner, while the prompts (whole documents are MIA members) are learned all the same."""
    rows = load_lume(synth_dir).rows

    def output_and_prompt_loss(answer_weight: float) -> tuple[float, float]:
        out = tmp_path / f"weight-{answer_weight}"
        build_target(synth_dir, out, preset="tiny", pretrain=None, mmlu=None, epochs=16,
                     check_every=100, answer_weight=answer_weight)
        model, tokenizer = load_model(out)
        outputs = output_nll(model, tokenizer, [r.input for r in rows],
                             [" " + r.output for r in rows])
        prompts = document_nll(model, tokenizer, [r.input for r in rows])
        return sum(outputs) / len(outputs), sum(prompts) / len(prompts)

    plain_output, plain_prompt = output_and_prompt_loss(1.0)
    weighted_output, weighted_prompt = output_and_prompt_loss(5.0)
    # measured 0.03 to 0.34 nats over three seeds (tests/MARGINS.md); a weight ignored builds
    # the same model, seed for seed: exactly 0
    margin.above("output NLL, plain - weighted", plain_output - weighted_output, 0.01)
    # far below guessing over the tiny vocabulary
    margin.below("prompt NLL / log(vocabulary)", weighted_prompt / math.log(1024), 0.8)
