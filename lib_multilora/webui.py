"""Glue every webui this extension runs on shares (A1111 1.10, Forge and reForge keep the same
``modules.extra_networks`` and script API): the ``<multilora:...>`` tag as an extra network."""

from __future__ import annotations

from typing import Any

from . import generation
from .tags import TAG_NAME

#: How many times the webui has activated extra networks (our tag network's ``activate`` runs in each activation).
#: A pass that sees it move knows the host reloaded its LoRAs meanwhile, even when the new list looks like the one
#: the pass left (A1111 loading a refiner checkpoint mid-sampling clears it: ``sd_models.get_empty_cond``).
activations = 0


def tag_network() -> Any:
    """The ``<multilora:...>`` extra network: the webui strips the tag and hands us its items per batch."""
    from modules import extra_networks

    class ExtraNetworkMultiLora(extra_networks.ExtraNetwork):
        def __init__(self) -> None:
            super().__init__(TAG_NAME)

        def activate(self, p: Any, params_list: list[Any]) -> None:
            global activations
            activations += 1
            p.multilora_tags = [list(map(str, params.items)) for params in params_list]
            generation.note_nested_pass(p)

        def deactivate(self, p: Any) -> None:
            pass

    return ExtraNetworkMultiLora()


def register_tag_network() -> None:
    from modules import extra_networks

    extra_networks.register_extra_network(tag_network())
