import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unlearn.data import DataError, load_lume, load_mia
from unlearn.evaluation import audit
from unlearn.evaluation.scoring import evaluate
from unlearn.measure import official
from unlearn.models import ModelError, load_model


def test_pii_is_found_in_any_common_formatting():
    person = audit.Person("d", {"ssn": "900514344", "phone": "5551234567",
                                "email": "Ann.Lee@example.com"}, [])
    assert audit.leaked("SSN 900-51-4344.", person) == {"ssn"}
    assert audit.leaked("ssn 900 51 4344 and (555) 123-4567", person) == {"ssn", "phone"}
    assert audit.leaked("call 555.123.4567 or ann.lee@EXAMPLE.com", person) == {"phone", "email"}
    assert audit.leaked("19005143440 and 900514345", person) == set()  # inside / other numbers


def test_forgotten_people_carry_ssn_phone_and_email(synth_dir):
    people = audit.forgotten_people(load_lume(synth_dir).rows)
    assert len(people) == 3  # 6 Task2 documents per task, half forgotten
    assert all(set(p.pii) == {"ssn", "phone", "email"} and len(p.prompts) == 6 for p in people)


def test_min_k_plus_plus_statistics_match_a_direct_computation(tiny_target):
    model, tokenizer = load_model(tiny_target[0])
    text = "A short text to score, token by token."
    stats = audit.token_statistics(model, tokenizer, [text])[0]
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        log_p = F.log_softmax(model(ids).logits[0, :-1], -1)
    t = 3
    p = log_p[t].exp()
    mu = float((p * log_p[t]).sum())
    sigma = float(((p * (log_p[t] - mu) ** 2).sum()).sqrt())
    assert stats["log_prob"][t] == pytest.approx(float(log_p[t, ids[0, t + 1]]), abs=1e-5)
    assert stats["mu"][t] == pytest.approx(mu, abs=1e-4)
    assert stats["sigma"][t] == pytest.approx(sigma, rel=1e-3)
    assert len(stats["log_prob"]) == ids.shape[1] - 1


def test_a_memorised_target_is_exposed_by_every_attack_and_leaks_pii(tiny_target, synth_dir,
                                                                      margin):
    model, tokenizer = load_model(tiny_target[0])
    lume, mia = load_lume(synth_dir), load_mia(synth_dir / "mia")
    found = audit.audit(model, tokenizer, lume, mia, samples=4, seed=0)
    assert set(found["mia"]["auc"]) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
    for attack, auc in found["mia"]["auc"].items():
        margin.above(f"{attack} MIA AUC of the target", auc, 0.8)
    assert np.mean(found["mia"]["member_loss"]) < np.mean(found["mia"]["nonmember_loss"])
    pii = found["pii"]
    assert pii["prompts"] == 18 and pii["prompts_leaking"] > 0
    again = audit.audit(model, tokenizer, lume, mia, samples=4, seed=0)["pii"]
    assert again == pii  # seeded sampling


def test_eval_with_audit_writes_a_report_and_compares_with_before(tiny_target, synth_dir,
                                                                  tmp_path):
    first = evaluate(tiny_target[0], synth_dir, tmp_path / "a", mia=synth_dir / "mia",
                     max_new_tokens=32, audit=True, samples=2)
    assert "pii" in first["audit"] and "mia" in first["audit"]
    evaluate(tiny_target[0], synth_dir, tmp_path / "b", max_new_tokens=32, audit=True, samples=2,
             before=tmp_path / "a")
    page = (tmp_path / "b" / "report.html").read_text()
    assert page.count("<img") >= 1 and "PII extraction" in page and "before" in page
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["audit"]["pii"] == first["audit"]["pii"]


def _interrupt_after_first_chunk(monkeypatch, model, data, out, **kw):
    """Run an evaluation that is interrupted once its first 4 generations are recorded, and
    mark those records (their text becomes "\rreused\r") so that reuse shows."""
    monkeypatch.setattr(official, "GENERATION_CHUNK", 4)
    real, calls = official.greedy_generate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(official, "greedy_generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, data, out, **kw)
    monkeypatch.setattr(official, "greedy_generate", real)
    partial = out.parent / f".{out.name}.partial" / "generations.partial.jsonl"
    header, *records = partial.read_text().splitlines()
    records = [json.loads(line) for line in records]
    assert len(records) == 4
    partial.write_text("\n".join([header] + [json.dumps({**r, "text": "\rreused\r"})
                                            for r in records]) + "\n")
    return {r["id"] for r in records}


def _reused(out) -> set[str]:
    lines = (out / "generations.jsonl").read_text().splitlines()
    return {r["id"] for r in map(json.loads, lines) if r["model_output"] == "\rreused\r"}


def test_resume_reuses_generations_of_the_same_model_data_and_settings(
        tiny_target, synth_dir, tmp_path, monkeypatch):
    out = tmp_path / "e"
    recorded = _interrupt_after_first_chunk(monkeypatch, tiny_target[0], synth_dir, out,
                                            max_new_tokens=16)
    evaluate(tiny_target[0], synth_dir, out, max_new_tokens=16, resume=True)
    assert _reused(out) == recorded
    assert not (tmp_path / ".e.partial").exists()
    recorded = _interrupt_after_first_chunk(monkeypatch, tiny_target[0], synth_dir, out,
                                            max_new_tokens=16)
    evaluate(tiny_target[0], synth_dir, out, max_new_tokens=16)  # no --resume: start afresh
    assert _reused(out) == set()


def test_resume_never_reuses_generations_of_another_model_or_setting(
        tiny_target, synth_dir, tmp_path, monkeypatch):
    other = tmp_path / "copy"
    shutil.copytree(tiny_target[0], other)
    out = tmp_path / "e"
    _interrupt_after_first_chunk(monkeypatch, tiny_target[0], synth_dir, out, max_new_tokens=16)
    evaluate(other, synth_dir, out, max_new_tokens=16, resume=True)
    assert _reused(out) == set()
    _interrupt_after_first_chunk(monkeypatch, tiny_target[0], synth_dir, tmp_path / "f",
                                 max_new_tokens=16)
    evaluate(tiny_target[0], synth_dir, tmp_path / "f", max_new_tokens=8, resume=True)
    assert _reused(tmp_path / "f") == set()
    changed = tmp_path / "changed"  # the same files but one forget row's expected output
    shutil.copytree(synth_dir, changed)
    lines = (changed / "forget.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    lines[0] = json.dumps({**row, "output": row["output"] + " and more"})
    (changed / "forget.jsonl").write_text("\n".join(lines) + "\n")
    _interrupt_after_first_chunk(monkeypatch, tiny_target[0], synth_dir, tmp_path / "g",
                                 max_new_tokens=16)
    evaluate(tiny_target[0], changed, tmp_path / "g", max_new_tokens=16, resume=True)
    assert _reused(tmp_path / "g") == set()


def test_bad_inputs_fail_with_one_clear_error(tiny_target, synth_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no forget"):
        evaluate(tiny_target[0], tmp_path / "empty", tmp_path / "x")
    with pytest.raises(ModelError, match="no config.json"):
        evaluate(synth_dir, synth_dir, tmp_path / "x")
    with pytest.raises(ValueError, match="results.json: not found"):
        evaluate(tiny_target[0], synth_dir, tmp_path / "x", before=tmp_path / "empty")
    assert not (tmp_path / "x").exists()
