import json

import pytest

from unlearn.data import load_lume
from unlearn.models import load_model
from unlearn.tracing import choose_layers, facts_from, locate
from unlearn.tracing.trace import GROUPS, encode, position_groups


def test_facts_are_rewritten_with_the_name_as_subject(synth_dir):
    facts = facts_from(load_lume(synth_dir).rows)
    assert len(facts) == 30  # 6 Task2 people, 5 questions each
    assert all(f.prompt.startswith("What is " + f.subject + "'s ") for f in facts)
    assert not any(" of " + f.subject in f.prompt for f in facts)


def test_position_groups_take_the_last_subject_token_at_its_end():
    groups = position_groups(10, (3, 6))
    assert groups["first subject token"] == [3] and groups["last subject token"] == [5]
    assert groups["middle subject tokens"] == [4] and groups["before subject"] == [0, 1, 2]
    assert groups["after subject"] == [6, 7, 8] and groups["last token"] == [9]


def test_subject_span_covers_the_name(tiny_target, synth_dir):
    _, tokenizer = load_model(tiny_target[0])
    fact = facts_from(load_lume(synth_dir).rows)[0]
    enc = encode(tokenizer, fact)
    s, e = enc.subject
    assert tokenizer.decode(enc.ids[0, s:e]).strip() == fact.subject


def test_layer_choice_finds_a_known_peak():
    effect = [0.0, 0.01, 0.02, 0.30, 0.40, 0.20, 0.02, 0.0, -0.05, 0.0]
    assert choose_layers(effect, share=0.6) == [3, 4]  # 0.70 of 0.95
    assert choose_layers(effect, share=0.9) == [3, 4, 5]  # 0.90 of 0.95
    assert choose_layers(effect, share=0.97) == [2, 3, 4, 5, 6]
    assert choose_layers(effect, share=0.3) == [4]
    assert choose_layers([0.0, -1.0], share=0.6) == [0, 1]  # no positive effect: all layers


def test_locate_writes_a_trace_and_heatmaps(tiny_target, synth_dir, tmp_path):
    record = locate(tiny_target[0], synth_dir, tmp_path / "t", samples=3)
    saved = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert saved["facts_used"] + saved["facts_skipped"] == 30 and saved["facts_used"] > 10
    assert saved["clean_probability"] > saved["corrupted_probability"]
    for kind in ("mlp", "attn", "residual"):
        assert (tmp_path / "t" / f"{kind}.png").stat().st_size > 1000
        effects = saved["indirect_effect"][kind]
        assert len(effects) == len(GROUPS) and len(effects[0]) == 4
    # restoring the whole residual stream at the last token of the last layer restores the
    # clean prediction entirely
    last = saved["indirect_effect"]["residual"][GROUPS.index("last token")][-1]
    assert last == pytest.approx(saved["clean_probability"] - saved["corrupted_probability"],
                                 abs=1e-4)
    assert record["layers_chosen"] == saved["layers_chosen"]


def test_a_model_that_knows_no_fact_is_traced_on_its_own_answers(tiny_target, synth_dir,
                                                                  tmp_path):
    """``answers="predicted"``: every fact traced on the model's own top-1 token (ROME without
    ``expect``); the clean run then gives that token the highest probability of all."""
    record = locate(tiny_target[0], synth_dir, tmp_path / "p", samples=2, max_facts=4,
                    answers="predicted")
    assert record["answers"] == "predicted"
    assert record["facts_used"] == 4 and record["facts_skipped"] == 0
    assert record["memory_plan"]["peak_mb"] > 0 and "forward" in record["memory_plan"]["parts_mb"]
    with pytest.raises(ValueError, match="answers='unknown'"):
        locate(tiny_target[0], synth_dir, tmp_path / "q", answers="unknown")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # refused before any output
