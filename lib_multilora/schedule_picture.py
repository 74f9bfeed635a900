"""The schedule as a picture for the panel: one row per composed LoRA, one column per sampling step (the first pass,
then the hires pass), as inline SVG in the webui's own colours (``currentColor``, ``--color-accent``), so it reads
in light and dark themes.

Every cell comes from :func:`schedule.active_loras`, the function the inner-model wrapper runs, over the passes the
webui runs (:func:`sampling_passes`, with :func:`schedule.hires_offset` as the run starts the hires pass), so the
picture cannot disagree with what runs. Cells carry ``data-*`` attributes (pass, step, LoRA, state, weight, UNet
passes) for the browser tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from .args import MIXING
from .preview import Composition
from .schedule import active_loras, hires_offset

#: The element the panel's picture lives in (its CSS is scoped to it).
CSS_CLASS = "multilora-schedule"
#: Whole pixels of the drawing: the widest a step column gets, the narrowest, and the width the steps share.
CELL_MAX, CELL_MIN, PLOT_WIDTH = 16, 4, 560
ROW, CELL, GAP, BAR, LABEL_CHAR = 16, 12, 10, 6, 6.5
STYLE = f"""<style>
.{CSS_CLASS} svg {{ max-width: 100%; height: auto; font: 11px var(--font, sans-serif); overflow: visible; }}
.{CSS_CLASS} text {{ fill: currentColor; }}
.{CSS_CLASS} [data-state=run] {{ fill: var(--color-accent, currentColor); }}
.{CSS_CLASS} [data-state=wait] {{ fill: none; stroke: currentColor; stroke-opacity: 0.35; }}
.{CSS_CLASS} [data-state=skipped] {{ fill: none; stroke: currentColor; stroke-opacity: 0.2; stroke-dasharray: 2 2; }}
.{CSS_CLASS} [data-state=merged] {{ fill: currentColor; fill-opacity: 0.18; }}
.{CSS_CLASS} [data-passes] {{ fill: currentColor; fill-opacity: 0.45; }}
.{CSS_CLASS} p {{ margin: 0.25em 0; opacity: 0.85; }}
</style>"""


@dataclass(frozen=True)
class Pass:
    """One sampling pass: ``steps`` steps as the webui's step counter counts them, the method's count starting at
    ``offset`` (a hires pass that continues the first pass's count), or None where the pass runs merged."""

    name: str
    steps: int
    offset: int | None = 0


def sampling_passes(steps: int, hires_steps: int | None = None, hires: str = "Restart") -> list[Pass]:
    """The passes of a generation of ``steps`` steps and, with ``hires_steps`` (0: as many as ``steps``, the webui's
    rule), a hires pass, which the run starts at :func:`schedule.hires_offset` for the ``hires`` mode."""
    first = Pass("first", steps)
    if hires_steps is None:
        return [first]
    return [first, Pass("hires", hires_steps or steps, hires_offset(hires, steps))]


def img2img_steps(steps: int, denoising_strength: float, fix_steps: bool) -> int:
    """The steps img2img counts for ``steps`` at ``denoising_strength`` (the webui's ``setup_img2img_steps`` and its
    ``launch_sampling(t_enc + 1)``): the strength's part of the steps, plus one; all of them with the webui's
    "do exactly the amount of steps the slider specifies" setting (``fix_steps``)."""
    if fix_steps:
        return steps
    return int(min(denoising_strength, 0.999) * steps) + 1


@dataclass(frozen=True)
class Column:
    """One step of one pass: the LoRAs run (none: every LoRA acts merged) and the UNet passes it costs."""

    pass_name: str
    step: int
    count: int
    active: tuple[int, ...]
    unet_passes: int


def columns(composition: Composition, passes: list[Pass]) -> list[Column]:
    """Every step of ``passes`` for ``composition`` (which must compose something): what
    :func:`schedule.active_loras` runs there."""
    args, n = composition.args, len(composition.names)
    weights = list(composition.weights) if composition.weights is not None else None
    out = []
    for ps in passes:
        for step in range(ps.steps):
            if ps.offset is None:
                out.append(Column(ps.name, step, step, (), 1))
                continue
            count, total = ps.offset + step, ps.offset + ps.steps
            active = active_loras(count, total, args.method, n, args.tau, weights, args.window)
            cost = len(active) + (args.method == "Spatial") if active else 1
            out.append(Column(ps.name, step, count, tuple(active), cost))
    return out


def unscheduled(composition: Composition, cols: list[Column]) -> list[str]:
    """Switch: per pass that runs the method, the LoRAs its schedule never reaches (the run warns about them)."""
    if composition.args.method != "Switch":
        return []
    out = []
    for name in dict.fromkeys(c.pass_name for c in cols):
        used = {k for c in cols if c.pass_name == name for k in c.active}
        if used:
            out += [f"{composition.names[k]} ({name} pass)" for k in range(len(composition.names)) if k not in used]
    return out


def render(composition: Composition, passes: list[Pass], note: str = "") -> str:
    """The picture as HTML (an SVG and a caption); where the run would be Merge, the reason instead."""
    if composition.fallback:
        return f'<div class="{CSS_CLASS}" data-fallback="1"><p>{escape(composition.fallback)}</p></div>'
    if not any(ps.steps for ps in passes):
        return f'<div class="{CSS_CLASS}" data-fallback="1"><p>No sampling steps.</p></div>'
    cols = columns(composition, passes)
    names = list(composition.names)
    svg = _svg(composition, passes, cols)
    caption = [_legend(composition), note]
    missed = unscheduled(composition, cols)
    if missed:
        caption.append(
            f"Warning: no step for {', '.join(missed)}: more LoRAs than the steps allow at this switch interval."
        )
    paragraphs = "".join(f"<p>{escape(line)}</p>" for line in caption if line)
    rows = escape(",".join(names), quote=True)
    head = f'<div class="{CSS_CLASS}" data-method="{composition.args.method}" data-loras="{rows}">'
    return f"{head}{STYLE}{svg}{paragraphs}</div>"


def _legend(composition: Composition) -> str:
    args = composition.args
    if args.method == "Switch":
        what = f"Filled: the one LoRA in the UNet (Switch every {args.tau} steps)."
    else:
        what = "Shade: the LoRA's weight in the mean; dashed: weight 0, not run."
        if args.method == "Spatial":
            what += " Spatial's patches reweigh it; its base pass is the +1."
    return f"Rows: composed LoRAs; columns: sampling steps. {what} Grey: merged, as without Multi-LoRA."


def _svg(composition: Composition, passes: list[Pass], cols: list[Column]) -> str:
    names = list(composition.names)
    label_w = int(min(max(len(n) for n in [*names, "UNet passes"]) * LABEL_CHAR + 8, 140))
    cell = max(CELL_MIN, min(CELL_MAX, PLOT_WIDTH // max(1, len(cols))))
    weights = composition.weights
    top = 2 * ROW  # a line for the passes' names, one for the step numbers
    x_of: dict[tuple[str, int], int] = {}
    x = label_w
    starts = {}
    for ps in passes:
        starts[ps.name] = x
        for step in range(ps.steps):
            x_of[(ps.name, step)] = x
            x += cell
        x += GAP
    width = x - GAP
    height = top + ROW * (len(names) + 1) + 6
    size = f'width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" {size}>']
    for ps in passes:
        if not ps.steps:
            continue
        title = "steps" if ps.name == "first" else "hires pass"
        title += " (merged: Hires pass Off)" if ps.offset is None else ""
        parts.append(f'<text x="{starts[ps.name]}" y="{ROW - 4}">{escape(title)}</text>')
        every = _tick_every(cell)
        for c in cols:
            if c.pass_name == ps.name and (c.step % every == 0):
                parts.append(f'<text x="{x_of[(ps.name, c.step)]}" y="{2 * ROW - 4}">{c.count}</text>')
    for k, name in enumerate(names):
        y = top + k * ROW
        parts.append(f'<text x="0" y="{y + CELL - 1}"><title>{escape(name)}</title>{escape(_short(name))}</text>')
        for c in cols:
            state, weight = _state(composition, c, k)
            shade = "" if weight is None or composition.args.method == "Switch" else _shade(weight, weights)
            parts.append(
                f'<rect x="{x_of[(c.pass_name, c.step)] + 0.5}" y="{y + 0.5}" width="{cell - 1.5}" '
                f'height="{CELL - 1}"{shade} data-lora="{escape(name, quote=True)}" data-pass="{c.pass_name}" '
                f'data-step="{c.step}" data-state="{state}"'
                + (f' data-weight="{weight:.4g}"' if weight is not None else "")
                + "/>"
            )
    y = top + len(names) * ROW
    parts.append(f'<text x="0" y="{y + ROW + 2}">UNet passes</text>')
    most = max(c.unet_passes for c in cols)
    for c in cols:
        h = max(2.0, BAR * c.unet_passes / most)
        parts.append(
            f'<rect x="{x_of[(c.pass_name, c.step)] + 0.5}" y="{y + ROW + 4 - h:.1f}" '
            f'width="{cell - 1.5}" height="{h:.1f}" data-pass="{c.pass_name}" data-step="{c.step}" '
            f'data-passes="{c.unet_passes}"/>'
        )
    parts += _pass_counts(cols, x_of, cell, y + ROW - 6)
    parts.append("</svg>")
    return "".join(parts)


def _state(composition: Composition, column: Column, k: int) -> tuple[str, float | None]:
    """A LoRA's cell: ``run`` (with its weight), ``wait`` (another LoRA's step), ``skipped`` (weight 0) or
    ``merged`` (outside the window: every LoRA acts merged)."""
    if not column.active:
        return "merged", None
    if k in column.active:
        if composition.args.method not in MIXING:
            return "run", 1.0
        weights = composition.weights
        return "run", (weights[k] if weights is not None else 1 / len(composition.names))
    if composition.args.method in MIXING:
        return "skipped", 0.0
    return "wait", None


def _shade(weight: float, weights: tuple[float, ...] | None) -> str:
    """Composite's cells: the largest weight full, the others lighter in proportion (never invisible)."""
    top = max(weights) if weights else weight
    return f' fill-opacity="{0.2 + 0.8 * weight / top:.3f}"'


def _pass_counts(cols: list[Column], x_of: dict[tuple[str, int], int], cell: int, y: int) -> list[str]:
    """The number of UNet passes over each run of steps that cost the same, where it fits (baseline ``y``)."""
    out = []
    runs: list[list[Column]] = []
    for c in cols:
        if runs and runs[-1][-1].pass_name == c.pass_name and runs[-1][-1].unet_passes == c.unet_passes:
            runs[-1].append(c)
        else:
            runs.append([c])
    for run in runs:
        width = cell * len(run)
        if width < 8:
            continue
        x = x_of[(run[0].pass_name, run[0].step)] + width / 2
        out.append(f'<text x="{x:.1f}" y="{y}" text-anchor="middle" font-size="9">{run[0].unet_passes}</text>')
    return out


def _tick_every(cell: int) -> int:
    """Label every k-th step so that labels stay ~24 px apart."""
    return next(k for k in (1, 2, 5, 10, 20, 25, 50, 100, 1000) if k * cell >= 24)


def _short(name: str, limit: int = 20) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
