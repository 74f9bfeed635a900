"""Entry script: an always-on panel that runs LoRA Switch or LoRA Composite (Zhong et al., 2024) per sampling pass.

Thin on purpose: the method lives in ``lib_multilora``; this file connects the webui's callbacks to the pass sequence
(:mod:`lib_multilora.generation`) over the running webui's glue (found by :func:`hosts.detect`). On any other webui
the panel says why it is off and every generation runs as without the extension.
"""

from __future__ import annotations

from typing import Any

from modules import script_callbacks, scripts

from lib_multilora import generation, hosts, webui, xyz
from lib_multilora.ui import build_panel, on_ui_settings, show_in_img2img, watch

HOST = hosts.detect()
UNAVAILABLE = HOST if isinstance(HOST, str) else None


class MultiLoraScript(scripts.Script):
    def title(self) -> str:
        return "Multi-LoRA Composition"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible if show_in_img2img() or not is_img2img else False

    def after_component(self, component: Any, **kwargs: Any) -> None:
        """Keep the webui's components the schedule preview reads (prompt, steps, hires fix, denoising)."""
        watch(self, component, kwargs.get("elem_id") or getattr(component, "elem_id", None) or "")

    def ui(self, is_img2img: bool) -> list[Any]:
        return build_panel(self, is_img2img, unavailable=UNAVAILABLE)

    def process(self, p: Any, *args: Any) -> None:
        if UNAVAILABLE is None:
            generation.begin(p, args, HOST)
            return
        generation.read_args(p, args)
        if generation.effective_args(p) is not None:
            generation.warn(p, f"{UNAVAILABLE}; running without Multi-LoRA")

    def process_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        if UNAVAILABLE is not None:
            return
        try:
            generation.apply_text_encoder_policy(p, HOST)
        except Exception as e:
            generation.restore_text_encoder(p, HOST)
            generation.warn(p, f"internal error in the text-encoder policy, using All: {e!r}")

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        if UNAVAILABLE is not None:
            return
        try:
            generation.start_pass(p, HOST)
        except Exception as e:  # never break the generation: undo and say so
            HOST.finish_pass(p)
            generation.warn(p, f"internal error, running without Multi-LoRA: {e!r}")

    def post_sample(self, p: Any, ps: Any, *args: Any) -> None:
        if UNAVAILABLE is None:
            HOST.finish_pass(p)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        if UNAVAILABLE is None:
            generation.end(p, HOST)


script_callbacks.on_before_ui(webui.register_tag_network)
if hasattr(HOST, "on_cfg_denoiser"):  # A1111: Spatial Composite learns each denoiser call's rows there
    script_callbacks.on_cfg_denoiser(HOST.on_cfg_denoiser)
xyz.add_axes()  # now, so the API's script-info lists our axes; again before the UI in case X/Y/Z loads later
script_callbacks.on_before_ui(xyz.add_axes)
script_callbacks.on_ui_settings(on_ui_settings)
