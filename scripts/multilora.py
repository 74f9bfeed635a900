"""Entry script: an always-on panel that runs LoRA Switch or LoRA Composite (Zhong et al., 2024) per sampling pass.

Thin on purpose: the method lives in ``lib_multilora``; this file only connects the webui's callbacks to it.
"""

from __future__ import annotations

from typing import Any

from modules import script_callbacks, scripts

from lib_multilora import host
from lib_multilora.ui import build_panel


class MultiLoraScript(scripts.Script):
    def title(self) -> str:
        return "Multi-LoRA Composition"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list[Any]:
        return build_panel(self, is_img2img)

    def process(self, p: Any, *args: Any) -> None:
        host.on_process(p, args)

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        try:
            host.start_pass(p)
        except Exception as e:  # never break the generation: undo and say so
            host.finish_pass(p)
            host.warn(p, f"internal error, running without Multi-LoRA: {e!r}")

    def post_sample(self, p: Any, ps: Any, *args: Any) -> None:
        host.finish_pass(p)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        host.finish_pass(p)


script_callbacks.on_before_ui(host.register_tag_network)
