"""The one typed model of the extension's settings.

UI defaults, the order of the script's positional args (API ``alwayson_scripts``), infotext labels and paste-back all
read :data:`FIELDS`, so adding a setting means adding one line there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

METHODS = ("Switch", "Composite", "Spatial")
#: The methods that run every composed LoRA each step and mix their predictions (execution and weights apply).
MIXING = ("Composite", "Spatial")
TEXT_ENCODER_POLICIES = ("All", "First", "None")
HIRES_MODES = ("Restart", "Continue", "Off")
#: Composite: one UNet call per LoRA, one call on the batch replicated per LoRA, or batched on CUDA devices only.
EXECUTIONS = ("Sequential", "Batched", "Auto")
TAU_MIN, TAU_MAX = 1, 50
#: What X/Y/Z cells and infotext call the extension being off: the webui's own merging of every LoRA.
MERGE = "Merge"


class ArgsError(ValueError):
    """Raised for script args that cannot be read (wrong type, count or key); the message is shown to the user."""


def _label(text: str, choices: tuple[str, ...] = ()) -> dict[str, object]:
    return {"label": text, "choices": choices}


@dataclass(frozen=True)
class MultiLoraArgs:
    """What the user asked for, before it is checked against the LoRAs actually loaded."""

    enabled: bool = field(default=False, metadata=_label(""))
    method: str = field(default="Switch", metadata=_label("Multi-LoRA method", METHODS))
    tau: int = field(default=5, metadata=_label("Multi-LoRA switch every"))
    loras: str = field(default="", metadata=_label("Multi-LoRA LoRAs"))
    execution: str = field(default="Sequential", metadata=_label("Multi-LoRA composite execution", EXECUTIONS))
    # Text encoder: All = every <lora> (webui default, the paper's Composite); First = only the first composed LoRA
    # (the paper's Switch); None = no composed LoRA. LoRAs not composed always keep their text-encoder part.
    text_encoder: str = field(default="All", metadata=_label("Multi-LoRA text encoder", TEXT_ENCODER_POLICIES))
    # Hires pass: Restart the schedule at its first step, Continue counting from the first pass, or Off (merged).
    hires: str = field(default="Restart", metadata=_label("Multi-LoRA hires", HIRES_MODES))
    # Composite: a mixing weight per composed LoRA, in composed order ("2,1,1"), normalised to sum 1; empty = equal.
    weights: str = field(default="", metadata=_label("Multi-LoRA composite weights"))
    # The step window the method runs in, as prompt editing writes steps: up to 1 a fraction of the pass's steps (so
    # 1 is its end), above 1 a step number. Outside it every LoRA acts merged, as in a plain generation.
    start: float = field(default=0.0, metadata=_label("Multi-LoRA start"))
    end: float = field(default=1.0, metadata=_label("Multi-LoRA end"))
    # Spatial Composite: the latent patch size P and the softmin temperature T (spatial.py says why these defaults).
    patch: int = field(default=8, metadata=_label("Multi-LoRA spatial patch"))
    temperature: float = field(default=0.05, metadata=_label("Multi-LoRA spatial temperature"))

    @property
    def window(self) -> tuple[float, float] | None:
        """The step window (start, end), or None for the whole pass (the default)."""
        default = (MultiLoraArgs.start, MultiLoraArgs.end)
        return None if (self.start, self.end) == default else (self.start, self.end)

    @property
    def lora_names(self) -> list[str]:
        """The explicitly requested LoRA names (empty means every ``<lora>`` of the prompt)."""
        return split_names(self.loras)

    def problems(self) -> list[str]:
        """Why these settings cannot run as asked; empty when they can."""
        out = []
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata["choices"]
            if choices and value not in choices:
                out.append(f"unknown {f.name.replace('_', ' ')} {value!r} (expected one of {', '.join(choices)})")
        if self.method == "Switch" and (isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 1):
            out.append(f"switch interval must be a positive whole number of steps, got {self.tau!r}")
        if self.method == "Spatial" and (
            isinstance(self.patch, bool) or not isinstance(self.patch, int) or self.patch < 1
        ):
            out.append(f"spatial patch must be a positive whole number of latent pixels, got {self.patch!r}")
        if self.method == "Spatial" and not (isinstance(self.temperature, float) and 0 < self.temperature < math.inf):
            out.append(f"spatial temperature must be a number > 0, got {self.temperature!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
                out.append(f"step window {name} must be a number >= 0, got {value!r}")
        return out

    def infotext(self, composed: list[str]) -> dict[str, str | int]:
        """Infotext entries for a run that composed ``composed`` (in order)."""
        out: dict[str, str | int] = {label_of("method"): self.method}
        if self.method == "Switch":
            out[label_of("tau")] = self.tau
        out[label_of("loras")] = ", ".join(composed)
        if self.method in MIXING and self.execution != MultiLoraArgs.execution:
            out[label_of("execution")] = self.execution
        if self.method in MIXING and self.weights.strip():
            out[label_of("weights")] = self.weights.strip()
        if self.method == "Spatial":
            out[label_of("patch")], out[label_of("temperature")] = self.patch, self.temperature
        for name in ("text_encoder", "hires", "start", "end"):
            if getattr(self, name) != getattr(MultiLoraArgs, name):
                out[label_of(name)] = getattr(self, name)
        return out

    @classmethod
    def from_infotext(cls, params: dict[str, Any]) -> MultiLoraArgs:
        """Read back what :meth:`infotext` wrote; absent method means the extension was off."""
        method = params.get(label_of("method"))
        if method is None or str(method) == MERGE:
            return cls()
        present = {f.name: params[f.metadata["label"]] for f in fields(cls) if f.metadata["label"] in params}
        return cls.from_dict({**present, "enabled": True, "method": str(method)})

    @classmethod
    def from_script_args(cls, args: tuple[Any, ...] | list[Any]) -> MultiLoraArgs:
        """Read the script's args: positional in :data:`FIELDS` order, or one dict of named args (API)."""
        if args and isinstance(args[0], dict):
            return cls.from_dict(args[0])
        names = field_names()
        if len(args) > len(names):
            raise ArgsError(f"expected at most {len(names)} args ({', '.join(names)}), got {len(args)}")
        return cls.from_dict(dict(zip(names, args, strict=False)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MultiLoraArgs:
        unknown = set(values) - set(field_names())
        if unknown:
            raise ArgsError(f"unknown arg(s) {', '.join(sorted(unknown))}; known: {', '.join(field_names())}")
        out = cls()
        for name, value in values.items():
            out = replace(out, **{name: _coerce(name, value)})
        return out


def field_names() -> list[str]:
    """Field names in positional-arg order (the order of the panel's components)."""
    return [f.name for f in fields(MultiLoraArgs)]


def label_of(name: str) -> str:
    return next(f.metadata["label"] for f in fields(MultiLoraArgs) if f.name == name)


def to_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ArgsError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return to_int(float(value.strip()), name)
        except ValueError:
            pass
    raise ArgsError(f"{name} must be a whole number, got {value!r}")


def to_float(value: Any, name: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ArgsError(f"{name} must be a number, got {value!r}")


def _coerce(name: str, value: Any) -> Any:
    if name == "enabled":
        if not isinstance(value, (bool, int)):
            raise ArgsError(f"enabled must be true or false, got {value!r}")
        return bool(value)
    if name in ("tau", "patch"):
        return to_int(value, name)
    if name in ("start", "end", "temperature"):
        return to_float(value, name)
    if name == "loras" and isinstance(value, (list, tuple)):
        return join_names(value)
    if not isinstance(value, str):
        raise ArgsError(f"{name} must be a string, got {value!r}")
    choices = next(f.metadata["choices"] for f in fields(MultiLoraArgs) if f.name == name)
    return canonical(value, choices) if choices else value


def split_names(text: str) -> list[str]:
    """``"A, B"`` -> ``["A", "B"]``: the ``loras`` field's comma list, as the panel's picks."""
    return [n.strip() for n in text.split(",") if n.strip()]


def join_names(names: list[Any] | tuple[Any, ...]) -> str:
    """The panel's picks (a list) as the ``loras`` field's comma list, which the infotext, the API and X/Y/Z keep."""
    if not all(isinstance(n, str) for n in names):
        raise ArgsError(f"loras must be a string or a list of strings, got {names!r}")
    return ", ".join(n.strip() for n in names if n.strip())


def canonical(value: str, choices: tuple[str, ...]) -> str:
    """``"composite"`` -> ``"Composite"``; unknown names pass through so :meth:`MultiLoraArgs.problems` reports them."""
    return next((c for c in choices if c.lower() == value.strip().lower()), value)


def canonical_method(value: str) -> str:
    return canonical(value, METHODS)
