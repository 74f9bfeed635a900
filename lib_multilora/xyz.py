"""X/Y/Z plot axes, so Merge vs Switch vs Composite can be compared in one grid (host glue).

Each axis records its value on the cell's ``p`` (``p.multilora_override``); :func:`host.on_process` applies it over
the panel's args.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .args import EXECUTIONS, HIRES_MODES, MERGE, METHODS, TEXT_ENCODER_POLICIES

PREFIX = "[Multi-LoRA] "


def set_override(p: Any, **values: Any) -> None:
    # a fresh dict per cell: X/Y/Z cells are shallow copies of one p
    p.multilora_override = {**getattr(p, "multilora_override", {}), **values}


def field_axis(name: str) -> Callable[[Any, Any, Any], None]:
    def apply(p: Any, x: Any, xs: Any) -> None:
        set_override(p, **{name: x})

    return apply


def apply_method(p: Any, x: str, xs: Any) -> None:
    """``Merge`` turns the extension off for the cell (and says so in its infotext); a method turns it on."""
    if x.strip().lower() in (MERGE.lower(), "off"):
        set_override(p, enabled=False)
        p.multilora_cell_is_merge = True
    else:
        set_override(p, enabled=True, method=x)


def add_axes() -> None:
    """Append our axes to the built-in X/Y/Z script (called from ``on_before_ui``; idempotent)."""
    from modules import scripts

    module = next((s.module for s in scripts.scripts_data if s.script_class.__module__ == "xyz_grid.py"), None)
    if module is None or any(o.label.startswith(PREFIX) for o in module.axis_options):
        return
    option = module.AxisOption
    module.axis_options.extend(
        [
            option(f"{PREFIX}Method", str, apply_method, choices=choices((MERGE, *METHODS))),
            option(f"{PREFIX}Switch τ", int, field_axis("tau")),
            option(f"{PREFIX}Composite execution", str, field_axis("execution"), choices=choices(EXECUTIONS)),
            option(f"{PREFIX}Text encoder", str, field_axis("text_encoder"), choices=choices(TEXT_ENCODER_POLICIES)),
            option(f"{PREFIX}Hires pass", str, field_axis("hires"), choices=choices(HIRES_MODES)),
            option(f"{PREFIX}Composite weights", str, field_axis("weights")),
            option(f"{PREFIX}Window start", float, field_axis("start")),
            option(f"{PREFIX}Window end", float, field_axis("end")),
            option(f"{PREFIX}Spatial patch", int, field_axis("patch")),
            option(f"{PREFIX}Spatial temperature", float, field_axis("temperature")),
        ]
    )


def choices(values: tuple[str, ...]) -> Callable[[], list[str]]:
    return lambda: list(values)
