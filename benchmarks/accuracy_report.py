"""Tables, target checks and the accuracy-vs-FLOPs plot of docs/results.md, from accuracy.json.

    python benchmarks/accuracy_report.py          # rewrites the generated part of docs/results.md
    python benchmarks/accuracy_report.py --epochs 16   # the same for the 16-epoch recipe's JSON and page

Only the text between the ``accuracy-report`` markers of the markdown file is replaced, so the
hand-written discussion around it stays.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- accuracy-report:begin -->", "<!-- accuracy-report:end -->"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _timing  # noqa: E402
from _cli import CliError, run  # noqa: E402


def by_arm(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped per arm, in the order the arms first appear (the suite's order)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in runs:
        groups.setdefault(row["arm"], []).append(row)
    return groups


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def points(rows: Sequence[dict[str, Any]]) -> list[float]:
    return [100 * r["test_accuracy"] for r in rows]


def summary_table(groups: dict[str, list[dict[str, Any]]], target: int) -> str:
    body = []
    for name, rows in groups.items():
        mean, std = mean_std(points(rows))
        flops = statistics.mean(r["flops"] for r in rows)
        body.append(
            [
                f"`{name}`",
                len(rows),
                f"**{mean:.2f}** ± {std:.2f}",
                f"{min(points(rows)):.2f} – {max(points(rows)):.2f}",
                f"{flops / 1e6:.2f}M",
                f"{flops / target:.2f}",
                f"{round(statistics.mean(r['params'] for r in rows)):,}",
                rows[0]["epochs"],
                f"{statistics.mean(r['wall_s'] for r in rows):.0f}",
            ]
        )
    header = ["arm", "seeds", "test accuracy % (mean ± std)", "min – max", "FLOPs", "× lgc", "params"]
    return _timing.markdown_table([*header, "epochs", "s per run"], body)


def seed_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    seeds = sorted({r["seed"] for rows in groups.values() for r in rows})
    body = []
    for name, rows in groups.items():
        accuracy = {r["seed"]: f"{100 * r['test_accuracy']:.2f}" for r in rows}
        body.append([f"`{name}`", *(accuracy.get(s, "") for s in seeds)])
    return _timing.markdown_table(["arm", *(f"seed {s}" for s in seeds)], body)


def drop_table(groups: dict[str, list[dict[str, Any]]]) -> str:
    """Test accuracy (first images of the test set) right after each drop, mean over seeds."""
    body = []
    for name, rows in groups.items():
        if not all(r.get("drops") for r in rows):
            continue
        count = min(len(r["drops"]) for r in rows)
        for key, label in (("stale_accuracy", "as left"), ("recalibrated_accuracy", "BN re-estimated")):
            if key not in rows[0]["drops"][0]:
                continue
            cells = [statistics.mean(100 * r["drops"][i][key] for r in rows) for i in range(count)]
            body.append([f"`{name}`", label, *(f"{c:.1f}" for c in cells)])
    if not body:
        return ""
    width = max(len(row) for row in body) - 2
    return _timing.markdown_table(["arm", "statistics", *(f"drop {i + 1}" for i in range(width))], body)


def targets(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The issue's targets (means over seeds), each with the numbers and whether it is met."""

    def mean(name: str) -> float | None:
        return statistics.mean(points(groups[name])) if name in groups else None

    lines = []
    checks = [
        ("`lgc` ≥ `dense_equal_flops`", "lgc", "dense_equal_flops", 0.0),
        ("`lgc` ≥ `fixed_groups`", "lgc", "fixed_groups", 0.0),
        ("`lgc` within 1.0 point of `dense`", "lgc", "dense", -1.0),
        ("`lgc_finetune` within 0.5 point of `lgc`", "lgc_finetune", "lgc", -0.5),
        ("`lgc_finetune` ≥ `channel_pruning`", "lgc_finetune", "channel_pruning", 0.0),
    ]
    for label, left, right, allowed in checks:
        a, b = mean(left), mean(right)
        if a is None or b is None:
            lines.append(f"- {label}: not measured")
            continue
        verdict = "**met**" if a - b >= allowed - 1e-9 else "**missed**"
        lines.append(f"- {label}: {a:.2f}% vs {b:.2f}% ({a - b:+.2f} points): {verdict}")
    if "lgc_finetune" in groups and "lgc" in groups:
        ratio = groups["lgc_finetune"][0]["epochs"] / groups["lgc"][0]["epochs"]
        lines.append(f"- `lgc_finetune` epochs: {ratio:.2f}x those of `lgc` (at most 0.5 asked)")
    for name in groups:
        if name.startswith("channel_pruning_"):  # the baseline tuned too: is it the strongest?
            difference = statistics.mean(paired(groups, name, "channel_pruning"))
            count = len(groups[name])
            lines.append(
                f"- baseline variant `{name}` ({count} seeds): {statistics.mean(points(groups[name])):.2f}% "
                f"({difference:+.2f} vs `channel_pruning` on the same seeds)"
            )
        if not name.startswith("lgc_") or name == "lgc_finetune":
            continue
        lines.append(variant_line(groups, name))
    return lines


BEST_TARGETS = (  # label, default arm, reference, allowed difference
    ("learned groups ≥ `dense_equal_flops`", "lgc", "dense_equal_flops", 0.0),
    ("learned groups ≥ `fixed_groups`", "lgc", "fixed_groups", 0.0),
    ("learned groups within 1.0 of `dense`", "lgc", "dense", -1.0),
    ("fine-tune within 0.5 of `lgc`, half the epochs", "lgc_finetune", "lgc", -0.5),
    ("fine-tune ≥ `channel_pruning`", "lgc_finetune", "channel_pruning", 0.0),
)


def paired(groups: dict[str, list[dict[str, Any]]], name: str, reference: str) -> list[float]:
    """Per seed that both arms ran, ``name`` minus ``reference`` in points."""
    other = {r["seed"]: 100 * r["test_accuracy"] for r in groups.get(reference, [])}
    return [100 * r["test_accuracy"] - other[r["seed"]] for r in groups[name] if r["seed"] in other]


def best_table(groups: dict[str, list[dict[str, Any]]], min_seeds: int = 3) -> str:
    """Per target: the paper's arm and the best variant of its kind among those run on the most
    seeds (at least ``min_seeds``), each compared with the reference on the seeds both ran, and
    how many of them it wins."""

    def cell(name: str, reference: str, allowed: float) -> tuple[str, str]:
        differences = paired(groups, name, reference)
        mean, std = mean_std(points(groups[name]))
        gap = statistics.mean(differences)
        wins = sum(d >= allowed - 1e-9 for d in differences)
        text = (
            f"`{name}` {mean:.2f} ± {std:.2f} (n = {len(groups[name])}): {gap:+.2f}, "
            f"{wins} of {len(differences)} seeds"
        )
        return text, "met" if gap >= allowed - 1e-9 else f"missed by {allowed - gap:.2f}"

    body = []
    for label, default, reference, allowed in BEST_TARGETS:
        if reference not in groups:
            continue
        finetune = default == "lgc_finetune"
        kind = [
            name
            for name in groups
            if name.startswith("lgc")
            and name.startswith("lgc_finetune") == finetune
            and len(groups[name]) >= min_seeds
            and paired(groups, name, reference)
        ]
        paper = "not run"
        if default in groups:
            paper, verdict = cell(default, reference, allowed)
            paper = f"{paper} ({verdict})"
        variant, verdict = "none", f"no arm of this kind on {min_seeds} seeds or more"
        if kind:
            most = max(len(groups[name]) for name in kind)  # unequal seed sets favour the fewer
            kind = [name for name in kind if len(groups[name]) == most]
            best = max(kind, key=lambda name: statistics.mean(paired(groups, name, reference)))
            variant, verdict = cell(best, reference, allowed)
        body.append([label, paper, variant, verdict])
    header = ["target", "paper's schedule", "best learned-group arm (of those on the most seeds)", "met?"]
    return _timing.markdown_table(header, body)


def variant_line(groups: dict[str, list[dict[str, Any]]], name: str) -> str:
    """A variant against ``lgc`` and the targets of its kind, every reference averaged over the
    variant's own seeds (a one-seed screen is compared with seed 0 of the others, not their means)."""
    seeds = {r["seed"] for r in groups[name]}

    def mean(arm: str) -> float | None:
        values = [100 * r["test_accuracy"] for r in groups.get(arm, []) if r["seed"] in seeds]
        return statistics.mean(values) if values else None

    value, base = statistics.mean(points(groups[name])), mean("lgc")
    notes = [] if base is None else [f"{value - base:+.2f} points vs `lgc`"]
    if name.startswith("lgc_finetune_"):  # the fine-tuning targets, checked on the variant too
        references = [("lgc_finetune", None), ("lgc", -0.5), ("channel_pruning", 0.0)]
    else:  # the paper's claims, checked on the variant trained from scratch
        references = [("dense_equal_flops", 0.0), ("fixed_groups", 0.0), ("dense", -1.0)]
    for other, allowed in references:
        reference = mean(other)
        if reference is None:
            continue
        if other != "lgc":  # the difference to lgc is already the first note
            notes.append(f"{value - reference:+.2f} vs `{other}`")
        if allowed is not None:
            label = f"within {-allowed:.1f} of `{other}`" if allowed else f"≥ `{other}`"
            notes.append(f"{label}: {'met' if value - reference >= allowed - 1e-9 else 'missed'}")
    count = len(seeds)
    which = f"{count} seeds" if count > 1 else f"seed {min(seeds)} only, references on that seed"
    details = f" ({'; '.join(notes)})" if notes else ""
    return f"- variant `{name}` ({which}): {value:.2f}%{details}"


def plot(groups: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Left: accuracy against FLOPs (every run a dot, each arm's mean ± std); right: the arms side by
    side, since most of them sit at the same FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    height = max(5.2, 0.28 * len(groups) + 1.5)  # one readable row per arm on the right
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, height), gridspec_kw={"width_ratios": [1, 1.1]})
    markers = "osD^v<>pPX*h"
    names = list(groups)
    for i, name in enumerate(names):
        rows = groups[name]
        x, y = [r["flops"] / 1e6 for r in rows], points(rows)
        mean, std = mean_std(y)
        marker = markers[i % len(markers)]
        color = plt.get_cmap("tab20")((2 * i + i // 10) % 20)  # distinct for up to 20 arms
        left.errorbar(
            statistics.mean(x), mean, yerr=std, fmt=marker, capsize=4, ms=8, label=name, color=color
        )
        left.scatter(x, y, s=10, alpha=0.45, color=color)
        row = len(names) - 1 - i
        right.errorbar(mean, row, xerr=std, fmt=marker, capsize=4, ms=8, color=color)
        right.scatter(y, [row] * len(y), s=14, alpha=0.45, color=color)
        right.annotate(f"{mean:.2f}", (mean, row), textcoords="offset points", xytext=(0, 7), fontsize=8)
    left.set_xscale("log")
    left.xaxis.set_major_formatter(ScalarFormatter())
    left.xaxis.set_minor_formatter(ScalarFormatter())
    left.set_xlabel("multiply-adds per image (fvcore), millions, log scale")
    left.set_ylabel("test accuracy % (mean ± std over seeds; dots: runs)")
    left.grid(alpha=0.3, which="both")
    if len(names) <= 12:  # beyond that the legend hides the points; the right panel names every arm
        left.legend(fontsize=8, loc="lower right")
    right.set_yticks(
        range(len(names)),
        [f"{n} ({groups[n][0]['flops'] / 1e6:.1f}M, n = {len(groups[n])})" for n in reversed(names)],
    )
    right.set_xlabel("test accuracy % (mean ± std; dots: runs)")
    right.grid(alpha=0.3, axis="x")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def report(payload: dict[str, Any], image: str, source: str) -> str:
    groups = by_arm(payload["runs"])
    recipe = payload["recipe"]
    target = payload["runs"][0]["flops_target"]
    seeds = sorted({r["seed"] for r in payload["runs"]})
    parts = [
        f"Generated by `benchmarks/accuracy_report.py` from `{source}` "
        f"({len(payload['runs'])} runs, seeds {', '.join(map(str, seeds))}). "
        f"Machine: {_timing.machine_line(payload['machine'])}, {recipe['threads']} thread per run.",
        f"Network: {recipe['model']}; {recipe['train_images']:,} training images (a fixed random "
        f"subset), the first {recipe['test_images']:,} test images; {recipe['epochs']} epochs "
        f"(fine-tuning arms {recipe['finetune_epochs']}), batch {recipe['batch_size']}, SGD "
        f"{'Nesterov ' if recipe['nesterov'] else ''}momentum {recipe['momentum']}, weight decay "
        f"{recipe['weight_decay']}, lr {recipe['lr']} (fine-tuning {recipe['finetune_lr']}) with a cosine "
        f"decay per step, random crop (padding {recipe['crop_padding']}) + flip. lgc budget: "
        f"{target / 1e6:.2f}M multiply-adds per 1x28x28 image.",
        summary_table(groups, target),
        "Each target with the paper's arm and the best arm of its kind, in points against the "
        "reference on the seeds both ran (mean of the per-seed differences; seeds: how many of them "
        "meet the target):\n\n" + best_table(groups),
        "Targets of the issue (means over seeds):\n\n" + "\n".join(targets(groups)),
        "Per seed (test accuracy %):\n\n" + seed_table(groups),
    ]
    drops = drop_table(groups)
    if drops:
        parts.append(
            f"Test accuracy % right after each condensing drop (first {recipe['drop_eval_images']:,} test "
            "images, mean over seeds):\n\n" + drops
        )
    parts.append(f"![accuracy against FLOPs]({image})")
    return "\n\n".join(parts)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--epochs",
    type=click.IntRange(min=2),
    default=None,
    help="The report of `accuracy.py --epochs N`: its JSON, docs/results_N_epochs.md and its plot.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="[default: benchmarks/results/accuracy.json]",
)
@click.option(
    "--markdown",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="[default: docs/results.md]",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="[default: docs/img/accuracy_vs_flops.png]",
)
def cli(epochs: int | None, json_path: Path | None, markdown: Path | None, plot_path: Path | None) -> None:
    """Rewrite the generated block of MARKDOWN and the plot from the results JSON."""
    suffix = "" if epochs is None else f"_{epochs}_epochs"
    json_path = json_path or ROOT / "benchmarks" / "results" / f"accuracy{suffix}.json"
    markdown = markdown or ROOT / "docs" / f"results{suffix}.md"
    plot_path = plot_path or ROOT / "docs" / "img" / f"accuracy_vs_flops{suffix}.png"
    if not json_path.exists():
        raise CliError(f"no results at {json_path}; run benchmarks/accuracy.py first")
    payload = json.loads(json_path.read_text())
    if not payload.get("runs"):
        raise CliError(f"{json_path} holds no runs yet")
    text = markdown.read_text() if markdown.exists() else ""
    if BEGIN not in text or END not in text:
        raise CliError(f"{markdown} lacks the {BEGIN} ... {END} markers that say where the report goes")
    image = os.path.relpath(plot_path, markdown.parent)
    recipe = payload["recipe"]
    title = (
        f"{recipe['model']}\non Fashion-MNIST ({recipe['train_images']:,} train images, "
        f"{recipe['epochs']} epochs)"
    )
    plot(by_arm(payload["runs"]), plot_path, title)
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    resolved = json_path.resolve()
    source = resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else json_path
    markdown.write_text(f"{head}{BEGIN}\n{report(payload, image, str(source))}\n{END}{tail}")
    click.echo(f"wrote {markdown} and {plot_path}")


def main(argv: list[str] | None = None) -> int:
    return run(cli, argv)


if __name__ == "__main__":
    raise SystemExit(main())
