"""Other extensions whose work meets a pass inside the same generation, read from the processing object ``p`` alone
(their script instances and args, the batch's ``<lora>`` tags; no webui import): a pass either runs exactly beside
them or is refused for that generation, with the extension named.

- LoRA Block Weight (hako-mikan): ``<lora:name:w:lbw=...>`` scales the loaded LoRA's factors (A1111) or patch
  strengths (Forge) per block before sampling; a pass composes them as they are. Its ``start=``/``stop=``/``step=``
  items switch LoRAs on and off at a sampling step, by name (A1111) or by position in the UNet patcher's patch sets
  (Forge), behind the pass's back: refused.
- Regional Prompter (hako-mikan): attention mode patches the cross-attention layers and divides each call's rows by
  the batch size it read in ``process``; latent mode (and its prompt mode under Composite) applies or reads the
  LoRAs per region itself.
- Mikubill's ControlNet (A1111; Forge and reForge have their own, computed once per model call): computes each
  unit's control inside every UNet forward, from the UNet's input, the hint and the conds, with no LoRA in it, so
  the passes Composite makes of one call may share it (:mod:`reuse`).
- ADetailer (Bing-su): re-paints each face it finds in an img2img pass of its own, nested in the generation
  (:mod:`nesting`), marked ``p._ad_inner``; only the always-on scripts named in its settings run there, matched by
  file stem.
"""

from __future__ import annotations

from typing import Any

from .args import MIXING

LBW = "LoRA Block Weight"
RP = "Regional Prompter"
#: The tag items LBW reads, by substring, as a LoRA's step controls (its ``loradealer``).
LBW_STEP_ITEMS = ("start=", "stop=", "step=")
#: The extra networks LBW reads its items from.
LORA_NETWORKS = ("lora", "lyco")
CONTROLNET = "ControlNet"
ADETAILER = "ADetailer"
#: What ADetailer's "Script names to apply to ADetailer" must name for Multi-LoRA to run in its pass: the entry
#: script's file stem (scripts/multilora.py).
SCRIPT_STEM = "multilora"


def alwayson_script(p: Any, title: str) -> Any | None:
    """This generation's instance of the always-on script titled ``title``, or None when it is not installed."""
    runner = getattr(p, "scripts", None)
    return next((s for s in getattr(runner, "alwayson_scripts", ()) if s.title() == title), None)


def lbw_active(p: Any) -> bool:
    """Whether LoRA Block Weight runs in this generation: its ``Active`` arg, the second of its ``ui()`` (``None``,
    an API call that left it out of a short args list, counts as on, as its ``process`` reads it)."""
    script = alwayson_script(p, LBW)
    if script is None:
        return False
    args = list(getattr(p, "script_args", ())[script.args_from : script.args_to])
    return len(args) < 2 or args[1] is None or bool(args[1])


def lbw_stepped(p: Any) -> list[str]:
    """The ``<lora>`` tags of the current batch with LBW step controls, by the names the prompt writes."""
    data = getattr(p, "extra_network_data", None) or {}
    return [
        str(params.items[0])
        for kind in LORA_NETWORKS
        for params in data.get(kind, ())
        if any(key in str(item) for item in params.items[1:] for key in LBW_STEP_ITEMS)
    ]


def regional_prompter(p: Any) -> Any | None:
    """Regional Prompter's script instance when it runs in this generation: its ``process`` sets ``active``,
    ``calc`` (``Attention``/``Latent``) and ``mode``, or resets them when it is off or the prompt has no regions."""
    script = alwayson_script(p, RP)
    return script if script is not None and getattr(script, "active", False) else None


def refusal(p: Any, method: str) -> str | None:
    """Why a pass of ``method`` cannot run exactly beside the other extensions of this generation, naming them; None
    when it can."""
    stepped = lbw_stepped(p) if lbw_active(p) else []
    if stepped:
        return (
            f"{LBW}'s start/stop/step on {', '.join(dict.fromkeys(stepped))} switch LoRAs mid-sampling behind the "
            "method's back"
        )
    rp = regional_prompter(p)
    if rp is not None and getattr(rp, "calc", "") != "Attention":
        return f"{RP}'s latent mode applies the LoRAs per region itself"
    if rp is not None and "Pro" in str(getattr(rp, "mode", "")) and method in MIXING:
        return f"{RP}'s prompt mode builds its regions from every UNet call's attention, and {method} makes several"
    return None


def splits_batch(p: Any) -> str | None:
    """What another extension does inside the UNet that a batch replicated per LoRA would break (said, and
    Composite then runs sequentially), or None."""
    if regional_prompter(p) is not None:
        return f"{RP}'s attention mode divides each call's rows by the batch size inside the UNet"
    return None


def controlnet_models(p: Any) -> list[Any]:
    """The control model of each ControlNet unit hooked into this generation's UNet (Mikubill's: the script's
    ``latest_network``, set in its ``process``; two units may share one)."""
    network = getattr(alwayson_script(p, CONTROLNET), "latest_network", None)
    models = [getattr(param, "control_model", None) for param in getattr(network, "control_params", None) or ()]
    return [m for m in models if m is not None]


def nested_pass(p: Any) -> str:
    """What to call a pass nested in a generation (:mod:`nesting`), for the user."""
    return f"{ADETAILER}'s detail pass" if getattr(p, "_ad_inner", False) else "a pass another extension ran inside it"


def ran_without_us(p: Any) -> str:
    """What the generation's infotext says of a nested pass Multi-LoRA did not run in, and how to include it."""
    if not getattr(p, "_ad_inner", False):
        return f"{nested_pass(p)} ran with every LoRA merged (Multi-LoRA did not run in it)"
    return (
        f"{nested_pass(p)} ran with every LoRA merged: Multi-LoRA runs there only when Settings > {ADETAILER} > "
        f"'Script names to apply to {ADETAILER}' names {SCRIPT_STEM} (or 'Apply only selected scripts' is off; a tab "
        "with an ADetailer ControlNet model on Forge runs ControlNet alone)"
    )
