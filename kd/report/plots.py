"""The report's figures (reports/plots/*.png): byte-stable PNGs (fixed fonts and hash salt, no metadata)."""

from __future__ import annotations

import io

PLOT_STATS = ("entropy_norm", "self_focus", "density", "similarity")
PNG_DPI = 100
ATTN_LABELS = {"entropy": "entropy (nats)", "entropy_norm": "entropy / log(allowed keys)",
               "self_focus": "self-focus (diagonal weight)", "density": "density (allowed weights > 0.1)",
               "top5_mass": "top-5 key mass", "similarity": "similarity to layer l-1 (cosine)"}


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # no Software/Creation-time chunks: identical bytes on every run
    fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Software": None})
    return buf.getvalue()


RC = {"svg.hashsalt": "kd-prime", "font.family": "DejaVu Sans", "font.size": 9, "axes.grid": True,
      "grid.alpha": 0.3, "figure.dpi": PNG_DPI, "savefig.dpi": PNG_DPI, "path.simplify": False}


def plot_accuracy(an: dict) -> bytes:
    import matplotlib
    from matplotlib.figure import Figure

    data = an["data"]
    models = data["models"]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(max(5.0, 1.1 * len(models) + 1.5), 3.6))
        ax = fig.add_subplot(1, 1, 1)
        width = 0.38
        for j, kind in enumerate(("strict", "flexible")):
            xs = [i + (j - 0.5) * width for i in range(len(models))]
            acc = [100 * data["eval"][m][f"accuracy_{kind}"] for m in models]
            lo = [a - 100 * data["eval"][m][f"ci95_{kind}_low"] for a, m in zip(acc, models)]
            hi = [100 * data["eval"][m][f"ci95_{kind}_high"] - a for a, m in zip(acc, models)]
            ax.bar(xs, acc, width, yerr=[lo, hi], capsize=3, label=kind, color=("C0", "C1")[j])
        ax.set_xticks(list(range(len(models))))
        ax.set_xticklabels(models, rotation=30, ha="right")
        ax.set_ylabel("GSM8K accuracy (%), 95 % Wilson CI")
        ax.set_ylim(0, 100)
        ax.legend(loc="upper left")
        fig.tight_layout()
        return _png(fig)


def plot_attention(an: dict) -> bytes:
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = an["attention"]
    last = max(r["layer"] for r in rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(10, 6.4))
        for k, stat in enumerate(PLOT_STATS):
            ax = fig.add_subplot(2, 2, k + 1)
            for i, m in enumerate(models):
                pts = [(r["layer"], r[stat]) for r in rows if r["model"] == m and r.get(stat) is not None]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=m,
                            color=f"C{i % 10}")
            ax.set_title(ATTN_LABELS[stat])
            ax.set_xlabel("layer")
            ax.set_xlim(-0.3, last + 0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if k == 0:
                ax.legend(fontsize=7)
        fig.tight_layout()
        return _png(fig)
