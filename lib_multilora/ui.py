"""The txt2img/img2img panel (gradio). Component order is the args model's field order: the API reads it."""

from __future__ import annotations

from typing import Any

import gradio as gr
from modules.ui_components import InputAccordion

from .args import METHODS, TAU_MAX, TAU_MIN, MultiLoraArgs, field_names, label_of


def build_panel(script: Any, is_img2img: bool) -> list[Any]:
    """Create the panel, wire infotext paste-back, and return the components in positional-arg order."""
    tab = "img2img" if is_img2img else "txt2img"
    defaults = MultiLoraArgs()
    with InputAccordion(defaults.enabled, label="Multi-LoRA Composition", elem_id=f"{tab}_multilora") as enabled:
        method = gr.Radio(list(METHODS), value=defaults.method, label="Method", elem_id=f"{tab}_multilora_method")
        tau = gr.Slider(
            TAU_MIN, TAU_MAX, value=defaults.tau, step=1, label="Switch every τ steps", elem_id=f"{tab}_multilora_tau"
        )
        loras = gr.Textbox(
            value=defaults.loras,
            label="LoRAs to compose",
            placeholder="empty = every <lora> in the prompt; names here are composed, the others stay merged",
            elem_id=f"{tab}_multilora_loras",
        )
    components = {"enabled": enabled, "method": method, "tau": tau, "loras": loras}
    method_label = label_of("method")
    script.infotext_fields = [(enabled, lambda params: method_label in params)] + [
        (components[name], label_of(name)) for name in field_names() if name != "enabled"
    ]
    script.paste_field_names = [label_of(name) for name in field_names() if name != "enabled"]
    return [components[name] for name in field_names()]
