import json

import pytest

from unlearn.cli import main
from unlearn.data import load_lume


def test_synth_then_check(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--docs-per-task", "4"]) == 0
    assert main(["data", "check", str(tmp_path / "d")]) == 0
    counts = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert counts["forget"]["Task2/qa"] == 10
    assert counts["never_seen"] == {"Task1": 19, "Task2": 19, "Task3": 19}


def test_errors_are_one_clear_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "forget.jsonl").write_text('{"id": "a sc1"}\n')
    (tmp_path / "retain.jsonl").write_text("")
    assert main(["data", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unlearn data: error: ")
    assert "forget.jsonl:1: missing column(s) input, output, task" in err
    assert "retain set must not be empty" in err
    assert main(["target", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m"),
                 "--preset", "tiny"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_target_settings_must_be_key_value(tmp_path, capsys, synth_dir):
    assert main(["target", "--data", str(synth_dir), "--out", str(tmp_path / "m"),
                 "--preset", "tiny", "epochs"]) == 2
    assert "not key=value" in capsys.readouterr().err


def _subcommands(parser):
    """``(name, parser)`` for every command and sub-command."""
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", p) for n, p in _subcommands(sub))


def test_every_option_says_what_it_does_and_its_default():
    from unlearn.cli import parser
    from unlearn.methods import METHODS
    commands = dict(_subcommands(parser()))
    assert {"data import", "run", "bench", "audit", "eval"} <= set(commands)
    for name, sub in commands.items():
        shown = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.dest in ("help", "command", "data_command"):
                continue
            assert action.help, f"unlearn {name} {action.option_strings}: no help line"
            has_default = action.default is not None and action.default is not False
            if action.option_strings and has_default and "default" not in action.help:
                assert f"(default: {action.default})" in shown, (name, action.dest)
    run_help = commands["run"].format_help()
    assert all(f"  {method} " in run_help for method in METHODS)  # every method, one line
    assert "positive_ratio=7" in run_help and "steering_coeff=20.0" in run_help
    assert "trains three models" in " ".join(commands["bench"].format_help().split())
    assert parser().epilog.count("unlearn ") >= 3


def test_import_then_check_your_own_documents(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "alice.txt").write_text("Alice lives at 12 Elm Road and her phone is 555 123 4567.")
    (tmp_path / "retain.jsonl").write_text('{"text": "Paris is the capital of France."}\n')
    assert main(["data", "import", "--forget", str(docs), "--retain",
                 str(tmp_path / "retain.jsonl"), "--out", str(tmp_path / "d")]) == 0
    assert "no mia/" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "d")]) == 0
    assert '"custom/sc": 1' in capsys.readouterr().out


def test_target_oracle_retrains_the_base_on_the_retain_rows_alone(tmp_path, tiny_target,
                                                                  synth_dir):
    base = tiny_target[0] / "base"
    assert main(["target", "--data", str(synth_dir), "--out", str(tmp_path / "exact"),
                 "--init", str(base), "--oracle", "--pretrain", "none", "--mmlu", "none",
                 "--preset", "tiny", "epochs=1"]) == 0
    made = json.loads((tmp_path / "exact" / "target.json").read_text())
    assert made["oracle"] is True and made["base"] == str(base.resolve())
    # the same build with the forget rows: an oracle that trained on them would match it
    assert main(["target", "--data", str(synth_dir), "--out", str(tmp_path / "full"),
                 "--init", str(base), "--pretrain", "none", "--mmlu", "none",
                 "--preset", "tiny", "epochs=1"]) == 0
    full = json.loads((tmp_path / "full" / "target.json").read_text())
    lume = load_lume(synth_dir)
    share = sum(len(r.input + r.output) for r in lume.retain) / sum(
        len(r.input + r.output) for r in lume.rows)
    assert made["tokens"] / full["tokens"] == pytest.approx(share, abs=0.1)
