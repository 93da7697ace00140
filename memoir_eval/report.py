"""Writing evaluation results: results.json (atomic), a markdown table, and plots (matplotlib Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from memoir_vllm.atomic import write_json_atomic

# (column, metric key, statistic) in table order; perplexity is heavy-tailed, so its median is shown too
COLUMNS = (
    ("Rel", "rel", "mean"), ("Gen", "gen", "mean"), ("Loc", "loc", "mean"), ("PPL", "rel_ppl", "mean"),
    ("PPL median", "rel_ppl", "median"), ("Rel EM", "rel_em", "mean"), ("Gen EM", "gen_em", "mean"),
    ("Loc EM", "loc_em", "mean"), ("Rel answer", "rel_answer", "mean"), ("repeats", "rel_repeats", "mean"),
    ("para→own", "para_routed_right", "mean"), ("loc routed", "loc_routed", "mean"),
    ("neighbours routed", "neigh_routed", "mean"), ("neighbours changed", "neigh_changed", "mean"),
    ("chat Rel", "chat_rel", "mean"), ("chat Gen", "chat_gen", "mean"), ("chat Rel answer", "chat_rel_answer", "mean"),
    ("chat Gen answer", "chat_gen_answer", "mean"), ("chat repeats", "chat_rel_repeats", "mean"),
    ("pre Rel", "pre_rel", "mean"), ("pre PPL", "pre_rel_ppl", "mean"), ("pre Rel EM", "pre_rel_em", "mean"),
)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (memoir_vllm.atomic), creating the folder; values JSON cannot encode become str()."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, obj, default=str)


def markdown_table(results: dict[str, Any]) -> str:
    """One row per T: chunks run / total, the teacher-forced and generative metrics, edit time."""
    runs = results["runs"]
    cols = [(name, key, stat) for name, key, stat in COLUMNS if any(key in r["metrics"] for r in runs.values())]
    head = "| T | chunks | " + " | ".join(c for c, _, _ in cols) + " | s/edit |"
    lines = [f"{results['data']} on {results['model']} (layer {results['config']['layer']}, k {results['config']['k']}, "
             f"tau {results['config']['tau']}, lr {results['config']['lr']})", "", head,
             "|" + "---|" * (len(cols) + 3)]
    for T, r in runs.items():
        cells = []
        for _, key, stat in cols:
            value = r["metrics"].get(key, {}).get(stat)  # results written before medians existed have none
            cells.append("" if value is None else f"{value:.3f}")
        per_edit = r["edit_s"] / max(1, r["n_edits"])
        lines.append(f"| {T} | {r['chunks_run']}/{r['chunks_total']} | " + " | ".join(cells) + f" | {per_edit:.2f} |")
    lines += ["", "Rel/Gen: teacher-forced token accuracy; Loc: agreement with the unedited model's argmax; "
              "EM: normalised exact match of greedy answers (Loc EM: continuation unchanged); para→own: "
              "paraphrases routed to their own edit; pre: the unedited model."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], overlaps: dict[str, dict[str, list[float]]], out: Path) -> list[Path]:
    """metrics_vs_T.png and one routing-overlap histogram per T (edit, paraphrase, unrelated prompts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    runs = results["runs"]
    Ts = [int(t) for t in runs]
    has_ppl = any("rel_ppl" in r["metrics"] for r in runs.values())
    fig, axes = plt.subplots(1, 2 if has_ppl else 1, figsize=(11 if has_ppl else 6, 4), squeeze=False)
    ax = axes[0][0]
    for name, key in (("Rel", "rel"), ("Gen", "gen"), ("Loc", "loc"), ("Rel EM", "rel_em"), ("Gen EM", "gen_em")):
        ys = [runs[str(t)]["metrics"].get(key, {}).get("mean") for t in Ts]
        if any(y is not None for y in ys):
            ax.plot(Ts, [float("nan") if y is None else y for y in ys], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("T (sequential edits)")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title(f"{results['data']}: metrics vs T")
    if has_ppl:
        _plot_ppl(axes[0][1], runs, Ts)
    fig.tight_layout()
    files.append(out / "metrics_vs_T.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    tau = results["config"]["tau"]
    for T, ov in overlaps.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, vals in ov.items():
            if vals:
                ax.hist(vals, bins=40, range=(0, 1), alpha=0.5, label=f"{name} (n={len(vals)})")
        ax.axvline(tau, color="k", linestyle="--", label=f"tau={tau}")
        ax.set_xlabel("best overlap |M_q ∧ M_i| / k")
        ax.set_ylabel("prompts")
        ax.set_title(f"{results['data']}, T={T}: routing overlaps")
        ax.legend()
        fig.tight_layout()
        files.append(out / f"overlap_T{T}.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    return files


def _plot_ppl(ax, runs: dict[str, Any], Ts: list[int]) -> None:
    """Perplexity of the edit targets vs T (log scale): mean, median and the unedited model's mean."""
    for name, key, stat, style in (("PPL mean", "rel_ppl", "mean", "-"), ("PPL median", "rel_ppl", "median", "-"),
                                   ("pre-edit PPL mean", "pre_rel_ppl", "mean", "--")):
        ys = [runs[str(t)]["metrics"].get(key, {}).get(stat) for t in Ts]
        if any(y is not None for y in ys):
            ax.plot(Ts, [float("nan") if y is None else y for y in ys], style, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("T (sequential edits)")
    ax.set_ylabel("perplexity of the edit targets")
    ax.set_title("perplexity vs T (1 is perfect)")
    ax.legend()
