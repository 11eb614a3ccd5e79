import json

from unlearn.cli import main


def test_synth_then_check(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--docs-per-task", "4"]) == 0
    assert main(["data", "check", str(tmp_path / "d")]) == 0
    counts = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert counts["forget"]["Task2/qa"] == 10


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
