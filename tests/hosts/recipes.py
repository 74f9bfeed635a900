"""What it takes to run each host here (../shared/hosts/README.md): its tarball, the pins that replace or join its
own ``requirements_versions.txt``, and the variables its test tier reads. Data only: ``setup.py`` applies it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """One host: ``tarball`` is a glob in the hosts folder; ``replace`` maps a requirement's name (lower case) to
    the line that stands in for it (an empty line drops it); ``extra`` are requirements added to the host's own;
    ``tier`` are the test tier's own packages, installed with the host's versions as constraints; ``neighbours``
    are globs of the extensions users run beside ours, unpacked for the tier's neighbour tests (the webui runs no
    ``install.py`` under ``--skip-install``: their ``requirements.txt`` are installed, with ``neighbour_pins`` as
    constraints, and ``neighbour_needs``, what an ``install.py`` without a ``requirements.txt`` would install)."""

    name: str
    tarball: str
    dir_var: str
    python_var: str
    replace: tuple[tuple[str, str], ...] = ()
    extra: tuple[str, ...] = ()
    tier: tuple[str, ...] = ("pytest>=8", "requests", "playwright")  # playwright: the browser tier
    neighbours: tuple[str, ...] = ()
    neighbour_pins: tuple[str, ...] = ()
    neighbour_needs: tuple[str, ...] = ()


#: Every recipe: CPU torch from this machine's wheel, setuptools new enough to build today's sdists but below 81
#: (lightning_fabric still imports pkg_resources).
COMMON_REPLACE = (("torch", ""), ("setuptools", "setuptools>=77.0.3,<81"))
#: ADetailer on every host: its install.py asks for mediapipe 0.10.13-0.10.15 (protobuf 4), the webuis pin protobuf
#: 3.20.0; 0.10.11 installs beside it and detects the same (../shared/hosts/README.md). Its script imports rich.
#: ultralytics is imported only when a YOLO model runs: the tiers use mediapipe's detectors, which ship in its wheel.
ADETAILER = "adetailer-*.tar.gz"
ADETAILER_NEEDS = ("mediapipe==0.10.11", "rich>=13")

RECIPES: dict[str, Recipe] = {
    "a1111": Recipe(
        name="a1111",
        tarball="a1111-*.tar.gz",
        dir_var="SD_WEBUI_DIR",
        python_var="SD_WEBUI_PYTHON",
        replace=COMMON_REPLACE,
        extra=("clip-anytorch",),  # k-diffusion imports clip
        tier=("pytest>=8", "requests", "playwright", "lycoris-lora==4.1.3"),
        neighbours=(
            "sd-webui-controlnet-*.tar.gz",
            "sd-webui-lora-block-weight-*.tar.gz",
            "sd-webui-regional-prompter-*.tar.gz",
            ADETAILER,
        ),
        neighbour_pins=("mediapipe<0.10.30",),  # newer ones lack mp.solutions, which controlnet_aux imports
        neighbour_needs=ADETAILER_NEEDS,
    ),
    "forge": Recipe(
        name="forge",
        tarball="forge-*.tar.gz",
        dir_var="SD_FORGE_DIR",
        python_var="SD_FORGE_PYTHON",
        replace=COMMON_REPLACE,
        # joblib: else Forge turns its soft-inpainting script off. sentencepiece: the one of Forge's day (2025-06);
        # from 0.2.1 (2025-08) its protobuf module needs protobuf >= 5 (Forge pins 3.20.0), and SD3's T5 tokenizer,
        # which transformers converts from the slow one, fails to load ("cannot import name 'runtime_version'")
        extra=("joblib", "sentencepiece==0.2.0"),
        neighbours=("sd-webui-lora-block-weight-*.tar.gz", ADETAILER),  # its ControlNet is built in
        neighbour_needs=ADETAILER_NEEDS,
    ),
    "reforge": Recipe(
        name="reforge",
        tarball="reforge-*.tar.gz",
        dir_var="SD_REFORGE_DIR",
        python_var="SD_REFORGE_PYTHON",
        # its pydantic is a wheel on GitHub (a URL line): the same version from PyPI
        replace=(*COMMON_REPLACE, ("pydantic", "pydantic==1.10.15")),
        extra=("clip-anytorch", "joblib"),
        neighbours=("sd-webui-lora-block-weight-*.tar.gz", ADETAILER),  # its ControlNet is built in
        neighbour_needs=ADETAILER_NEEDS,
    ),
}
