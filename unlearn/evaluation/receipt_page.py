"""``receipt.html``: the verdict table (click a heading to sort), each forget document's loss
against the never-seen distribution, and the relearning attack's before/after bars."""

from __future__ import annotations

import html

import matplotlib.pyplot as plt
import numpy as np

from .report import figure_png, image, relearn_section, write_page

COLOURS = {"forgotten": "#2a9d8f", "partly": "#e9c46a", "remembered": "#e76f51"}
ROLES = ("original", "unlearned", "oracle")  # the attacked models, in the bars' order
COLUMNS = [("id", "document"), ("task", "task"), ("verdict", "verdict"),
           ("loss_before", "loss before"), ("loss_after", "loss after"),
           ("loss_judge", "loss under the judge"), ("score", "score"),
           ("null", "read against"), ("score_percentile", "percentile among never seen"),
           ("regurgitation", "regurgitation"), ("questions_answered", "questions answered"),
           ("pii_leaked", "PII leaked")]
# sorts the table by the clicked column: numbers as numbers, the rest as text
SORT_SCRIPT = """<script>
document.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = [...body.rows];
  const up = th.dataset.up !== '1'; th.dataset.up = up ? '1' : '0';
  const key = r => { const t = r.cells[col].innerText, n = parseFloat(t);
                     return isNaN(n) ? t : n; };
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (up ? 1 : -1));
  rows.forEach(r => body.appendChild(r));
}));
</script>"""


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        return html.escape(", ".join(value))
    return html.escape("" if value is None else str(value))


def _table(documents: list[dict]) -> str:
    head = "".join(f"<th style='cursor:pointer'>{title}</th>" for _, title in COLUMNS)
    rows = []
    for d in documents:
        cells = "".join(f"<td>{_cell(d[key])}</td>" for key, _ in COLUMNS)
        rows.append(f"<tr style='background:{COLOURS[d['verdict']]}33'>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _scores(documents: list[dict], never_seen: dict[str, list[float]], bands: dict,
            judged: bool) -> str:
    """One panel per never-seen group: its scores, its central band, and the forget documents
    read against it, coloured by verdict."""
    fig, axes = plt.subplots(len(never_seen), 1, figsize=(9, 2.6 * len(never_seen) + 0.6),
                             squeeze=False)
    for ax, (name, scores) in zip(axes[:, 0], never_seen.items()):
        ax.hist(scores, bins=30, color="#bbbbbb", label=f"never-seen documents ({name})")
        ax.axvspan(bands[name]["score_low"], bands[name]["score_high"], color="#2a9d8f",
                   alpha=0.08, label="central 90% of never seen")
        top = ax.get_ylim()[1]
        for verdict, colour in COLOURS.items():
            xs = [d["score"] for d in documents if d["verdict"] == verdict and d["null"] == name]
            ax.scatter(xs, np.full(len(xs), top * 0.9), marker="|", s=300, color=colour,
                       label=f"forget documents: {verdict} ({len(xs)})")
        ax.legend(fontsize=8, loc="upper left")
    axes[-1, 0].set_xlabel("mean token loss on the unlearned model, less the judge's" if judged
                           else "mean token loss on the unlearned model")
    fig.tight_layout()
    return figure_png(fig)


def _test_line(test: dict) -> str:
    judge = (f"its loss under the model less its loss under {html.escape(test['judge'])}, "
             f"which never saw it" if test["judge"] else "its loss (no judge model was given)")
    groups = "; ".join(f"{html.escape(name)}: {n['never_seen_documents']} never seen, "
                       f"{100 * n['false_positive_rate']:.1f}%, {n['forget_documents']} forget "
                       f"documents read against them" for name, n in test["nulls"].items()
                       if n["forget_documents"])
    answered = "; ".join(f"{html.escape(name)}: {100 * n['answered_share']:.1f}%"
                         for name, n in test["nulls"].items()
                         if n["forget_documents"] and n["answered_share"] is not None)
    answers = (f" A question answered also counts as remembered; of the never-seen documents "
               f"the model is asked about, the share with one answered ({answered}) brings the "
               f"whole rule's rate to at most {100 * test['false_positive_bound']:.1f}%."
               if answered else "")
    return (f"A document is read by {judge}, against never-seen documents of its own task "
            f"where there are some (else the general ones) scored the same way; "
            f"<b>remembered</b> below their {test['remembered_below_percentile']:.0f}th "
            f"percentile, which calls {100 * test['false_positive_rate']:.1f}% of documents "
            f"no model saw remembered ({groups}).{answers}")


def write_receipt_page(path, receipt: dict, never_seen: dict[str, list[float]]) -> None:
    """The page; ``never_seen`` holds each never-seen group's scores."""
    nulls = receipt["test"]["nulls"]
    read_against = {name: v for name, v in never_seen.items() if nulls[name]["forget_documents"]}
    s = receipt["summary"]
    robust = {True: "robust", False: "NOT robust", None: "not judged (no oracle)"}
    parts = [f"<h1>Unlearning receipt: {html.escape(receipt['model'])}</h1>",
             f"<p>{s['documents']} forget documents: <b>{s['forgotten']} forgotten</b>, "
             f"{s['partly']} partly, {s['remembered']} remembered; {s['over_unlearned']} "
             f"over-unlearned. Relearning attack: {robust[s['relearn_robust']]}.</p>",
             f"<p>{_test_line(receipt['test'])}</p>",
             "<h2>Score of each forget document against never-seen documents</h2>",
             image(_scores(receipt["documents"], read_against, receipt["never_seen"],
                           receipt["test"]["judge"] is not None)),
             *relearn_section({role: receipt["relearn"][role] for role in ROLES
                               if role in receipt["relearn"]}),
             "<h2>Verdict per document</h2>", _table(receipt["documents"]), SORT_SCRIPT]
    write_page(path, "unlearning receipt", parts, width=1200)
