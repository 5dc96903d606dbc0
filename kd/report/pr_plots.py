"""`kd pr-report`'s figures: accuracy per arm at both commits (95 % Wilson intervals) and the training loss curves,
as byte-stable PNGs (kd.report.plots: fixed fonts and hash salt, Agg, no metadata)."""

from __future__ import annotations

from kd.report.plots import RC, _png


def plot_accuracy(an: dict) -> bytes | None:
    """Flexible (left) and strict (right) accuracy per arm, BASE and HEAD side by side; None when no arm has any."""
    import matplotlib
    from matplotlib.figure import Figure

    from kd.report.pr import KINDS

    arms = [a for a in an["arms"] if any(x is not None for k in KINDS for x in a["acc"][k])]
    if not arms:
        return None
    names = [a["arm"] for a in arms]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(max(8.0, 1.6 * len(names) + 2.0), 3.8))
        for j, kind in enumerate(KINDS):
            ax = fig.add_subplot(1, len(KINDS), j + 1)
            width = 0.38
            for side, (label, color) in enumerate(((an["base"].name, "C7"), (an["head"].name, "C0"))):
                xs, acc, lo, hi = [], [], [], []
                for i, a in enumerate(arms):
                    v = a["acc"][kind][side]
                    if v is None:
                        continue
                    xs.append(i + (side - 0.5) * width)
                    acc.append(100 * v["acc"])
                    lo.append(100 * (v["acc"] - v["lo"]))
                    hi.append(100 * (v["hi"] - v["acc"]))
                ax.bar(xs, acc, width, yerr=[lo, hi], capsize=3, label=label, color=color)
            ax.set_xticks(list(range(len(names))))
            ax.set_xticklabels(names, rotation=30, ha="right")
            ax.set_ylim(0, 100)
            ax.set_title(f"{kind} accuracy (%), 95 % Wilson CI")
            if j == 0:
                ax.legend(loc="upper left")
        fig.tight_layout()
        return _png(fig)


def plot_loss(an: dict) -> bytes | None:
    """One line per training run (strategy or finetune): BASE dashed, HEAD solid; None when neither has curves."""
    import matplotlib
    from matplotlib.figure import Figure

    base, head = an["loss"]
    runs = sorted(set(base) | set(head))
    if not runs:
        return None
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(7.0, 3.8))
        ax = fig.add_subplot(1, 1, 1)
        for i, run in enumerate(runs):
            for curves, style, label in ((base, "--", an["base"].name), (head, "-", an["head"].name)):
                pts = curves.get(run)
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], style, color=f"C{i % 10}",
                            label=f"{run} ({label})", linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("distill / finetune loss (dashed: base, solid: head)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return _png(fig)
