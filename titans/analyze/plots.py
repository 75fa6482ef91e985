"""The PNG plots of a run's analysis (matplotlib, Agg backend)."""

from __future__ import annotations

import numpy as np

from titans import figures, logs, paths


def read_metrics_jsonl(workdir: str) -> list[dict]:
    return logs.read_jsonl(paths.join(workdir, "metrics.jsonl"))


def save_png(fig, path: str, dpi: int = 100) -> None:
    """A figure as a PNG file, local or in a bucket (gs://...): `titans.figures.save_png`."""
    figures.save_png(fig, path, dpi=dpi)


def learning_curves(rows: list[dict], path: str, label: str = "") -> str | None:
    keys = [
        k
        for k in ("train/loss", "train/accuracy", "train/teacher_agreement", "train/learning_rate")
        if any(k in r for r in rows)
    ]
    if not keys:
        return None
    fig, axes = figures.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), lw=1.2, label=label or None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    return path


def reliability(metrics: dict, path: str) -> str:
    rel = metrics["reliability"]
    n = len(rel["count"])
    edges = np.linspace(0, 1, n + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig, ax = figures.subplots(figsize=(4.2, 4))
    has = np.array(rel["count"]) > 0
    ax.bar(centers[has], np.array(rel["accuracy"])[has], width=1 / n, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set_xlabel("confidence (max softmax probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability, ECE {metrics['ece']:.4f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    return path


def confusion(metrics: dict, path: str) -> str:
    m = np.array(metrics["confusion"], float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = figures.subplots(figsize=(5, 4.4))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (rows normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_png(fig, path)
    return path


def per_class(metrics: dict, path: str) -> str:
    C = len(metrics["per_class_accuracy"])
    x = np.arange(C)
    fig, ax = figures.subplots(figsize=(6, 3.4))
    width = 0.4 if "teacher" in metrics else 0.8
    ax.bar(x - (width / 2 if "teacher" in metrics else 0), metrics["per_class_accuracy"], width, label="model")
    if "teacher" in metrics:
        ax.bar(x + width / 2, metrics["teacher"]["per_class_accuracy"], width, label="teacher")
        ax.plot(x, metrics["teacher"]["agreement_by_class"], "k.-", label="agreement with teacher")
    ax.set_xticks(x)
    ax.set_xlabel("class")
    ax.set_ylim(0, 1.25)
    ax.set_title("per-class accuracy" + (" and agreement with the teacher" if "teacher" in metrics else ""))
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    save_png(fig, path)
    return path


def hardest_grid(images, examples: list[dict], k: int, path: str) -> str | None:
    """The k examples with the lowest probability on their true label, captioned with who got them right."""
    if k <= 0 or not examples:
        return None
    order = sorted(range(len(examples)), key=lambda i: examples[i]["p_label"])[:k]
    cols = 8
    rows = -(-len(order) // cols)
    fig, axes = figures.subplots(rows, cols, figsize=(cols * 1.5, rows * 2.3), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), order):
        e = examples[i]
        img = images[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        cap = f"#{i} y={e['label']}\nm={e['pred']} {e['confidence']:.2f}"
        if "teacher_pred" in e:
            cap += f"\nt={e['teacher_pred']} {e['teacher_confidence']:.2f}"
        cap += "\ndefer" if e["deferred_at_30pct"] else "\nkeep"
        ax.set_title(cap, fontsize=6.5)
    fig.suptitle(
        "hardest examples (lowest probability on the true label); m = model, t = teacher, "
        "defer/keep = msp gate at a 30% deferral rate",
        fontsize=8,
    )
    fig.tight_layout()
    save_png(fig, path)
    return path


def run_plots(workdir, out, metrics, images, labels, examples, hardest, info) -> list[tuple[str, str]]:
    del labels, info
    made = [
        ("learning curves", learning_curves(read_metrics_jsonl(workdir), paths.join(out, "learning_curves.png"))),
        ("reliability diagram", reliability(metrics, paths.join(out, "reliability.png"))),
        ("confusion matrix", confusion(metrics, paths.join(out, "confusion.png"))),
        ("per-class accuracy", per_class(metrics, paths.join(out, "per_class.png"))),
        ("hardest examples", hardest_grid(images, examples, hardest, paths.join(out, "hardest.png"))),
    ]
    return [(t, p) for t, p in made if p]
