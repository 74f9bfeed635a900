"""The one typed model of the extension's settings.

UI defaults, the order of the script's positional args (API ``alwayson_scripts``), infotext labels and paste-back all
read :data:`FIELDS`, so adding a setting means adding one line there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

METHODS = ("Switch", "Composite")
TAU_MIN, TAU_MAX = 1, 50


class ArgsError(ValueError):
    """Raised for script args that cannot be read (wrong type, count or key); the message is shown to the user."""


def _label(text: str) -> dict[str, str]:
    return {"label": text}


@dataclass(frozen=True)
class MultiLoraArgs:
    """What the user asked for, before it is checked against the LoRAs actually loaded."""

    enabled: bool = field(default=False, metadata=_label(""))
    method: str = field(default="Switch", metadata=_label("Multi-LoRA method"))
    tau: int = field(default=5, metadata=_label("Multi-LoRA switch every"))
    loras: str = field(default="", metadata=_label("Multi-LoRA LoRAs"))

    @property
    def lora_names(self) -> list[str]:
        """The explicitly requested LoRA names (empty means every ``<lora>`` of the prompt)."""
        return [n.strip() for n in self.loras.split(",") if n.strip()]

    def problems(self) -> list[str]:
        """Why these settings cannot run as asked; empty when they can."""
        out = []
        if self.method not in METHODS:
            out.append(f"unknown method {self.method!r} (expected one of {', '.join(METHODS)})")
        if self.method == "Switch" and (isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 1):
            out.append(f"switch interval must be a positive whole number of steps, got {self.tau!r}")
        return out

    def infotext(self, composed: list[str]) -> dict[str, str | int]:
        """Infotext entries for a run that composed ``composed`` (in order)."""
        out: dict[str, str | int] = {label_of("method"): self.method}
        if self.method == "Switch":
            out[label_of("tau")] = self.tau
        out[label_of("loras")] = ", ".join(composed)
        return out

    @classmethod
    def from_infotext(cls, params: dict[str, Any]) -> MultiLoraArgs:
        """Read back what :meth:`infotext` wrote; absent method means the extension was off."""
        method = params.get(label_of("method"))
        if method is None:
            return cls()
        return cls(
            enabled=True,
            method=str(method),
            tau=to_int(params.get(label_of("tau"), cls.tau), "tau"),
            loras=str(params.get(label_of("loras"), "")),
        )

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


def _coerce(name: str, value: Any) -> Any:
    if name == "enabled":
        if not isinstance(value, (bool, int)):
            raise ArgsError(f"enabled must be true or false, got {value!r}")
        return bool(value)
    if name == "tau":
        return to_int(value, "tau")
    if not isinstance(value, str):
        raise ArgsError(f"{name} must be a string, got {value!r}")
    if name == "method":
        return canonical_method(value)
    return value


def canonical_method(value: str) -> str:
    """``"composite"`` -> ``"Composite"``; unknown names pass through so :meth:`MultiLoraArgs.problems` reports them."""
    return next((m for m in METHODS if m.lower() == value.strip().lower()), value)
