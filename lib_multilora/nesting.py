"""Passes another extension runs inside a generation, with a processing object of its own, while the generation's
is still open: ADetailer re-paints each face it finds in an img2img pass of its own after the main pass. Such a pass
runs only the scripts that extension lets in, so either Multi-LoRA runs in it, with the generation's settings (its
X/Y/Z cell's too) and its warnings going to the generation's infotext, or that infotext says the pass ran without it.

What ties the nested pass to its generation is the generation's infotext params: ADetailer makes its pass with a
copy of them (``extra_generation_params``). So the generation holds one entry there whose key, :class:`Link`,
refers (weakly) back to it; its value is None, which the webui's infotext leaves out (as it does its own
placeholders), and the generation drops it when it ends.
"""

from __future__ import annotations

import weakref
from typing import Any

#: The link's text (every key this extension writes starts with "Multi-LoRA": a generation drops the ones it
#: inherits before it writes its own).
LINK_TEXT = "Multi-LoRA generation"


class Link(str):
    """The key of the generation's own entry in its ``extra_generation_params``, with a weak reference to it."""

    generation: weakref.ReferenceType[Any]

    def __new__(cls, p: Any) -> Link:
        key = super().__new__(cls, LINK_TEXT)
        key.generation = weakref.ref(p)
        return key


def link(p: Any) -> None:
    """Make ``p`` the generation that passes made with a copy of its infotext params are nested in."""
    p.extra_generation_params[Link(p)] = None


def unlink(p: Any) -> None:
    """Drop ``p``'s link (its generation is over: no API answer or later copy should carry it)."""
    params = p.extra_generation_params
    for key in [k for k in params if isinstance(k, Link) and k.generation() is p]:
        del params[key]


def enclosing(p: Any) -> Any | None:
    """The open generation ``p``'s pass is nested in, from the link its infotext params were copied with; None for
    a generation of its own."""
    for key in getattr(p, "extra_generation_params", None) or ():
        if isinstance(key, Link):
            generation = key.generation()
            if generation is not None and generation is not p:
                return generation
    return None
