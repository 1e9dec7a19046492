"""Compares finished runs: ``python -m bioflax.report runs/bp runs/fa runs/kp runs/dfa``.

Reads each workdir's event files and writes ``report.png`` (validation accuracy or loss
and the gradient angle to backprop over training, final test metrics) and ``report.md``
(one table row per run) into ``--out``.
"""

import argparse
import os
import sys
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from bioflax.events import read_scalars  # pylint: disable=wrong-import-position

Scalars = Mapping[str, Sequence[tuple[int, float]]]


def _last(scalars: Scalars, tag: str) -> Optional[float]:
    points = scalars.get(tag)
    return points[-1][1] if points else None


def _hidden_angle_tags(scalars: Scalars) -> list[str]:
    """Per-layer gradient-angle tags, without the output layer (exact under every rule)."""
    layers = sorted((t for t in scalars if t.startswith("alignment/grad_angle/layer_")),
                    key=lambda tag: int(tag.rsplit("_", 1)[1]))
    return layers[:-1]


def summary_row(name: str, scalars: Scalars) -> dict[str, Optional[float]]:
    hidden = _hidden_angle_tags(scalars)
    weight = [t for t in scalars if t.startswith("alignment/weight_cosine/")]
    return {
        "run": name,
        "test accuracy": _last(scalars, "test/accuracy"),
        "test loss": _last(scalars, "test/loss"),
        "steps": scalars["train/loss"][-1][0] if "train/loss" in scalars else None,
        "hidden-layer angle to BP (°)": (float(np.mean([_last(scalars, t) for t in hidden]))
                                         if hidden else None),
        "W·B cosine": (float(np.mean([_last(scalars, t) for t in weight]))
                       if weight else None),
    }


def markdown_table(rows: Sequence[Mapping[str, Optional[float]]]) -> str:
    columns = list(rows[0])

    def cell(value):
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def comparison_figure(runs: Mapping[str, Scalars]):
    fig, (curve_ax, angle_ax, bar_ax) = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    metric = ("val/accuracy" if all("val/accuracy" in s for s in runs.values())
              else "train/loss")
    for name, scalars in runs.items():
        if metric in scalars:
            curve_ax.plot(*zip(*scalars[metric]), label=name)
        hidden = _hidden_angle_tags(scalars)
        if hidden:
            steps = [s for s, _ in scalars[hidden[0]]]
            mean_angle = np.mean([[v for _, v in scalars[t]] for t in hidden], axis=0)
            angle_ax.plot(steps, mean_angle, label=name)
    curve_ax.set(title=metric, xlabel="step")
    angle_ax.set(title="hidden layers: angle to the backprop gradient", xlabel="step",
                 ylabel="degrees")
    test_metric = ("test/accuracy" if all("test/accuracy" in s for s in runs.values())
                   else "test/loss")
    names = list(runs)
    values = [_last(runs[n], test_metric) or np.nan for n in names]
    bar_ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
    for i, value in enumerate(values):
        bar_ax.annotate(f"{value:.4f}", (i, value), ha="center", va="bottom")
    if test_metric == "test/accuracy":
        bar_ax.set_ylim(min(values) - 0.02, 1.0)
    bar_ax.set(title=test_metric)
    for ax in (curve_ax, angle_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def write_report(workdirs: Sequence[str], out: str) -> tuple[str, str]:
    """Writes ``out/report.png`` and ``out/report.md``; returns their paths."""
    runs = {}
    for workdir in workdirs:
        scalars = read_scalars(workdir)
        if not scalars:
            raise FileNotFoundError(f"No TensorBoard scalars in {workdir}: is it a run's workdir?")
        runs[os.path.basename(os.path.normpath(workdir))] = scalars
    os.makedirs(out, exist_ok=True)
    png, md = os.path.join(out, "report.png"), os.path.join(out, "report.md")
    fig = comparison_figure(runs)
    fig.savefig(png)
    plt.close(fig)
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown_table([summary_row(name, s) for name, s in runs.items()]))
    return png, md


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="workdirs of finished runs")
    parser.add_argument("--out", default="report", help="directory for report.png/.md")
    args = parser.parse_args(argv)
    try:
        png, md = write_report(args.workdirs, args.out)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(open(md, encoding="utf-8").read())
    print(f"wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
