"""The txt2img/img2img panel and the settings section (gradio). Component order is the args model's field order:
the API's positional ``alwayson_scripts`` args read it."""

from __future__ import annotations

from html import escape
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
from .preview import compose, names_for, picks, preview_text, prompt_loras
from .schedule_picture import Pass, img2img_steps, render, sampling_passes

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
        with gr.Row():
            picker = gr.Dropdown(
                choices=[],
                value=[],
                multiselect=True,
                label="LoRAs to compose",
                info="the prompt's <lora> tags; none picked: all of them, the others stay merged",
                elem_id=f"{tab}_multilora_picks",
            )
            loras = gr.Textbox(
                value="",
                label="LoRAs to compose, by name",
                info="what is composed: the picks, or names typed here",
                placeholder="empty = every <lora> in the prompt",
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
        picture = gr.HTML("", elem_id=f"{tab}_multilora_schedule")
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
    watched = {name: getattr(script, "multilora_watched", {}).get(elem_id.format(tab=tab)) for name, elem_id in WATCHED}
    wire_picker(watched["prompt"], picker, loras)
    wire_preview(watched, is_img2img, preview, picture, components)
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


#: The webui's own components the preview reads (name, elem_id; ``{tab}``: txt2img or img2img), kept by
#: :func:`watch` as the webui creates them: the prompt and steps, txt2img's hires fix (its accordion's checkbox) and
#: hires steps, img2img's denoising strength.
WATCHED = (
    ("prompt", "{tab}_prompt"),
    ("steps", "{tab}_steps"),
    ("hires", "txt2img_hr-checkbox"),
    ("hires_steps", "txt2img_hires_steps"),
    ("denoising", "img2img_denoising_strength"),
)
WATCHED_IDS = {elem_id.format(tab=tab) for _, elem_id in WATCHED for tab in ("txt2img", "img2img")}


def watch(script: Any, component: Any, elem_id: str) -> None:
    """Keep a component the preview reads (the script's ``after_component``: the webui creates them before the
    panel in its default layout)."""
    if elem_id in WATCHED_IDS:
        vars(script).setdefault("multilora_watched", {})[elem_id] = component


def wire_picker(prompt: Any, picker: Any, loras: Any) -> None:
    """The picker offers the prompt's ``<lora>`` tags and shows those the ``LoRAs to compose`` field names (after a
    prompt edit, a typed name, a paste-back); a pick writes the field, which stays what is composed, stored, pasted
    and sent by the API. ``input`` is the user's own pick only, so the two never chase each other."""
    if prompt is None:
        return

    def offer(prompt_text: str, names: str) -> dict[str, Any]:
        return gr.update(choices=prompt_loras(prompt_text or ""), value=picks(prompt_text or "", names or ""))

    def pick(prompt_text: str, picked: list[str] | None, names: str) -> str:
        return names_for(prompt_text or "", list(picked or []), names or "")

    for source in (prompt, loras):
        source.change(fn=offer, inputs=[prompt, loras], outputs=[picker], show_progress=False)
    picker.input(fn=pick, inputs=[prompt, picker, loras], outputs=[loras], show_progress=False)


def wire_preview(
    watched: dict[str, Any], is_img2img: bool, preview: Any, picture: Any, components: dict[str, Any]
) -> None:
    """Refresh the preview line and the schedule picture when the prompt, the steps, the hires fix (txt2img), the
    denoising strength (img2img) or the panel change."""
    prompt, steps = watched["prompt"], watched["steps"]
    if prompt is None or steps is None:
        return
    extra = ("denoising",) if is_img2img else ("hires", "hires_steps")
    found = [name for name in extra if watched[name] is not None]
    names = [n for n in field_names() if n != "enabled"]
    inputs = [prompt, steps, components["enabled"], *(components[n] for n in names), *(watched[n] for n in found)]

    def update(prompt_text: str, steps_value: float, enabled_value: bool, *values: Any) -> tuple[str, str]:
        fields, extras = values[: len(names)], dict(zip(found, values[len(names) :], strict=True))
        try:
            args = MultiLoraArgs.from_dict({"enabled": enabled_value, **dict(zip(names, fields, strict=True))})
        except ValueError as e:
            return escape(f"Will fall back to Merge: {e}"), ""
        prompt_text, steps_count = prompt_text or "", int(steps_value or 0)
        composition = compose(prompt_text, args)
        passes, note = sampling_of(steps_count, is_img2img, extras, composition.args.hires)
        return escape(preview_text(prompt_text, passes[0].steps, args)), render(composition, passes, note)

    for component in inputs:
        component.change(fn=update, inputs=inputs, outputs=[preview, picture], show_progress=False)


def sampling_of(steps: int, is_img2img: bool, extras: dict[str, Any], hires: str) -> tuple[list[Pass], str]:
    """The passes a generation would run with the tab's settings, and a note for the picture: img2img counts only
    the steps after its denoising strength; txt2img adds the hires pass when the hires fix is on."""
    if is_img2img:
        if "denoising" not in extras:
            return sampling_passes(steps), "img2img: its denoising strength was not found; all steps shown."
        strength = float(extras["denoising"] or 0)
        fix = bool(getattr(shared.opts, "img2img_fix_steps", False))
        counted = img2img_steps(steps, strength, fix)
        return sampling_passes(counted), f"img2img at denoising strength {strength:g}: {counted} of {steps} steps run."
    if "hires" not in extras or "hires_steps" not in extras:
        return sampling_passes(steps), "The hires fix's controls were not found: its pass is not shown."
    hires_steps = int(extras["hires_steps"] or 0) if extras["hires"] else None
    return sampling_passes(steps, hires_steps, hires), ""
