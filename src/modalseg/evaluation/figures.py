"""Figures of both papers, drawn with matplotlib's object API on the Agg canvas and saved atomically as PNG.

No ``pyplot`` and no global backend switch: each function builds a ``matplotlib.figure.Figure`` (rendered by
Agg), so it is safe in headless runs and threads, and never changes another caller's matplotlib state.
The PNG's pixel size is ``figsize * dpi`` exactly (no tight bounding box), so layouts are predictable.

* :func:`plot_overlays`: paper 1 Fig. 4 -- truth contour white, model contour green, Dice (%) in a corner.
* :func:`plot_attention_maps`: paper 1 Fig. 5 -- SA maps of the five encoder blocks per stream.
* :func:`plot_mask_grid`: paper 2 Fig. 6 -- GT and each setting's mask in categorical colours.
* :func:`plot_progress`: training curves (loss and validation Dice per epoch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from modalseg.errors import EvaluationError
from modalseg.utils.atomic import atomic_path

PANEL_INCHES = 2.2
DEFAULT_DPI = 100
# Categorical colours for classes 1.. (background transparent); Okabe-Ito, readable for colour-blind eyes.
CLASS_COLOURS = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999"]


def _new_figure(width_in: float, height_in: float, dpi: int) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    return path


def _as_2d(arr: object, what: str) -> np.ndarray:
    """Array (numpy or torch) with singleton leading axes squeezed, checked to be 2D."""
    if hasattr(arr, "detach"):
        arr = arr.detach().cpu().float().numpy()  # type: ignore[union-attr]
    a = np.asarray(arr)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise EvaluationError(f"{what}: expected a 2D array, got shape {a.shape}")
    return a


def _display_range(image: np.ndarray) -> tuple[float, float]:
    """1st-99th percentile window so one bright organ does not wash the image out."""
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    return (float(lo), float(hi)) if hi > lo else (float(image.min()), float(image.max()) + 1e-6)


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    p, g = pred > 0, gt > 0
    denom = p.sum() + g.sum()
    return 1.0 if denom == 0 else float(2 * (p & g).sum() / denom)


def _contour(ax, mask: np.ndarray, colour: str, width: float) -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=width)


def _listify(x: object) -> list:
    return list(x) if isinstance(x, list | tuple) else [x]


def plot_overlays(
    image: np.ndarray | Sequence[np.ndarray] | Sequence[Mapping],
    gt: np.ndarray | Sequence[np.ndarray] | str | Path | None = None,
    preds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    dices: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None,
    path: str | Path | None = None,
    *,
    row_labels: Sequence[str] | None = None,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Paper 1 Fig. 4: per example (row) the image, then one panel per model.

    Each model panel shows the image with the ground-truth boundary in white and the model's boundary in
    green, and the model's Dice in % in the top-left corner. Masks are binarised as ``> 0`` (foreground).
    One example: 2D arrays and dicts; several: lists of them (same model names in every example).
    ``dices`` are fractions (0..1); a model missing from ``dices`` (or ``dices=None``) gets its Dice computed.
    Examples form: ``plot_overlays(examples, path)`` with ``examples`` a list of dicts with keys ``image``,
    ``gt``, ``preds`` and optionally ``dices``.
    """
    items = _listify(image)
    if items and all(isinstance(e, Mapping) for e in items):
        if path is None and isinstance(gt, str | Path):
            path, gt = gt, None
        missing = [k for k in ("image", "gt", "preds") for e in items if k not in e]
        if missing or gt is not None or preds is not None or dices is not None:
            raise EvaluationError(
                "plot_overlays: in the examples form give plot_overlays(examples, path), each example a dict "
                f"with image, gt, preds (and dices); missing {sorted(set(missing))}"
            )
        image = [e["image"] for e in items]
        gt = [e["gt"] for e in items]
        preds = [e["preds"] for e in items]
        dices = [e.get("dices") or {} for e in items]
    if gt is None or preds is None or path is None:
        raise EvaluationError("plot_overlays: image, gt, preds and path are required")
    images = [_as_2d(im, "plot_overlays image") for im in _listify(image)]
    gts = [_as_2d(g, "plot_overlays gt") > 0 for g in _listify(gt)]
    pred_list = _listify(preds)
    dice_list = _listify(dices) if dices is not None else [{} for _ in images]
    if not (len(images) == len(gts) == len(pred_list) == len(dice_list)) or not images:
        raise EvaluationError(
            f"plot_overlays: {len(images)} images, {len(gts)} ground truths, "
            f"{len(pred_list)} prediction sets and {len(dice_list)} Dice sets; give one of each per example"
        )
    names = list(pred_list[0])
    if not names:
        raise EvaluationError("plot_overlays: no predictions to show")
    rows, cols = len(images), len(names) + 1
    fig = _new_figure(PANEL_INCHES * cols, PANEL_INCHES * rows + 0.3, dpi)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (im, g, pr, dc) in enumerate(zip(images, gts, pred_list, dice_list, strict=True)):
        if set(pr) != set(names):
            raise EvaluationError(
                f"plot_overlays: example {r} has models {sorted(pr)}, expected {sorted(names)}"
            )
        vmin, vmax = _display_range(im)
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(im, cmap="gray", vmin=vmin, vmax=vmax, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            _contour(ax, g, "white", 1.2)
            if c == 0:
                if r == 0:
                    ax.set_title("Image + ground truth", fontsize=9)
                if row_labels is not None and r < len(row_labels):
                    ax.set_ylabel(str(row_labels[r]), fontsize=9)
                continue
            name = names[c - 1]
            p = _as_2d(pr[name], f"plot_overlays prediction {name!r}") > 0
            if p.shape != g.shape:
                raise EvaluationError(f"plot_overlays: prediction {name!r} shape {p.shape} != gt {g.shape}")
            _contour(ax, p, "#00FF00", 1.2)
            d = dc.get(name) if hasattr(dc, "get") else None
            d = _dice(p, g) if d is None else float(d)
            ax.text(
                0.03,
                0.97,
                f"{100 * d:.1f}",
                transform=ax.transAxes,
                ha="left",
                va="top",
                fontsize=10,
                color="white",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "edgecolor": "none"},
            )
            if r == 0:
                ax.set_title(str(name), fontsize=9)
    fig.subplots_adjust(
        left=0.02,
        right=0.98,
        bottom=0.02,
        top=1 - 0.35 / (PANEL_INCHES * rows + 0.3),
        wspace=0.04,
        hspace=0.04,
    )
    return _save(fig, path)


def plot_attention_maps(
    maps: Mapping[str, Sequence[np.ndarray]],
    path: str | Path,
    title: str | None = None,
    *,
    cmap: str = "jet",
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Paper 1 Fig. 5: rows = streams (e.g. T1C, T2W), columns = blocks 1..K, one shared colour bar.

    Each map is shown at its own resolution stretched to the same panel (block 5 is 16x smaller than block 1).
    The SA maps are sigmoid outputs, hence the default fixed scale 0..1 (pass ``vmin=vmax=None`` to use the
    data range), so maps of different blocks and streams are comparable.
    """
    if not maps:
        raise EvaluationError("plot_attention_maps: no streams given")
    streams = list(maps)
    arrays = {
        s: [_as_2d(m, f"plot_attention_maps {s} block {i + 1}") for i, m in enumerate(maps[s])]
        for s in streams
    }
    n_blocks = max(len(v) for v in arrays.values())
    if n_blocks == 0:
        raise EvaluationError("plot_attention_maps: every stream has zero maps")
    if vmin is None or vmax is None:
        data = np.concatenate([a.ravel() for v in arrays.values() for a in v])
        vmin = float(data.min()) if vmin is None else vmin
        vmax = float(data.max()) if vmax is None else vmax
    norm = Normalize(vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-6)
    rows = len(streams)
    top = 0.45 if title else 0.3
    fig = _new_figure(PANEL_INCHES * n_blocks + 0.9, PANEL_INCHES * rows + top, dpi)
    axes = fig.subplots(rows, n_blocks, squeeze=False)
    im = None
    for r, s in enumerate(streams):
        for c in range(n_blocks):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(arrays[s]):
                im = ax.imshow(arrays[s][c], cmap=cmap, norm=norm, interpolation="bilinear")
            else:
                ax.set_axis_off()
            if r == 0:
                ax.set_title(f"Block {c + 1}", fontsize=9)
            if c == 0:
                ax.set_ylabel(str(s), fontsize=10)
    height = PANEL_INCHES * rows + top
    fig.subplots_adjust(
        left=0.04,
        right=1 - 0.9 / (PANEL_INCHES * n_blocks + 0.9),
        bottom=0.02,
        top=1 - top / height,
        wspace=0.04,
        hspace=0.04,
    )
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.05 / height)
    cax = fig.add_axes(
        (1 - 0.7 / (PANEL_INCHES * n_blocks + 0.9), 0.1, 0.12 / (PANEL_INCHES * n_blocks + 0.9), 0.75)
    )
    fig.colorbar(im, cax=cax)
    return _save(fig, path)


def _class_cmap(num_classes: int) -> ListedColormap:
    colours = [CLASS_COLOURS[i % len(CLASS_COLOURS)] for i in range(max(num_classes - 1, 1))]
    return ListedColormap(colours)


def plot_mask_grid(
    images: Sequence[np.ndarray | None],
    gts: Sequence[np.ndarray],
    preds_by_setting: Mapping[str, Sequence[np.ndarray]],
    path: str | Path,
    class_names: Sequence[str],
    *,
    row_labels: Sequence[str] | None = None,
    alpha: float = 0.65,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Paper 2 Fig. 6: rows = examples (e.g. CT, MRI), columns = GT, then each setting (Single, UMMKD, ...).

    Label maps hold class indices (0 = background, drawn transparent over the grey image, or black when an
    image is ``None``); ``class_names`` names every class, background first, and labels the legend.
    """
    n = len(gts)
    if n == 0 or len(images) != n:
        raise EvaluationError(f"plot_mask_grid: {len(images)} images for {n} ground truths; need one per row")
    for name, masks in preds_by_setting.items():
        if len(masks) != n:
            raise EvaluationError(f"plot_mask_grid: setting {name!r} has {len(masks)} masks for {n} rows")
    num_classes = len(class_names)
    if num_classes < 2:
        raise EvaluationError("plot_mask_grid: class_names must name the background and at least one class")
    cmap = _class_cmap(num_classes)
    norm = Normalize(vmin=0.5, vmax=num_classes - 0.5)
    titles = ["Ground truth", *preds_by_setting]
    cols = len(titles)
    legend_h = 0.45
    fig = _new_figure(PANEL_INCHES * cols, PANEL_INCHES * n + 0.3 + legend_h, dpi)
    axes = fig.subplots(n, cols, squeeze=False)
    for r in range(n):
        g = _as_2d(gts[r], f"plot_mask_grid gt {r}").astype(np.int64)
        masks = [g] + [
            _as_2d(preds_by_setting[s][r], f"plot_mask_grid {s} {r}").astype(np.int64)
            for s in preds_by_setting
        ]
        im = None if images[r] is None else _as_2d(images[r], f"plot_mask_grid image {r}")
        for c, m in enumerate(masks):
            if m.shape != g.shape:
                raise EvaluationError(f"plot_mask_grid: {titles[c]} row {r} shape {m.shape} != gt {g.shape}")
            if m.min() < 0 or m.max() >= num_classes:
                raise EvaluationError(
                    f"plot_mask_grid: {titles[c]} row {r} has labels up to {m.max()} "
                    f"for {num_classes} classes"
                )
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if im is not None:
                vmin, vmax = _display_range(im)
                ax.imshow(im, cmap="gray", vmin=vmin, vmax=vmax, interpolation="bilinear")
            else:
                ax.imshow(np.zeros_like(m), cmap="gray", vmin=0, vmax=1)
            ax.imshow(
                np.ma.masked_equal(m, 0),
                cmap=cmap,
                norm=norm,
                alpha=alpha if im is not None else 1.0,
                interpolation="nearest",
            )
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 0 and row_labels is not None and r < len(row_labels):
                ax.set_ylabel(str(row_labels[r]), fontsize=10)
    height = PANEL_INCHES * n + 0.3 + legend_h
    fig.subplots_adjust(
        left=0.03, right=0.99, bottom=legend_h / height, top=1 - 0.3 / height, wspace=0.03, hspace=0.03
    )
    handles = [Patch(facecolor=cmap(k - 1), label=str(class_names[k])) for k in range(1, num_classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=9, frameon=False)
    return _save(fig, path)


def plot_progress(history: Sequence[Mapping], path: str | Path, *, dpi: int = DEFAULT_DPI) -> Path:
    """Training progress: top panel train (and validation) loss, bottom panel validation Dice, per epoch.

    ``history`` items are dicts with ``epoch`` and ``train_loss``, optionally ``val_loss`` and ``val_dice``
    (a fraction; missing or None in epochs without validation). The best validation Dice is marked.
    """
    if not history:
        raise EvaluationError("plot_progress: empty history")

    def series(key: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None and np.isfinite(h[key])]
        if not pts:
            return np.empty(0), np.empty(0)
        x, y = zip(*pts, strict=True)
        return np.asarray(x, dtype=float), np.asarray(y, dtype=float)

    if any("epoch" not in h for h in history):
        raise EvaluationError("plot_progress: every history entry needs an 'epoch'")
    fig = _new_figure(7.0, 5.5, dpi)
    ax_loss, ax_dice = fig.subplots(2, 1, sharex=True)
    for key, label, colour in (
        ("train_loss", "train loss", "#0072B2"),
        ("val_loss", "validation loss", "#D55E00"),
    ):
        x, y = series(key)
        if x.size:
            ax_loss.plot(x, y, marker="o" if x.size < 30 else None, ms=3, color=colour, label=label)
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend(fontsize=9)
    x, y = series("val_dice")
    if x.size:
        ax_dice.plot(
            x, 100 * y, marker="o" if x.size < 30 else None, ms=3, color="#009E73", label="validation Dice"
        )
        best = int(np.argmax(y))
        ax_dice.scatter(
            [x[best]],
            [100 * y[best]],
            s=60,
            color="#CC79A7",
            zorder=3,
            label=f"best {100 * y[best]:.1f}% (epoch {x[best]:g})",
        )
        ax_dice.legend(fontsize=9, loc="lower right")
    else:
        ax_dice.text(0.5, 0.5, "no validation yet", transform=ax_dice.transAxes, ha="center", va="center")
    ax_dice.set_ylabel("validation Dice (%)")
    ax_dice.set_xlabel("epoch")
    ax_dice.grid(alpha=0.3)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.09, top=0.97, hspace=0.08)
    return _save(fig, path)
