"""The README is true: its worked example runs as written, and every Python function it names
can be called."""

import json
import re
import shlex
import shutil
from pathlib import Path

import unlearn
from unlearn.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _commands(marker: str) -> list[list[str]]:
    """The ``unlearn`` commands of the README block after ``<!-- marker ... -->``, each with
    its backslash-continued lines joined."""
    block = README.split(f"<!-- {marker}", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line)[1:] for line in lines if line.startswith("unlearn ")]


def test_every_function_the_readme_names_is_callable():
    named = set(re.findall(r"\bunlearn\.([a-z_]+)\(", README))
    assert {"run", "evaluate", "audit", "bench", "import_documents"} <= named
    for name in named:
        assert callable(getattr(unlearn, name, None)), f"unlearn.{name} in README.md"


def test_the_worked_example_runs_as_written(tmp_path, monkeypatch, margin):
    """From raw text files to an unlearned model, its scores and its receipt."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    commands = _commands("worked-example")
    assert [c[0] for c in commands] == ["data", "target", "eval", "run", "eval", "audit"]
    for command in commands:
        assert main(command) == 0, command
    mine = tmp_path / "runs" / "mine"
    target = json.loads((mine / "target-eval" / "results.json").read_text())
    unlearned = json.loads((mine / "sugd-eval" / "results.json").read_text())
    # the toy target memorised its documents; SUGD took them away and kept the others
    forgotten = [r["forget-set"]["overall-regurgitation-score"] for r in (target, unlearned)]
    margin.above("target forget regurgitation", forgotten[0], 0.9)
    margin.above("forget regurgitation, target - SUGD", forgotten[0] - forgotten[1], 0.3)
    margin.above("SUGD retain regurgitation", unlearned["retain-set"][
        "overall-regurgitation-score"], 0.8)
    assert "custom" in unlearned["forget-set"] and "mia_loss_acc" in unlearned
    receipt = json.loads((mine / "receipt" / "receipt.json").read_text())
    assert receipt["summary"]["documents"] == 4


def test_the_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    block = README.split("<!-- python-example", 1)[1].split("```python\n", 1)[1].split("```")[0]
    exec(compile(block, "README.md", "exec"), {})
    final, forgotten = capsys.readouterr().out.split()[-2:]
    assert 0 <= float(final) <= 1 and 0 <= float(forgotten) <= 1
    assert (tmp_path / "runs" / "py" / "receipt" / "receipt.html").is_file()
