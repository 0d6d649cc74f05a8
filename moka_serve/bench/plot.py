"""The compare plot: latency ratio to the plain engine (or, when it was not run, to the adapter
engine's base requests) against the number of adapters, per method."""

from __future__ import annotations

from pathlib import Path

MARKERS = {"moka": "o", "lora8": "s", "lora16": "^"}


def plot_ratios(rows: list[dict], out: Path, title: str) -> Path | None:
    """TPOT (left) and TTFT (right) ratio vs N, a line per (method, popularity); None if no
    matplotlib or no ratios to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows if r["method"] not in ("base", "plain") and "tpot_ratio" in r]
    if not rows:
        return None
    to_plain = all("tpot_ratio_to_plain" in r for r in rows)
    suffix, ref = ("_to_plain", "plain engine") if to_plain else ("", "base requests")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    metrics = ("tpot_ratio" + suffix, "ttft_ratio" + suffix)
    for ax, metric, label in zip(axes, metrics, ("TPOT", "TTFT"), strict=True):
        for method in sorted({r["method"] for r in rows}):
            for pop in sorted({r["popularity"] for r in rows}):
                pts = sorted(
                    (r["n"], r[metric])
                    for r in rows
                    if r["method"] == method and (r["popularity"] == pop or r["n"] == 1)
                )
                if len(pts) < 1:
                    continue
                style = "-" if pop == "distinct" else "--"
                ax.plot(*zip(*pts, strict=True), style, marker=MARKERS.get(method, "x"),
                        label=f"{method} {pop}")  # fmt: skip
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ns = sorted({r["n"] for r in rows})
        ax.set_xticks(ns, [str(n) for n in ns])  # the N measured, not powers of ten
        ax.minorticks_off()
        ax.set_xlabel("adapters served (N)")
        ax.set_ylabel(f"{label} p50 / {ref}")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
