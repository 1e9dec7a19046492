"""The pictures of a run: alignment over training, predictions on test data.

Each ``*_figure`` function returns a matplotlib figure, :func:`run_figures` those of one
run, and :func:`save_figures` saves them as PNG files in ``workdir/plots`` and as
TensorBoard images. The figures are ``matplotlib.figure.Figure`` objects drawn on an Agg
canvas, without pyplot, so importing this module leaves matplotlib's backend alone.
"""

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Curves = Mapping[str, Sequence[tuple[int, float]]]


def subplots(nrows: int = 1, ncols: int = 1, *, figsize, dpi: int = 100, **kwargs):
    """``pyplot.subplots`` without pyplot: a new Figure on its own Agg canvas, and its axes."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _layer_curves(scalars: Curves, prefix: str) -> dict[str, Sequence[tuple[int, float]]]:
    return {tag[len(prefix):]: points for tag, points in sorted(scalars.items())
            if tag.startswith(prefix)}


def curves_figure(scalars: Curves, prefix: str, title: str, ylabel: str):
    """One line per tag under ``prefix`` (e.g. ``alignment/grad_angle/``) against step."""
    fig, ax = subplots(figsize=(6, 4), dpi=100)
    for name, points in _layer_curves(scalars, prefix).items():
        steps, values = zip(*points)
        ax.plot(steps, values, label=name, linestyle="--" if name == "all" else "-")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def image_grid_figure(images: np.ndarray, predicted: np.ndarray, true: np.ndarray,
                      columns: int = 8):
    """Square grey images, each titled ``predicted (true)``, wrong ones in red."""
    rows = int(np.ceil(len(images) / columns))
    side = int(round(np.sqrt(images[0].size)))
    fig, axes = subplots(rows, columns, figsize=(columns * 1.2, rows * 1.35), dpi=100)
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, image, p, t in zip(np.ravel(axes), images, predicted, true):
        ax.imshow(image.reshape(side, side), cmap="gray")
        ax.set_title(f"{p} ({t})", fontsize=9, color="black" if p == t else "red")
    fig.suptitle("test images: predicted (true)")
    fig.tight_layout()
    return fig


def regression_figure(x: np.ndarray, target: np.ndarray, prediction: np.ndarray):
    """The target function and the model's prediction over a 1-D input range."""
    order = np.argsort(x.ravel())
    fig, ax = subplots(figsize=(6, 4), dpi=100)
    ax.plot(x.ravel()[order], target.ravel()[order], label="target")
    ax.plot(x.ravel()[order], prediction.ravel()[order], label="prediction", linestyle="--")
    ax.set(title="prediction over the input range", xlabel="x", ylabel="y")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def figure_to_array(fig) -> np.ndarray:
    """The figure's pixels as ``uint8 (height, width, 3)``."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_figures(figures: Mapping[str, object], directory: str, writer=None,
                 step: int = 0) -> list[str]:
    """Writes each figure as ``directory/NAME.png`` (and a TensorBoard image); closes them."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = os.path.join(directory, f"{name}.png")
        fig.savefig(path)
        paths.append(path)
        if writer is not None:
            writer.write_images(step, {f"plots/{name}": figure_to_array(fig)[None]})
    return paths


# The kinds of problem with a figure of test predictions; the others ('language_modeling')
# get the alignment figures only, and need no outputs.
PREDICTION_PROBLEMS = ("classification", "regression")


def run_figures(scalars: Curves, problem: str, inputs: np.ndarray, targets: np.ndarray,
                outputs: np.ndarray | None) -> dict[str, object]:
    """The figures of one run, from its scalars and its outputs on (a sample of) test data
    (None for a problem not in :data:`PREDICTION_PROBLEMS`)."""
    figures = {}
    if any(tag.startswith("alignment/grad_angle/") for tag in scalars):
        figures["grad_angle"] = curves_figure(
            scalars, "alignment/grad_angle/", "angle to the backprop gradient", "degrees")
    if any(tag.startswith("alignment/weight_cosine/") for tag in scalars):
        figures["weight_alignment"] = curves_figure(
            scalars, "alignment/weight_cosine/", "alignment of W and B", "cosine")
    if problem not in PREDICTION_PROBLEMS:
        return figures
    if problem == "classification" and int(round(np.sqrt(inputs[0].size))) ** 2 == inputs[0].size:
        figures["test_predictions"] = image_grid_figure(inputs[:32], outputs[:32].argmax(-1),
                                                        targets[:32])
    elif problem == "regression" and inputs.shape[-1] == 1 and targets.shape[-1] == 1:
        figures["regression_fit"] = regression_figure(inputs, targets, outputs)
    return figures
