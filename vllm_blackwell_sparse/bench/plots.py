"""PNG figures of benchmark results (matplotlib, imported only here: ``pip install matplotlib``)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install matplotlib") from None
    return plt


def plot_serve_speedups(result: dict, png: str | Path, note: str = "") -> Path:
    """Two panels against the skipped fraction of the same run, one marker per (engine,
    cell): the decode step (TPOT) over CUSTOM dense (FA3) of the same cell, what a user
    gets; and the attention kernels' GPU time per step over the control (our kernel with
    nothing skipped), with the byte bound 1 / (0.5 + 0.5 (1 - s)), which holds against
    that reference only. BLASST engines only (the control sits at s = 0)."""
    plt = _pyplot()
    rows = [r for r in result["summary"]["rows"] if r.get("sparsity") is not None and r.get("speedup_vs_dense")]
    control = {(r["batch"], r["prompt_tokens"]): r for r in result["summary"]["rows"]
               if r["engine"] == "CUSTOM BLASST control"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120, sharey=True)
    s = [i / 100 for i in range(0, 96)]
    cells = sorted({(r["batch"], r["prompt_tokens"]) for r in rows})
    markers = "osD^v<>p"
    panels = (("decode step (TPOT), over CUSTOM dense (FA3)", lambda r: r["speedup_vs_dense"]),
              ("attention kernels' GPU time per step, over the control",
               lambda r: (control[(r["batch"], r["prompt_tokens"])]["attention_ms_per_step"] / r["attention_ms_per_step"])
               if (r["batch"], r["prompt_tokens"]) in control and r.get("attention_ms_per_step") else None))
    for ax, (title, value) in zip(axes, panels):
        if ax is axes[1]:
            ax.plot(s, [1 / (0.5 + 0.5 * (1 - x)) for x in s], "k--", lw=1, label="byte bound (K always read)")
        ax.axhline(1.0, color="grey", lw=0.6)
        for i, cell in enumerate(cells):
            mine = [(r, value(r)) for r in rows if (r["batch"], r["prompt_tokens"]) == cell and value(r)]
            ax.scatter([r["sparsity"] for r, _ in mine], [v for _, v in mine], marker=markers[i % len(markers)],
                       label=f"B{cell[0]} × {cell[1]}")
            for r, v in mine:
                ax.annotate(r["engine"].replace("CUSTOM BLASST ", ""), (r["sparsity"], v), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("skipped fraction of eligible 16-key tiles (same run)")
        ax.set_xlim(-0.02, max(0.5, max((r["sparsity"] for r in rows), default=0) + 0.05))
    axes[0].set_ylabel("speedup, same cell and run")
    axes[1].legend(fontsize=7)
    prov = result.get("model_provenance") or {}
    model = f"{prov.get('model', Path(result.get('model', '?')).name)} ({prov.get('label', 'source unrecorded')})"
    fig.suptitle(f"BLASST decode, {model}, {result['environment'].get('gpu', '')}, commit "
                 f"{result['environment'].get('commit')}{note}", fontsize=9)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png)
    plt.close(fig)
    return png
