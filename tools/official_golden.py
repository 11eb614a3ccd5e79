"""Write the scorer's golden files: generations and losses chosen to tell the official numbers
apart from near misses (ROUGE-L recall from precision or F1, stemming, LCS order, exact match
after strip and lower-case, tied MIA losses), scored once by the organisers' own code.

The organisers' ``evaluate_generations.py`` is run as a separate program, unchanged, with
``--compute_metrics_only`` on the CSV files it would have written itself; MMLU prompts come from
the harness's own ``format_example``/``gen_prompt`` (``run_mmlu.py``), executed from its source.
Neither file enters this repository. Both are read from a participant's published copy of the
organisers' scripts (the copy adds ``--alphas``/``--layer_ids``, which only name the result file):

    git clone https://github.com/ArjunDosajh/Mr.Snuffleupagus-SemEval-2025-Task-4 /tmp/official
    git -C /tmp/official checkout 116bf41ab0680ee288d18d70d46d283599208cbc
    python3 -m venv /tmp/offvenv && /tmp/offvenv/bin/pip install torch==2.13.0 \\
        datasets pandas numpy rouge-score scikit-learn accelerate transformers
    python tools/official_golden.py --official /tmp/official/evaluate \\
        --python /tmp/offvenv/bin/python

``tests/test_official_golden.py`` checks the project's scorer against what this writes.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import subprocess
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "official"
HEADER = ["id", "task", "input", "expected_output", "model_output", "nll"]

# (expected, generated) per sentence-completion row: each pair separates ROUGE-L recall from
# something a scorer could mistake it for
SC_PAIRS = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on the mat", "the cat sat on the mat and then it ran far away"),  # F1 < 1
    ("the cat sat on the mat", "the cat"),  # precision 1
    ("The dogs were running quickly.", "the dog was run quick"),  # stemming
    ("cat mat dog", "dog mat cat"),  # LCS keeps order; ROUGE-1 would be 1
    ("Marta Quill, born 1987, lives at 12 Elm Road.", "Marta Quill was born in 1987 ."),
    ("a b c d e f g h", "h g f e d c b a a b"),
    ("Zoë opened the café at dawn", "Zoe opened a cafe at dawn"),  # non-ASCII dropped
    ("numbers 900-51-4344 and 555 0199", "numbers 900514344 and 555-0199"),
    ("one two three four five", ""),  # an empty generation
    ("repeated words words words", "words"),
    ("Sentence with, punctuation; and: colons!", "sentence with punctuation and colons"),
]
# (expected, generated) per question row
QA_PAIRS = [
    ("Paris", "Paris"), ("Paris", "  paris\n"), ("Paris", "Paris, France"),
    ("New York", "newyork"), ("900514344", "900514344"), ("900514344", "900-51-4344"),
    ("1987", " 1987 "), ("Elm Road", "ELM ROAD"), ("blue", "green"), ("42", "42.0"),
    ("Quill", "Quill."), ("Dr. Ana Ruiz", "dr. ana ruiz"),
]
MEMBER_NLL = [0.5, 1.25, 2.0, 2.0, 3.5, 0.75, 4.0, 1.5]
NONMEMBER_NLL = [2.0, 3.0, 1.25, 5.5, 4.0, 6.0, 2.5, 3.75]  # ties with members: 1.25, 2.0, 4.0
MMLU_AVERAGE = 0.375


def _rows(split: str, offset: int) -> list[dict]:
    """Rows of every task and kind: Task2 documents carry five questions, as in LUME."""
    rows, sc, qa = [], iter(SC_PAIRS[offset:] + SC_PAIRS[:offset]), iter(QA_PAIRS * 2)
    for task, docs, questions in (("Task1", 4, 1), ("Task2", 2, 5), ("Task3", 4, 1)):
        for d in range(docs):
            doc = f"{split[:2]}{task[-1]}{d:02d}"
            expected, generated = next(sc)
            rows.append({"id": f"{doc}sc1", "task": task, "input": f"Prompt of {doc}",
                         "expected_output": expected, "model_output": generated, "nll": 1.5})
            for q in range(questions):
                expected, generated = next(qa)
                rows.append({"id": f"{doc}qa{q}", "task": task, "input": f"Question {q}?",
                             "expected_output": expected, "model_output": generated,
                             "nll": 0.25})
    return rows


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        writer.writerows(rows)


def write_inputs(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, offset in (("forget", 0), ("retain", 5)):
        _write_csv(out / f"{split}_0.csv", HEADER, _rows(split, offset))
    (out / "mia_results").mkdir(exist_ok=True)
    for name, nlls in (("member", MEMBER_NLL), ("nonmember", NONMEMBER_NLL)):
        _write_csv(out / "mia_results" / f"{name}_0.csv", ["id", "nll"],
                   [{"id": f"{name}{i}", "nll": v} for i, v in enumerate(nlls)])
    (out / "mmlu_metrics.json").write_text(json.dumps({"average_acc": MMLU_AVERAGE}) + "\n")


def run_official(script: Path, python: str, inputs: Path) -> dict:
    """``evaluate_generations.py --compute_metrics_only`` on copies of the inputs."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(["cp", "-r", f"{inputs}/.", str(work)], check=True)
        for name in ("forget.jsonl", "retain.jsonl", "member.jsonl", "nonmember.jsonl"):
            (work / name).touch()  # the script asserts these exist before reading the CSVs
        subprocess.run([python, str(script), "--compute_metrics_only", "--keep_files",
                        "--data_path", f"{work}/", "--mia_data_path", f"{work}/",
                        "--output_dir", str(work), "--mmlu_metrics_file_path",
                        str(work / "mmlu_metrics.json"), "--alphas", "0", "--layer_ids", "0"],
                       check=True, cwd=work)
        [result] = work.glob("*_evaluation_result.json")
        return json.loads(result.read_text())


MMLU_DEV = [("What is 2 + 2?", "3", "4", "5", "6", "B"),
            ("Which gas do plants take in?", "Oxygen", "Nitrogen", "Carbon dioxide", "Helium",
             "C"),
            ("Pick the prime.", "4", "6", "8", "7", "D"),
            ("Water freezes at?", "0 C", "10 C", "50 C", "100 C", "A"),
            ("Opposite of hot?", "warm", "cold", "tepid", "red", "B"),
            ("A sixth dev row the harness never reads", "a", "b", "c", "d", "A")]
MMLU_TEST = [("Which planet is largest?", "Mars", "Venus", "Jupiter", "Earth", "C"),
             ("Choose, if you can: \"quoted\", text", "x, y", "z", "w", "v", "A")]


def official_mmlu_prompts(run_mmlu: Path) -> dict:
    """Prompts for 0..5 shots built by the harness's own functions, run from its source."""
    import pandas as pd
    tree = ast.parse(run_mmlu.read_text())
    wanted = {"format_subject", "format_example", "gen_prompt"}
    module = ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef)
                         and n.name in wanted], type_ignores=[])
    namespace: dict = {"choices": ["A", "B", "C", "D"]}
    exec(compile(module, str(run_mmlu), "exec"), namespace)
    dev, test = pd.DataFrame(MMLU_DEV), pd.DataFrame(MMLU_TEST)
    subject = "high_school_biology"
    return {"subject": subject, "dev": MMLU_DEV, "test": MMLU_TEST, "prompts": {
        str(k): [namespace["gen_prompt"](dev, subject, k)
                 + namespace["format_example"](test, i, include_answer=False)
                 for i in range(len(test))] for k in range(6)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True,
                        help="folder holding evaluate_generations.py and run_mmlu.py")
    parser.add_argument("--python", required=True, help="an interpreter with their imports")
    args = parser.parse_args()
    write_inputs(OUT)
    results = run_official(args.official / "evaluate_generations.py", args.python, OUT)
    (OUT / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    prompts = official_mmlu_prompts(args.official / "run_mmlu.py")
    (OUT / "mmlu_prompts.json").write_text(json.dumps(prompts, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
