"""The comparison's report: report.md (table, Pareto rows, recommendation), report.json and
tradeoff.png (harmful rate against utility, the front drawn, over-refusal as colour).

Utility is the task metric, or drift from B (``--utility drift``, lower is better): the one
chosen sets the plot's axis, the Pareto front and the recommendation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from safealign.compare.result import CompareResult, MethodRow
from safealign.report import markdown_table, write_json

SCHEMA_VERSION = 1
COLUMNS = (
    "name",
    "status",
    "harmful_rate",
    "harmful_after_ft",
    "safe_and_coherent_rate",
    "utility",
    "over_refusal",
    "incoherent_harmful",
    "incoherent_benign",
    "drift",
    "changed_share",
    "seconds",
    "peak_memory_mib",
    "pareto",
    "over_bounds",
    "reason",
)


@dataclass(frozen=True)
class Utility:
    """A utility axis: the score it reads, whether higher is better, its words."""

    key: str
    higher_is_better: bool
    label: str
    noun: str
    form: str

    def goodness(self, value: float) -> float:
        """``value`` turned so that higher is better."""
        return value if self.higher_is_better else -value

    def shown(self, value: float) -> str:
        return self.form.format(value)


UTILITIES = {
    "task": Utility("utility", True, "utility (%, higher is better)", "the most utility", "{:.3f}"),
    "drift": Utility(
        "drift", False, "drift from B (nats, lower is better)", "the least drift", "{:.4f} nats"
    ),
}


#: The harm a comparison ranks by (``--harm``): the score key and the plot's axis label.
HARMS = {
    "now": ("harmful_rate", "harmful rate (%, lower is safer)"),
    "durable": (
        "harmful_rate_after_finetune",
        "harmful rate after the durability fine-tune (%, lower is safer)",
    ),
}


def _point(row: MethodRow, utility: str = "task", harm: str = "now") -> tuple[float, float] | None:
    """(harm, utility turned so that higher is better), None when unscored."""
    axis = UTILITIES[utility]
    harmful, value = row.rate(HARMS[harm][0]), row.rate(axis.key)
    if row.status != "done" or harmful is None or value is None:
        return None
    return harmful, axis.goodness(value)


def pareto_names(rows: list[MethodRow], utility: str = "task", harm: str = "now") -> set[str]:
    """Rows no other row beats: none is at most as harmful (``harm``: now, or after the
    durability fine-tune) with at least the utility (``task``, or the least ``drift``), and
    strictly better in one of the two."""
    points = {row.name: p for row in rows if (p := _point(row, utility, harm)) is not None}
    front = set()
    for name, (h, u) in points.items():
        beaten = any(
            h2 <= h and u2 >= u and (h2 < h or u2 > u)
            for other, (h2, u2) in points.items()
            if other != name
        )
        if not beaten:
            front.add(name)
    return front


#: How far above the aligned model's harmful rate and over-refusal the default bounds sit.
BOUND_MARGIN = 0.05


def default_bound(result: CompareResult, key: str, given: float | None) -> float | None:
    """``given``, else the aligned model's ``key`` + :data:`BOUND_MARGIN` (None unscored)."""
    aligned = next(r for r in result.rows if r.name == "aligned").rate(key)
    if given is not None or aligned is None:
        return given
    return round(aligned + BOUND_MARGIN, 6)


def harm_words(result: CompareResult) -> str:
    """The harm in words: "harmful rate", or "harmful rate after fine-tuning" (durable)."""
    return "harmful rate" if result.harm == "now" else "harmful rate after fine-tuning"


def broken_bounds(row: MethodRow, result: CompareResult) -> list[str]:
    """The bounds a scored row breaks: "harmful rate", "over-refusal" (an unscored
    over-refusal breaks nothing)."""
    broken = []
    for label, key, bound in (
        (harm_words(result), HARMS[result.harm][0], result.max_harmful_rate),
        ("over-refusal", "over_refusal", result.max_over_refusal),
    ):
        value = row.rate(key)
        if bound is not None and value is not None and value > bound:
            broken.append(label)
    return broken


def _interval(row: MethodRow, key: str) -> tuple[float, float]:
    """A score's 95% interval (the value itself when none was recorded)."""
    entry = (row.scores or {}).get(key) or {}
    value = entry.get("value")
    low, high = entry.get("ci95") or (value, value)
    return low, high


def recommend(
    result: CompareResult, max_harmful_rate: float | None, max_over_refusal: float | None = None
) -> None:
    """The method keeping the most utility (``result.utility``: the task's, or the least drift)
    among those within both bounds: harmful rate and over-refusal each at most the aligned
    model's + 0.05 unless given (harm: ``result.harm``, now or after the durability
    fine-tune). Methods whose utility intervals overlap the best one's are
    named as tied with it (no tie is broken by speed); with none within the bounds, or none
    that keeps more utility than the aligned model beyond the 95% intervals (A itself,
    unchanged, would do as well), a plain statement saying so."""
    harm, words = HARMS[result.harm][0], harm_words(result)
    result.max_harmful_rate = default_bound(result, harm, max_harmful_rate)
    result.max_over_refusal = default_bound(result, "over_refusal", max_over_refusal)
    axis = UTILITIES[result.utility]
    fits = [
        r
        for r in result.rows
        if r.kind != "input"
        and _point(r, result.utility, result.harm) is not None
        and not broken_bounds(r, result)
    ]
    if not fits:
        result.recommendation = {
            "method": None,
            "tied": [],
            "text": f"No method reached a {words} of "
            f"{result.max_harmful_rate} or less"
            + (
                ""
                if result.max_over_refusal is None
                else f" with over-refusal of {result.max_over_refusal} or less"
            )
            + ".",
        }
        return
    best = max(fits, key=lambda r: (_point(r, result.utility, result.harm)[1], -r.rate(harm)))
    aligned = next((r for r in result.rows if r.name == "aligned"), None)
    start = None if aligned is None else _point(aligned, result.utility, result.harm)
    gains = start is not None and _point(best, result.utility, result.harm)[1] > start[1]
    if start is not None and (not gains or _overlap(best, aligned, axis.key)):
        shown = axis.shown(aligned.rate(axis.key))
        result.recommendation = {
            "method": None,
            "tied": [],
            "text": f"No method within the bounds keeps more {axis.key} than the aligned model "
            f"({shown}) beyond the 95% intervals: the best of them, {best.name}, reached "
            f"{axis.shown(best.rate(axis.key))}, so none is a repair worth its change over A.",
        }
        return
    tied = [r.name for r in fits if r is not best and _overlap(r, best, axis.key)]
    text = (
        f"{best.name}: {axis.noun} ({axis.shown(best.rate(axis.key))}) among the methods within "
        f"the bounds ({words} <= {result.max_harmful_rate}"
        + (
            ""
            if result.max_over_refusal is None
            else f", over-refusal <= {result.max_over_refusal}"
        )
        + f"; it reached {best.rate(harm):.3f})"
    )
    if tied:
        text += f"; tied within the 95% intervals with {', '.join(tied)}"
    result.recommendation = {"method": best.name, "tied": tied, "text": text + "."}


def _overlap(row: MethodRow, other: MethodRow, key: str) -> bool:
    """Whether two rows' 95% intervals of a score overlap."""
    low, high = _interval(row, key)
    other_low, other_high = _interval(other, key)
    return high >= other_low and other_high >= low


def table_rows(result: CompareResult) -> list[dict]:
    """Rows for report.md, sorted by harmful rate (unscored rows last), Pareto rows marked."""
    front = pareto_names(result.rows, result.utility, result.harm)

    def key(row: MethodRow):
        harmful = row.rate("harmful_rate")
        return (
            harmful is None,
            harmful if harmful is not None else 0.0,
            -(row.rate("utility") or 0),
        )

    rows = []
    for row in sorted(result.rows, key=key):
        rows.append(
            {
                "name": row.name,
                "status": row.status,
                "harmful_rate": row.rate("harmful_rate"),
                "harmful_after_ft": row.rate("harmful_rate_after_finetune"),
                "safe_and_coherent_rate": row.rate("safe_and_coherent_rate"),
                "utility": row.rate("utility"),
                "over_refusal": row.rate("over_refusal"),
                "incoherent_harmful": row.rate("incoherent_rate.harmful"),
                "incoherent_benign": row.rate("incoherent_rate.benign"),
                "drift": row.rate("drift"),
                "changed_share": row.changed_share,
                "seconds": row.seconds,
                "peak_memory_mib": (
                    round(row.peak_memory_bytes / 2**20) if row.peak_memory_bytes else None
                ),
                "pareto": "*" if row.name in front else "",
                "over_bounds": ", ".join(broken_bounds(row, result)) if row.kind != "input" else "",
                "reason": row.reason or "",
            }
        )
    return rows


def columns(result: CompareResult) -> tuple[str, ...]:
    """report.md's columns: ``harmful_after_ft`` only when durability was measured."""
    measured = result.settings.get("durability") is not None
    return tuple(c for c in COLUMNS if measured or c != "harmful_after_ft")


def to_dict(result: CompareResult) -> dict:
    """report.json: one schema with eval's results (value, n, ci95 per rate) for every row."""
    return {
        "schema_version": SCHEMA_VERSION,
        "settings": result.settings,
        "inputs": result.inputs,
        "evaluator": result.evaluator,
        "max_harmful_rate": result.max_harmful_rate,
        "max_over_refusal": result.max_over_refusal,
        "utility": result.utility,
        "harm": result.harm,
        "pareto": sorted(pareto_names(result.rows, result.utility, result.harm)),
        "recommendation": result.recommendation,
        "rows": [asdict(row) for row in result.rows],
    }


def write_report(result: CompareResult) -> None:
    """report.json, report.md and (with matplotlib) tradeoff.png in the output folder."""
    write_json(result.out / "report.json", to_dict(result))
    text = [
        "# safealign compare",
        "",
        markdown_table(table_rows(result), columns(result)),
        "",
        "`*`: on the Pareto front (no other row is as safe and as useful, and better in one).",
        "",
        f"**Recommendation.** {result.recommendation['text']}",
        "",
    ]
    (result.out / "report.md").write_text("\n".join(text))
    plot_tradeoff(to_dict(result), result.out / "tradeoff.png")


def plot_tradeoff(report: dict, path: str | Path) -> Path | None:
    """Utility (the report's: task utility, or drift) against harmful rate from a
    report.json's content: one marker per row, the inputs as open markers, the Pareto front as
    a step line, over-refusal as colour, names in a legend beside the axes (coinciding points
    never get overlapping labels).

    Returns the PNG path, or None without matplotlib (the ``plot`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    axis = UTILITIES[report.get("utility", "task")]
    harm_key, harm_label = HARMS[report.get("harm", "now")]
    scale_y = 100 if axis.key == "utility" else 1
    points = []
    for row in report["rows"]:
        scores = row.get("scores") or {}
        harmful = (scores.get(harm_key) or {}).get("value")
        utility = (scores.get(axis.key) or {}).get("value")
        if row["status"] == "done" and harmful is not None and utility is not None:
            refusal = (scores.get("over_refusal") or {}).get("value")
            points.append((row["name"], row["kind"], 100 * harmful, scale_y * utility, refusal))
    fig, ax = plt.subplots(figsize=(9.5, 5))
    cmap = plt.get_cmap("viridis")  # 0% over-refusal dark, so markers stand out on white
    markers = "osD^v<>PX*hH8p"
    for i, (name, kind, x, y, refusal) in enumerate(points):
        colour = cmap(refusal if refusal is not None else 0.0)
        style = {"facecolors": "none", "edgecolors": colour} if kind == "input" else {"c": [colour]}
        ax.scatter(
            x, y, marker=markers[i % len(markers)], s=90, linewidths=1.5, label=name, **style
        )
    front = sorted((x, y) for name, _, x, y, _ in points if name in set(report["pareto"]))
    if front:
        xs, ys = zip(*front, strict=True)
        ax.step(
            xs, ys, where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front"
        )
    bound = report.get("max_harmful_rate")
    if bound is not None:
        ax.axvline(100 * bound, color="red", linestyle=":", linewidth=1, label="harmful-rate bound")
    scale = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 100))
    fig.colorbar(scale, ax=ax, pad=0.01).set_label("over-refusal (%)")
    ax.legend(loc="center left", bbox_to_anchor=(1.18, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel(harm_label)
    ax.set_ylabel(axis.label)
    ax.set_xlim(-5, 105)
    if axis.key == "utility":
        ax.set_ylim(-5, 105)
    else:  # drift: from 0 (B itself) up, in nats
        top = 1.1 * max((y for *_, y, _ in points), default=0.0) or 1.0
        ax.set_ylim(-0.05 * top, top)
    ax.grid(alpha=0.3)
    ax.set_title("safety against utility (open markers: the input models)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
