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


def plot_serve_speedups(result: dict, png: str | Path) -> Path:
    """Decode speedup over CUSTOM dense (FA3) against the skipped fraction of the same run,
    one marker per (engine, cell), with the byte bound 1 / (0.5 + 0.5 (1 - s)) drawn."""
    plt = _pyplot()
    rows = [r for r in result["summary"]["rows"] if r.get("sparsity") is not None and r.get("speedup_vs_dense")]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    s = [i / 100 for i in range(0, 96)]
    ax.plot(s, [1 / (0.5 + 0.5 * (1 - x)) for x in s], "k--", lw=1, label="byte bound (K always read)")
    ax.axhline(1.0, color="grey", lw=0.6)
    cells = sorted({(r["batch"], r["prompt_tokens"]) for r in rows})
    markers = "osD^v<>p"
    for i, (b, n) in enumerate(cells):
        mine = [r for r in rows if (r["batch"], r["prompt_tokens"]) == (b, n)]
        ax.scatter([r["sparsity"] for r in mine], [r["speedup_vs_dense"] for r in mine], marker=markers[i % len(markers)],
                   label=f"B{b} × {n}" + (" (eager)" if any("eager" in r["engine"] for r in mine) else ""))
        for r in mine:
            ax.annotate(r["engine"].replace("CUSTOM BLASST ", "").replace(" (eager)", "e"), (r["sparsity"], r["speedup_vs_dense"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
    model = (result.get("model_provenance") or {}).get("label") or Path(result.get("model", "?")).name
    ax.set_xlabel("skipped fraction of eligible 16-key tiles (same run)")
    ax.set_ylabel("decode TPOT speedup over CUSTOM dense (FA3)")
    ax.set_title(f"BLASST decode on {model}\n{result['environment'].get('gpu', '')}", fontsize=9)
    ax.set_xlim(0, max(0.5, max((r["sparsity"] for r in rows), default=0) + 0.05))
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png)
    plt.close(fig)
    return png
