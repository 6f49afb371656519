"""Quality versus decoding steps and guidance scale: JSON and a PNG plot (matplotlib, Agg)."""
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
