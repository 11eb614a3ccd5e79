"""``report.html``: one self-contained page of plots for an evaluation."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from ..measure.official import task_names  # noqa: E402
from .table import results_table  # noqa: E402

FORGET, RETAIN, BEFORE = "#d62728", "#1f77b4", "#bbbbbb"


PAGE_STYLE = ("body{{font-family:system-ui,sans-serif;max-width:{width}px;margin:2em auto;}}"
              "img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em}}"
              "table{{border-collapse:collapse}}td,th{{padding:.2em .6em;text-align:right;"
              "border-bottom:1px solid #ddd}}")


def image(png_base64: str) -> str:
    return f'<img src="data:image/png;base64,{png_base64}">'


def write_page(path, title: str, parts: list[str], width: int = 1100) -> None:
    """One self-contained HTML page: ``parts`` (HTML) under ``title``, images inline."""
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE.format(width=width)}</style>" + "\n".join(parts))
    Path(path).write_text(page, encoding="utf-8")


def figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def relearn_section(attacks: dict[str, dict], note: str = "") -> list[str]:
    """The page section of the relearning attack on each model (name -> its
    :func:`unlearn.evaluation.relearn.relearn` result): what it did, ``note`` (HTML), the bars."""
    first = next(iter(attacks.values()))
    return ["<h2>Relearning attack</h2>",
            f"<p>Each model fine-tuned on {len(first['attacked_documents'])} forget documents, "
            f"then scored on the other {len(first['held_out_documents'])}{note}.</p>",
            image(_relearn_bars(attacks))]


def _relearn_bars(attacks: dict[str, dict]) -> str:
    """The relearning attack on each model (name -> :func:`unlearn.evaluation.relearn.relearn`
    result): held-out forget knowledge and regurgitation before and after it."""
    names = list(attacks)
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(names)), 3.2))
    for ax, score in zip(axes, ("knowledge", "regurgitation")):
        x = np.arange(len(names))
        for offset, when, alpha in ((-0.2, "before", 0.45), (0.2, "after", 1.0)):
            values = [attacks[n][when][score] or 0.0 for n in names]
            ax.bar(x + offset, values, 0.4, alpha=alpha, color="#264653", label=when)
        ax.set_xticks(x, names)
        ax.set_ylim(0, 1)
        ax.set_title(f"held-out forget {score}")
    axes[0].legend(fontsize=8)
    return figure_png(fig)


def _task_bars(results: dict, before: dict | None) -> str:
    """Per task, forget against retain, for each score (the target's values as grey ticks)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    tasks = sorted({t for split in ("forget-set", "retain-set")
                    for t in task_names(results[split])})

    def score(scores: dict, split: str, task: str, key: str) -> float:
        """A bar's height; a split or a task without such rows draws as a gap (NaN)."""
        value = scores.get(f"{split}-set", {}).get(task, {}).get(key)
        return float("nan") if value is None else value

    for ax, key, title in zip(axes, ("regurgitation-score", "knowledge-score"),
                              ("regurgitation (ROUGE-L recall)", "knowledge (exact match)")):
        for offset, split, colour in ((-0.2, "forget", FORGET), (0.2, "retain", RETAIN)):
            values = [score(results, split, t, key) for t in tasks]
            xs = [i + offset for i in range(len(tasks))]
            ax.bar(xs, values, width=0.38, color=colour, label=split)
            if before:
                old = [score(before, split, t, key) for t in tasks]
                ax.scatter(xs, old, marker="_", s=400, color="black", zorder=3,
                           label="before" if split == "forget" else None)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
    axes[0].legend(loc="lower left", fontsize=8)
    return figure_png(fig)


def _loss_histograms(panels: list[tuple[str, list[float], list[float], str]]) -> str:
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, seen, unseen, seen_name) in zip(axes.flat, panels):
        # shared bin edges: with its own, a tight cluster (a memorised set near 0) draws as
        # slivers too thin to see next to a spread-out one
        bins = np.histogram_bin_edges(list(seen) + list(unseen), bins=30)
        ax.hist(unseen, bins=bins, alpha=0.6, color=RETAIN, label="never seen")
        ax.hist(seen, bins=bins, alpha=0.6, color=FORGET, label=seen_name)
        ax.set_title(title)
        ax.set_xlabel("mean token loss (NLL)")
        ax.legend(fontsize=8)
    return figure_png(fig)


def _attack_bars(aucs: dict, before: dict | None) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(aucs)
    ax.bar(range(len(names)), [aucs[n] for n in names], color=FORGET, width=0.5, label="now")
    if before:
        ax.scatter(range(len(names)), [before.get(n, float("nan")) for n in names], marker="_",
                   s=500, color="black", zorder=3, label="before")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("AUC, forget vs never seen")
    ax.legend(fontsize=8)
    return figure_png(fig)


def write_report(path, results: dict, mia_nll: dict | None = None, audit: dict | None = None,
                 before: dict | None = None, title: str = "unlearn evaluation") -> None:
    """Write ``path`` (HTML, images inline). ``before``: the results of the model before
    unlearning (its ``results.json``), drawn as reference marks."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<pre>{html.escape(results_table(results))}</pre>",
             "<h2>Forget vs retain, per task</h2>",
             image(_task_bars(results, before))]
    panels = []
    if mia_nll:
        panels.append(("official MIA set", mia_nll["member"], mia_nll["nonmember"], "members"))
    if audit and "mia" in audit:
        panels.append(("forget documents", audit["mia"]["member_loss"],
                       audit["mia"]["nonmember_loss"], "forget"))
    if panels:
        parts += ["<h2>Loss: seen vs never seen</h2>",
                  image(_loss_histograms(panels))]
    if audit and "mia" in audit:
        old = (before or {}).get("audit", {}).get("mia", {}).get("auc")
        parts += ["<h2>Membership inference on the forget documents</h2>",
                  "<p>0.5 means the attack cannot tell forgotten documents from unseen ones.</p>",
                  image(_attack_bars(audit["mia"]["auc"], old))]
    if audit and "pii" in audit:
        pii = audit["pii"]
        old = (before or {}).get("audit", {}).get("pii")
        row = "<tr><td>{}</td><td>{}/{}</td><td>{:.1%}</td><td>{}/{}</td></tr>"
        rows = [row.format("now", pii["prompts_leaking"], pii["prompts"], pii["leak_rate"],
                           pii["people_leaking"], pii["people"])]
        if old:
            rows.insert(0, row.format("before", old["prompts_leaking"], old["prompts"],
                                      old["leak_rate"], old["people_leaking"], old["people"]))
        parts += ["<h2>PII extraction</h2>",
                  f"<p>{pii['samples_per_prompt']} samples at temperature 1 per prompt; a prompt "
                  "leaks when a sample holds the person's exact SSN, phone or e-mail.</p>",
                  "<table><tr><th></th><th>prompts leaking</th><th>rate</th>"
                  "<th>people leaking</th></tr>" + "".join(rows) + "</table>"]
    write_page(path, title, parts)


def _split_mean(block: dict) -> float:
    values = [v for t in task_names(block) for k in ("regurgitation-score", "knowledge-score")
              if (v := block[t][k]) is not None]
    return sum(values) / len(values)


def _tradeoff(evals: dict, trajectories: dict) -> str:
    """Forget score against retain score: up and to the left is better."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, points in trajectories.items():
        xs = [_split_mean(f) for f, _ in points]
        ys = [_split_mean(r) for _, r in points]
        line, = ax.plot(xs, ys, marker=".", alpha=0.6)
        final = evals[name]
        ax.scatter([_split_mean(final["forget-set"])], [_split_mean(final["retain-set"])],
                   color=line.get_color(), s=60, zorder=3, label=name)
    for name, marker in (("target", "*"), ("oracle", "P")):
        if name in evals:
            ax.scatter([_split_mean(evals[name]["forget-set"])],
                       [_split_mean(evals[name]["retain-set"])], marker=marker, s=220,
                       color="black", zorder=4, label=name)
    ax.set_xlabel("forget set: mean regurgitation & knowledge (lower = forgotten)")
    ax.set_ylabel("retain set: mean regurgitation & knowledge")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("trade-off (lines: per-epoch trajectory)")
    return figure_png(fig)


def bench_report(path, evals: dict, trajectories: dict, eval_dirs: dict, leaderboard,
                 trace: Path | None = None, receipts: dict | None = None) -> None:
    """The benchmark's page: leaderboard, trade-off scatter, the relearning attack on every
    model with a link to its receipt (``receipts``: name -> (receipt, link)), per-model task
    bars, MIA losses, and the causal-tracing heatmaps of ``trace`` (an ``unlearn locate``
    output) when given."""
    import pandas as pd

    parts = ["<h1>unlearn bench</h1>", "<h2>Leaderboard</h2>",
             '<div style="overflow-x:auto">',
             leaderboard.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep=""),
             "</div>",
             "<h2>Forget vs retain</h2>",
             image(_tradeoff(evals, trajectories))]
    if receipts:
        links = ", ".join(f'<a href="{html.escape(link)}">{html.escape(name)}</a>'
                          for name, (_, link) in receipts.items())
        parts += relearn_section({name: receipt["relearn"]["unlearned"]
                                  for name, (receipt, _) in receipts.items()},
                                 f" (<code>unlearn audit</code>). Receipts, a verdict per "
                                 f"document: {links}")
    for name, results in evals.items():
        parts += [f"<h2>{html.escape(name)}: per task</h2>",
                  image(_task_bars(results, evals.get("target")))]
    panels = []
    for name, directory in eval_dirs.items():
        member = directory / "mia_results" / "member_0.csv"
        if member.exists():
            nonmember = pd.read_csv(directory / "mia_results" / "nonmember_0.csv")["nll"]
            panels.append((name, pd.read_csv(member)["nll"].tolist(), nonmember.tolist(),
                           "members"))
    if panels:
        parts += ["<h2>MIA set losses</h2>",
                  image(_loss_histograms(panels))]
    if trace is not None:
        parts.append("<h2>Causal tracing: where the facts live</h2>")
        parts += [image(base64.b64encode((trace / f"{kind}.png").read_bytes()).decode())
                  for kind in ("mlp", "attn", "residual") if (trace / f"{kind}.png").exists()]
    write_page(path, "unlearn bench", parts, width=1300)

