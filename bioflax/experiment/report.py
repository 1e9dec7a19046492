"""Compares finished runs:
``python -m bioflax.experiment.report runs/bp runs/fa runs/kp --out report``.

Each argument is one run's workdir, or a directory of seed workdirs (``seed_0``, ``seed_1``,
... as ``python -m bioflax.experiment.sweep`` writes them) that becomes one row, as mean ± standard
deviation over its seeds. Writes into ``--out``:

- ``report.md``: one table row per argument (final validation and test metrics, final
  gradient angle of the hidden layers to backprop, W·B cosine, wall time and device of the
  runs), the final angle of every layer, then one row per run (from its ``result.json``);
- ``report.png``: validation accuracy (or training loss) and the hidden layers' mean
  gradient angle over training, and the final test metric;
- ``alignment.png``: the gradient angle of every layer over training, one panel per rule.
"""

import argparse
import json
import os
import re
import sys
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.artist import setp

from bioflax.experiment.plots import subplots
from bioflax.experiment.tensorboard_reader import read_scalars
from bioflax.experiment.workdir import RESULT_FILE, seed_of

Scalars = Mapping[str, Sequence[tuple[int, float]]]
ANGLE_PREFIX = "alignment/grad_angle/"
HIDDEN_ANGLE = "alignment/hidden_grad_angle"  # the mean over layers below the output layer
MIN_ANGLE = 0.1  # degrees; below it a rule is backprop up to float round-off


class Run:
    """One finished run: its scalar curves and what its ``result.json`` says (if any)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.scalars = read_scalars(workdir)
        if not self.scalars:
            raise FileNotFoundError(f"No TensorBoard scalars in {workdir}: is it a run's workdir?")
        result_path = os.path.join(workdir, RESULT_FILE)
        self.result = {}
        if os.path.exists(result_path):
            with open(result_path, encoding="utf-8") as f:
                self.result = json.load(f)

    def last(self, tag: str) -> Optional[float]:
        points = self.scalars.get(tag)
        return points[-1][1] if points else None


def seed_workdirs(path: str) -> list[str]:
    """``path`` itself if it is a run, else its ``seed_N`` subdirectories in seed order."""
    seeds = [name for name in os.listdir(path) if seed_of(name) is not None]
    if not seeds:
        return [path]
    return [os.path.join(path, name) for name in sorted(seeds, key=seed_of)]


def load_group(path: str) -> list[Run]:
    """The runs of ``path``; of a seed directory only the finished seeds (with
    ``result.json``), so a grid still running can be reported."""
    workdirs = seed_workdirs(path)
    if workdirs != [path]:
        finished = [w for w in workdirs if os.path.exists(os.path.join(w, RESULT_FILE))]
        for workdir in sorted(set(workdirs) - set(finished)):
            print(f"note: {workdir} has not finished; left out", file=sys.stderr)
        if not finished:
            raise FileNotFoundError(f"No seed in {path} has finished (no {RESULT_FILE}).")
        workdirs = finished
    return [Run(workdir) for workdir in workdirs]


def _natural(text: str) -> list:
    """A sort key that orders ``layer_2`` before ``layer_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def layer_angle_tags(scalars: Scalars) -> list[str]:
    """Per-layer gradient-angle tags (not the angle over all layers), in the natural order
    of the layers' paths."""
    return sorted((tag for tag in scalars
                   if tag.startswith(ANGLE_PREFIX) and tag != ANGLE_PREFIX + "all"), key=_natural)


def hidden_angle_tags(scalars: Scalars) -> list[str]:
    """The tags whose mean is the hidden layers' angle: the trainer's own mean when it logged
    one, else (runs of MLPs, whose layers ``layer_i`` end with the output layer) every layer
    but the last; the output layer's gradient is exact under every rule."""
    return [HIDDEN_ANGLE] if HIDDEN_ANGLE in scalars else layer_angle_tags(scalars)[:-1]


def mean_curve(runs: Sequence[Run], tag: str) -> Optional[tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]]:
    """(steps, mean, std) over the runs, at the steps that every run logged ``tag``."""
    curves = [dict(run.scalars[tag]) for run in runs if tag in run.scalars]
    if len(curves) < len(runs) or not curves:
        return None
    steps = np.array(sorted(set.intersection(*(set(c) for c in curves))))
    values = np.array([[curve[s] for s in steps] for curve in curves])
    return steps, values.mean(axis=0), values.std(axis=0)


def _mean_std(values: Sequence[Optional[float]], scale: float = 1.0) -> Optional[str]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    mean, std = scale * np.mean(values), scale * np.std(values)
    digits = 2 if abs(mean) >= 1 else 4
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _span(values: Sequence[Optional[int]]) -> Optional[str]:
    """``"lo–hi"`` of the known values (runs that stopped early differ), or the one value."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}–{high}"


def summary_row(name: str, runs: Sequence[Run]) -> dict[str, Optional[str]]:
    """One table row: means ± standard deviations over ``runs`` (population std); the
    range of their steps."""
    hidden = hidden_angle_tags(runs[0].scalars)
    weight = [t for t in runs[0].scalars if t.startswith("alignment/weight_cosine/")]
    devices = sorted({run.result.get("device", "?") for run in runs})
    return {
        "run": name,
        "seeds": str(len(runs)),
        "val accuracy (%)": _mean_std([run.last("val/accuracy") for run in runs], 100),
        "test accuracy (%)": _mean_std([run.last("test/accuracy") for run in runs], 100),
        "test loss": _mean_std([run.last("test/loss") for run in runs]),
        "steps": _span([run.result.get("steps") for run in runs]),
        "hidden-layer angle to BP (°)": _mean_std(
            [float(np.mean([run.last(t) for t in hidden])) for run in runs] if hidden else []),
        "W·B cosine": _mean_std(
            [float(np.mean([run.last(t) for t in weight])) for run in runs] if weight else []),
        "wall time per run (s)": _mean_std([run.result.get("wall_time_s") for run in runs]),
        "device": ", ".join(devices),
    }


def markdown_table(rows: Sequence[Mapping[str, Optional[str]]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(row[c] or "—" for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def layer_angle_rows(groups: Mapping[str, Sequence[Run]]) -> list[dict[str, Optional[str]]]:
    """One row per group: the final gradient angle (°) of each layer, mean ± std over runs."""
    layers = list(dict.fromkeys(tag for runs in groups.values()
                                for tag in layer_angle_tags(runs[0].scalars)))
    return [{"run": name, **{tag[len(ANGLE_PREFIX):]: _mean_std([run.last(tag) for run in runs])
                             for tag in layers}} for name, runs in groups.items()]


def run_rows(name: str, runs: Sequence[Run]) -> list[dict[str, Optional[str]]]:
    """One row per run of a group: what its ``result.json`` says."""
    rows = []
    for run in runs:
        result, test = run.result, run.result.get("test", {})
        accuracy = test.get("test/accuracy")
        rows.append({
            "run": f"{name}/{os.path.basename(run.workdir)}" if len(runs) > 1 else name,
            "test accuracy (%)": None if accuracy is None else f"{100 * accuracy:.2f}",
            "test loss": None if "test/loss" not in test else f"{test['test/loss']:.4f}",
            "steps": None if "steps" not in result else str(result["steps"]),
            "wall time (s)": None if "wall_time_s" not in result else f"{result['wall_time_s']:.0f}",
            "device": result.get("device"),
            "finished": result.get("finished"),
        })
    return rows


def _plot_band(ax, curve, **kwargs):
    steps, mean, std = curve
    (line,) = ax.plot(steps, mean, **kwargs)
    if np.any(std > 0):
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def comparison_figure(groups: Mapping[str, Sequence[Run]]):
    fig, (curve_ax, angle_ax, bar_ax) = subplots(1, 3, figsize=(15, 4), dpi=100)
    all_runs = [run for runs in groups.values() for run in runs]
    metric = ("val/accuracy" if all("val/accuracy" in r.scalars for r in all_runs)
              else "train/loss")
    for name, runs in groups.items():
        curve = mean_curve(runs, metric)
        if curve is not None:
            _plot_band(curve_ax, curve, label=name)
        hidden = hidden_angle_tags(runs[0].scalars)
        layer_curves = [mean_curve(runs, tag) for tag in hidden]
        if hidden and all(c is not None for c in layer_curves):
            steps = layer_curves[0][0]
            angle_ax.plot(steps, np.mean([c[1] for c in layer_curves], axis=0), label=name)
    curve_ax.set(title=metric + (" (mean ± std over seeds)" if len(all_runs) > len(groups)
                                 else ""), xlabel="step")
    angle_ax.set(title="hidden layers: angle to the backprop gradient", xlabel="step",
                 ylabel="degrees")
    test_metric = ("test/accuracy" if all("test/accuracy" in r.scalars for r in all_runs)
                   else "test/loss")
    names = list(groups)
    values = [np.mean([run.last(test_metric) for run in groups[n]]) for n in names]
    bar_ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
    for i, value in enumerate(values):
        bar_ax.annotate(f"{value:.4f}", (i, value), ha="center", va="bottom")
    if test_metric == "test/accuracy":
        bar_ax.set_ylim(min(values) - 0.02, 1.0)
    bar_ax.set(title=test_metric)
    bar_ax.tick_params(axis="x", labelrotation=30)  # long run names stay readable
    setp(bar_ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    for ax in (curve_ax, angle_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def alignment_figure(groups: Mapping[str, Sequence[Run]]):
    """Gradient angle to backprop of every layer over training, one panel per rule that
    differs from backprop (mean ± std over seeds); None when no run has such angles."""
    aligned = {name: runs for name, runs in groups.items()
               if any(run.last(tag) > MIN_ANGLE for run in runs
                      for tag in hidden_angle_tags(run.scalars))}
    if not aligned:
        return None
    fig, axes = subplots(1, len(aligned), figsize=(5 * len(aligned), 4), dpi=100,
                         squeeze=False, sharey=True)
    for ax, (name, runs) in zip(axes[0], aligned.items()):
        for tag in layer_angle_tags(runs[0].scalars):
            curve = mean_curve(runs, tag)
            if curve is not None:
                _plot_band(ax, curve, label=tag[len(ANGLE_PREFIX):])
        ax.set(title=f"{name}: gradient angle to BP", xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set(ylabel="degrees")
    fig.tight_layout()
    return fig


def group_names(paths: Sequence[str]) -> list[str]:
    """Each path's last component, or, when two paths end alike (the same config run under
    two roots), each path below their common parent."""
    names = [os.path.basename(os.path.normpath(path)) for path in paths]
    if len(set(names)) == len(names):
        return names
    absolute = [os.path.abspath(path) for path in paths]
    common = os.path.commonpath(absolute)
    return [os.path.relpath(path, common) for path in absolute]


def write_report(paths: Sequence[str], out: str) -> list[str]:
    """Writes ``report.md``, ``report.png`` and (when there are angles) ``alignment.png``
    into ``out``; returns the paths written."""
    groups = {name: load_group(path) for name, path in zip(group_names(paths), paths)}
    os.makedirs(out, exist_ok=True)
    md = os.path.join(out, "report.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown_table([summary_row(name, runs) for name, runs in groups.items()]))
        angles = layer_angle_rows(groups)
        if len(angles[0]) > 1:
            f.write("\nFinal gradient angle to backprop per layer (°):\n\n")
            f.write(markdown_table(angles))
        f.write("\nEach run:\n\n")
        f.write(markdown_table([row for name, runs in groups.items()
                                for row in run_rows(name, runs)]))
    written = [md]
    for filename, fig in (("report.png", comparison_figure(groups)),
                          ("alignment.png", alignment_figure(groups))):
        if fig is not None:
            written.append(os.path.join(out, filename))
            fig.savefig(written[-1])
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+",
                        help="workdirs of finished runs, or directories of seed_N workdirs")
    parser.add_argument("--out", default="report", help="directory for the report files")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.workdirs, args.out)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with open(written[0], encoding="utf-8") as f:
        print(f.read())
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
