"""The markdown report of an evaluated workdir (W/report.md): samples, alignment, stage tables, tokenizer, time."""
from __future__ import annotations

import pathlib


def _pct(x) -> str:
    return f"{100 * x:.1f} %"


def _stage_lines(stages: dict | None) -> list[str]:
    """Markdown: the stage-by-stage tables (`evaluation.run.stage_breakdown`), if they were run."""
    if not stages:
        return []
    lines = [
        "### Stage by stage", "",
        "Where the cascade loses what the caption says: real images, the tokenizer alone, the super-res "
        "stage given the real images' base tokens, the base stage alone (upsampled), the whole cascade. "
        "A stage's row bounds what the stages after it can reach.", "",
    ]
    for kind, rows in stages.items():
        first = next(iter(rows.values()))
        attrs = sorted(first["attributes"])
        lines += [
            f"{first['num']} test captions of {kind}:", "",
            "| images | fully correct | " + " | ".join(attrs) + " |", "|---|---|" + "---|" * len(attrs),
            *[f"| {name} | {_pct(r['all'])} | " + " | ".join(_pct(r["attributes"][k]) for k in attrs) + " |"
              for name, r in rows.items()], "",
        ]
    return lines


def _curve_lines(curve: dict | None) -> list[str]:
    """Markdown: text alignment against training steps (`evaluation.run.training_curve`), if it was run."""
    if not curve:
        return []
    rows = curve["results"]
    groups = list(rows[0]["groups"])
    return [
        "### Text alignment against training steps", "",
        "The same prompts and decoding settings at evenly spaced checkpoints of training:", "",
        "![training curve](eval/curve.png)", "",
        "| steps | all | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups),
        *[f"| {', '.join(f'{k} {v}' for k, v in r['steps'].items())} | {_pct(r['all'])} | "
          + " | ".join(_pct(r["groups"][g]) for g in groups) + " |" for r in rows], "",
        *_curve_attribute_lines(rows),
    ]


def _curve_attribute_lines(rows: list[dict]) -> list[str]:
    """Markdown: colour, count and shape of the two-object groups at each curve point (a fully-correct
    rate can stay flat while these rise)."""
    groups = [g for g in ("relation", "places") if all(g in r.get("attributes", {}) for r in rows)]
    if not groups:
        return []
    attrs = ("color", "count", "shape")
    return [
        "Two-object prompts, per attribute (" + ", ".join(attrs) + "):", "",
        "| steps | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups),
        *[f"| {', '.join(f'{k} {v}' for k, v in r['steps'].items())} | "
          + " | ".join(" / ".join(_pct(r["attributes"][g][a]) for a in attrs) for g in groups) + " |" for r in rows],
        "",
    ]


def _tokenizer_alignment_lines(kept: dict | None) -> list[str]:
    if not kept:
        return []
    return ["Test scenes the detector reads fully right in the reconstructions (the super-res stage's "
            "tokenizer at full size, the base stage's at its input size):", "",
            "| reconstructions | " + " | ".join(kept["full size"]) + " |", "|---|" + "---|" * len(kept["full size"]),
            *[f"| {size} | " + " | ".join(f"{_pct(r['all'])} of {r['num']}" for r in rows.values()) + " |"
              for size, rows in kept.items()], ""]


def write_report(workdir: pathlib.Path, cfg, ev: dict, timings: dict) -> pathlib.Path:
    """W/report.md: the sample grids, the metrics, and the commands to sample and edit."""
    gen, tok = ev["generation"], ev["tokenizer"]
    align = gen["alignment"]
    lines = [
        "# muse_jax quickstart report", "",
        f"Workdir `{workdir}`; config `{cfg.get('name', 'shapes')}`; dataset {cfg.data.num_train} train / "
        f"{cfg.data.num_test} test images (shapes spec v1).", "",
        "## Samples", "",
        "One row per prompt (`samples/prompts_grid.txt` lists them):", "",
        "![samples](samples/prompts_grid.png)", "",
        "Evaluation prompts, one row per group (one object seen, held-out pair, relation, places):", "",
        "![eval samples](eval/samples.png)", "",
        "## Text alignment (fully correct: every stated attribute right)", "",
        "| group | prompts | fully correct | " + " | ".join(sorted(align["attributes"])) + " |",
        "|---|---|---|" + "---|" * len(align["attributes"]),
    ]
    for g, r in list(align["groups"].items()) + [("all", {"num": align["num"], **align})]:
        lines.append(f"| {g} | {r['num']} | {_pct(r['all'])} | " + " | ".join(
            _pct(r["attributes"][k]) if k in r["attributes"] else "-" for k in sorted(align["attributes"])) + " |")
    lines += [
        "", f"In-domain FID (shapes features) against 1000 test images: {gen['fid_shapes']:.2f}; "
        f"sampling {gen['sec_per_image'] * 1000:.0f} ms per image (after compilation).", "",
        *_stage_lines(ev.get("stages")),
        *_curve_lines(ev.get("curve")),
        "## Tokenizer", "",
        f"PSNR {tok['psnr']:.2f} dB (the base stage's tokenizer at its {tok.get('base_image_size', '?')} px: "
        f"{tok.get('psnr_lowres', float('nan')):.2f} dB), "
        f"SSIM {tok['ssim']:.4f}, reconstruction FID (shapes features) "
        f"{tok['rfid_shapes']:.2f}, codebook usage {_pct(tok['codebook']['fraction_used'])} "
        f"(perplexity {tok['codebook']['perplexity']:.1f}) on {tok['num_images']} test images.", "",
        *_tokenizer_alignment_lines(tok.get("alignment")),
        "## Time", "",
        "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in timings.items()], "",
        "## Go further", "", "```bash",
        f'muse-jax sample --workdir {workdir} --prompt "a large blue circle in the center" --num 8 --out grid.png',
        f'muse-jax sample --workdir {workdir} --prompts-file prompts.txt --out-dir samples/',
        f'muse-jax edit --workdir {workdir} --image in.png --mask mask.png --prompt "a red square in the center" '
        "--out inpainted.png",
        f'muse-jax edit --workdir {workdir} --image in.png --prompt "a green cross on the left" --out edited.png',
        f"muse-jax eval --workdir {workdir} --out {workdir}/eval --sweep-steps 4,8,12,24 --sweep-guidance 0,1,3,5",
        "```", "",
    ]
    path = workdir / "report.md"
    path.write_text("\n".join(lines))
    return path
