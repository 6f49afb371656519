"""Quality versus decoding steps and guidance scale, and the FID-vs-CLIP front: JSON and PNG plots (matplotlib, Agg)."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

REQUIRED_KEYS = ("steps", "guidance", "accuracy", "fid", "sec_per_image")


def write_sweep(results: Sequence[dict[str, Any]], out_dir: str, name: str = "sweep",
                title: str | None = None, x: str = "steps") -> tuple[str, str]:
    """Writes `results` (dicts with steps, guidance, accuracy, fid, sec_per_image, and any
    extra keys) to OUT_DIR/NAME.json and plots accuracy and FID against `x` ("steps" or
    "guidance"), one line per value of the other, the sampling time per image beside each
    point, to NAME.png. Returns (json path, png path)."""
    if x not in ("steps", "guidance"):
        raise ValueError(f"x must be 'steps' or 'guidance', got {x!r}")
    series = "guidance" if x == "steps" else "steps"
    if not results:
        raise ValueError("write_sweep needs at least one result")
    for i, r in enumerate(results):
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            raise ValueError(f"sweep result {i} lacks {missing}: {r}")
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump({"results": list(results)}, f, indent=2, sort_keys=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for value in sorted({r[series] for r in results}):
        rows = sorted((r for r in results if r[series] == value), key=lambda r: r[x])
        steps = [r[x] for r in rows]
        for ax, key in zip(axes, ("accuracy", "fid")):
            values = [r[key] for r in rows]
            ax.plot(steps, values, marker="o", label=f"{series} {value:g}")
            for s, v, r in zip(steps, values, rows):
                ax.annotate(f"{r['sec_per_image']:.3g}s", (s, v), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for ax, label in zip(axes, ("text alignment accuracy (fully correct)", "FID")):
        ax.set_xlabel("decoding steps" if x == "steps" else "guidance scale")
        ax.set_ylabel(label)
        ax.set_xticks(sorted({r[x] for r in results}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"quality vs {'decoding steps' if x == 'steps' else 'guidance scale'}"
                 " (labels: sampling seconds per image)")
    fig.tight_layout()
    png_path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path


def write_front(results: Sequence[dict[str, Any]], out_dir: str, name: str, x: str,
                clip_model: str | None = None) -> tuple[str, str]:
    """Writes `results` (dicts with the swept `x`, fid, clip_score and sec_per_image; fid or
    clip_score may be None) to OUT_DIR/NAME.json, and plots FID against CLIP score, one point per
    value of `x` labelled with it and the sampling time per image (Muse's Figure 8), to NAME.png.
    Without one of the two scores, the other is plotted against `x`. Returns (json path, png path)."""
    if not results:
        raise ValueError("write_front needs at least one result")
    for i, r in enumerate(results):
        missing = [k for k in (x, "fid", "clip_score", "sec_per_image") if k not in r]
        if missing:
            raise ValueError(f"sweep result {i} lacks {missing}: {r}")
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump({"results": list(results), "x": x, "clip_model": clip_model}, f, indent=2, sort_keys=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(results, key=lambda r: r[x])
    have_fid = all(r["fid"] is not None for r in rows)
    have_clip = all(r["clip_score"] is not None for r in rows)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if have_fid and have_clip:
        xs, ys = [r["clip_score"] for r in rows], [r["fid"] for r in rows]
        ax.set_xlabel(f"CLIP score ({clip_model})")
        ax.set_ylabel("FID")
    else:
        key = "fid" if have_fid else "clip_score" if have_clip else "sec_per_image"
        xs, ys = [r[x] for r in rows], [r[key] for r in rows]
        ax.set_xlabel(x)
        ax.set_ylabel({"fid": "FID", "clip_score": f"CLIP score ({clip_model})"}.get(key, "seconds per image"))
    ax.plot(xs, ys, marker="o")
    for a, b, r in zip(xs, ys, rows):
        ax.annotate(f"{r[x]:g}, {r['sec_per_image']:.3g}s", (a, b), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.grid(alpha=0.3)
    what = "FID vs CLIP score" if have_fid and have_clip else f"{ax.get_ylabel()} vs {x}"
    ax.set_title(f"{what} (labels: {x}, sampling seconds per image)", fontsize=9)
    fig.tight_layout()
    png_path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path
