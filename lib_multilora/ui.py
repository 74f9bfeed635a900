"""The txt2img/img2img panel and the settings section (gradio). Component order is the args model's field order:
the API's positional ``alwayson_scripts`` args read it."""

from __future__ import annotations

from typing import Any

import gradio as gr
from modules import shared
from modules.ui_components import InputAccordion

from .args import (
    EXECUTIONS,
    HIRES_MODES,
    METHODS,
    MIXING,
    TAU_MAX,
    TAU_MIN,
    TEXT_ENCODER_POLICIES,
    MultiLoraArgs,
    field_names,
    label_of,
)
from .preview import preview_text

SECTION = ("multilora", "Multi-LoRA Composition")


def default(name: str) -> Any:
    """The panel default: the user's setting where there is one, else the args model's."""
    return getattr(shared.opts, f"multilora_default_{name}", getattr(MultiLoraArgs, name))


def show_in_img2img() -> bool:
    return bool(getattr(shared.opts, "multilora_img2img", True))


def build_panel(script: Any, is_img2img: bool, unavailable: str | None = None) -> list[Any]:
    """Create the panel, wire infotext paste-back, and return the components in positional-arg order. With
    ``unavailable`` (why this webui cannot run it) the panel says so first; generations then run as without it."""
    tab = "img2img" if is_img2img else "txt2img"
    with InputAccordion(False, label="Multi-LoRA Composition", elem_id=f"{tab}_multilora") as enabled:
        if unavailable:
            gr.Markdown(f"Multi-LoRA is off on this webui: {unavailable}.")
        with gr.Row():
            method = gr.Radio(list(METHODS), value=default("method"), label="Method", elem_id=f"{tab}_multilora_method")
            tau = gr.Slider(
                TAU_MIN,
                TAU_MAX,
                value=default("tau"),
                step=1,
                label="Switch every τ steps",
                elem_id=f"{tab}_multilora_tau",
                visible=default("method") == "Switch",
            )
        loras = gr.Textbox(
            value="",
            label="LoRAs to compose",
            placeholder="empty = every <lora> in the prompt; names here are composed, the others stay merged",
            elem_id=f"{tab}_multilora_loras",
        )
        with gr.Row():
            execution = gr.Radio(
                list(EXECUTIONS),
                value=default("execution"),
                label="Composite execution",
                elem_id=f"{tab}_multilora_execution",
                visible=default("method") in MIXING,
            )
            weights = gr.Textbox(
                value="",
                label="Composite weights",
                placeholder="empty = equal; e.g. 2,1,1",
                elem_id=f"{tab}_multilora_weights",
                visible=default("method") in MIXING,
            )
        with gr.Row(visible=default("method") == "Spatial") as spatial_row:
            patch = gr.Slider(
                1,
                32,
                value=MultiLoraArgs.patch,
                step=1,
                label="Spatial patch (latent px)",
                elem_id=f"{tab}_multilora_patch",
            )
            temperature = gr.Number(
                value=MultiLoraArgs.temperature,
                label="Spatial temperature",
                step=0.01,
                minimum=0.001,
                elem_id=f"{tab}_multilora_temperature",
            )
        with gr.Row():
            window_info = "up to 1: a fraction of the steps; above 1: a step number"
            start = gr.Number(
                value=MultiLoraArgs.start,
                label="Runs from",
                info=window_info,
                step=0.05,
                minimum=0,
                elem_id=f"{tab}_multilora_start",
            )
            end = gr.Number(
                value=MultiLoraArgs.end,
                label="until (merged outside)",
                info=window_info,
                step=0.05,
                minimum=0,
                elem_id=f"{tab}_multilora_end",
            )
        with gr.Row():
            text_encoder = gr.Radio(
                list(TEXT_ENCODER_POLICIES),
                value=MultiLoraArgs.text_encoder,
                label="Text encoder sees",
                elem_id=f"{tab}_multilora_text_encoder",
            )
            hires = gr.Radio(
                list(HIRES_MODES), value=MultiLoraArgs.hires, label="Hires pass", elem_id=f"{tab}_multilora_hires"
            )
        preview = gr.Markdown("", elem_id=f"{tab}_multilora_preview")
    components = {
        "enabled": enabled,
        "method": method,
        "tau": tau,
        "loras": loras,
        "execution": execution,
        "text_encoder": text_encoder,
        "hires": hires,
        "weights": weights,
        "start": start,
        "end": end,
        "patch": patch,
        "temperature": temperature,
    }
    method.change(
        fn=method_controls, inputs=[method], outputs=[tau, execution, weights, spatial_row], show_progress=False
    )
    wire_preview(script, preview, enabled, components)
    method_label = label_of("method")
    script.infotext_fields = [(enabled, lambda params: method_label in params)] + [
        (components[name], label_of(name)) for name in field_names() if name != "enabled"
    ]
    script.paste_field_names = [label_of(name) for name in field_names() if name != "enabled"]
    return [components[name] for name in field_names()]


def method_controls(method: str) -> tuple[dict[str, Any], ...]:
    """Show only the controls of the chosen method: τ for Switch, execution and weights for Composite and Spatial,
    patch and temperature for Spatial (values are kept and still reach the args, so a paste-back or an API call sees
    the same fields)."""
    mixing = gr.update(visible=method in MIXING)
    return gr.update(visible=method == "Switch"), mixing, mixing, gr.update(visible=method == "Spatial")


def on_ui_settings() -> None:
    options = {
        "multilora_default_method": shared.OptionInfo(
            MultiLoraArgs.method, "Default method", gr.Radio, {"choices": list(METHODS)}
        ),
        "multilora_default_tau": shared.OptionInfo(
            MultiLoraArgs.tau,
            "Default Switch interval τ (steps)",
            gr.Slider,
            {"minimum": TAU_MIN, "maximum": TAU_MAX, "step": 1},
        ),
        "multilora_default_execution": shared.OptionInfo(
            MultiLoraArgs.execution, "Default Composite execution", gr.Radio, {"choices": list(EXECUTIONS)}
        ).info("Batched: one UNet call with the batch replicated per LoRA (faster on GPU, N× activation memory)"),
        "multilora_img2img": shared.OptionInfo(True, "Show the panel in img2img").needs_reload_ui(),
        "multilora_controlnet_reuse": shared.OptionInfo(
            True, "Reuse ControlNet's control across the passes of a Composite step (A1111)"
        ).info("exact: the control sees no LoRA; off, each pass computes it again (N ControlNet runs per step)"),
    }
    for name, option in options.items():
        option.section = SECTION
        shared.opts.add_option(name, option)


def wire_preview(script: Any, preview: Any, enabled: Any, components: dict[str, Any]) -> None:
    """Refresh the schedule preview when the prompt, steps or panel change (prompt and steps are the webui's own
    components, captured by the script's ``after_component``)."""
    prompt, steps = getattr(script, "prompt_component", None), getattr(script, "steps_component", None)
    if prompt is None or steps is None:
        return
    names = [n for n in field_names() if n != "enabled"]
    inputs = [prompt, steps, enabled, *(components[n] for n in names)]

    def update(prompt_text: str, steps_value: float, enabled_value: bool, *values: Any) -> str:
        try:
            args = MultiLoraArgs.from_dict({"enabled": enabled_value, **dict(zip(names, values, strict=True))})
        except ValueError as e:
            return f"Will fall back to Merge: {e}"
        return preview_text(prompt_text or "", int(steps_value or 0), args)

    for component in inputs:
        component.change(fn=update, inputs=inputs, outputs=[preview], show_progress=False)
