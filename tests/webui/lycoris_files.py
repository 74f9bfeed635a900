"""LyCORIS files for the tiny SD1 model's UNet, written by the LyCORIS project's own library (``lycoris-lora``).

Each file is a ``LycorisNetwork`` over the webui's own ldm ``UNetModel`` loaded with the checkpoint's weights, so
weight-dependent parts (DoRA's magnitude) start from the real layer. The network is prefixed ``lora_unet``: its
module names are the ldm paths, ``lora_unet_input_blocks_1_1_proj_in``, which the built-in Lora extension maps to its
``diffusion_model_`` layers (its fallback for names that are not diffusers-style); every name is checked against that
lookup here, and again inside the webui by the tests.

A fresh LyCORIS network is a no-op (one factor starts at zero), so every parameter is drawn again from a generator
seeded per module and the module is scaled until its delta, as LyCORIS itself computes it (merged weight minus the
layer's), is ``REL`` of the layer's weight: the same strength for every algorithm, none of them zero. Alpha is the
rank: lycoris-lora 4.1.3's ``get_merged_weight`` applies LoHa's and LoKr's alpha/rank twice (their forward, like the
built-in, once), and at alpha = rank that scale is 1, so the delta measured here is the one the webui applies.
"""

from __future__ import annotations

import contextlib
import json
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .tiny_lora import RANK, LoraInfo, _layer_shapes, load_webui_name_converter
from .tiny_model import _ldm_on_path, resolve_webui_dir

#: ldm classes whose layers the networks cover: attention blocks, res blocks, down/upsamplers (as LyCORIS's "full"
#: preset covers their diffusers counterparts), and the norms for the norm-only file.
UNET_TARGETS = ("SpatialTransformer", "ResBlock", "Downsample", "Upsample")
NORM_TARGETS = ("GroupNorm32", "GroupNorm", "LayerNorm")
PREFIX = "lora_unet"
#: Each module's delta relative to its layer's weight (Frobenius norms), as LyCORIS computes it.
REL = 0.25
#: The draws' scale, in units of 1/sqrt(fan-in): small enough that every delta is a power of the scale.
INIT = 0.1
#: DoRA's magnitude: LyCORIS's own (the layer's norms) times 1 + this times a standard normal.
DORA_SPREAD = 0.03


@dataclass(frozen=True)
class LycoSpec:
    """One file: a LyCORIS algorithm (``network_module``) with its options, on the layers of ``targets``."""

    name: str
    algo: str
    options: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = UNET_TARGETS


#: Every algorithm of lycoris-lora 4.1.3 that writes a fixed delta, with its default options but the one named. Not
#: DyLoRA (written as a plain LoRA's keys) nor T-LoRA (its delta follows a timestep mask the webui never sets).
SPECS: tuple[LycoSpec, ...] = (
    LycoSpec("lycoLokr", "lokr"),
    LycoSpec("lycoLoha", "loha"),
    LycoSpec("lycoTucker", "locon", {"use_tucker": True}),
    LycoSpec("lycoDora", "locon", {"weight_decompose": True}),
    LycoSpec("lycoFull", "full"),
    LycoSpec("lycoIa3", "ia3"),
    LycoSpec("lycoGlora", "glora"),
    LycoSpec("lycoOft", "diag-oft"),
    LycoSpec("lycoBoft", "boft"),
    LycoSpec("lycoNorm", "locon", {"train_norm": True}, NORM_TARGETS),
)


def load_unet(ckpt: Path, webui_dir: Path) -> nn.Module:
    """The webui's ldm ``UNetModel`` as the checkpoint's yaml configures it, with the checkpoint's weights."""
    import yaml
    from safetensors import safe_open

    with open(ckpt.with_suffix(".yaml"), encoding="utf-8") as fh:
        params = yaml.safe_load(fh)["model"]["params"]["unet_config"]["params"]
    with _ldm_on_path(webui_dir):
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        unet = UNetModel(**params)
    prefix = "model.diffusion_model."
    with safe_open(str(ckpt), framework="pt") as fh:
        state = {k[len(prefix) :]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}  # noqa: SIM118
    unet.load_state_dict(state, strict=True)
    return unet.eval().requires_grad_(False)


def resolve_unet_module(module: str, convert: Callable[[str, bool], str], layers: set[str]) -> str | None:
    """The layer ``networks.load_network`` gives an SD1 UNet module name: the diffusers-name conversion first, then
    the ``lora_unet`` -> ``diffusion_model`` swap it applies to names that are already ldm paths."""
    key = convert(module, False)
    if key in layers:
        return key
    key = module.replace(PREFIX, "diffusion_model", 1)
    return key if key in layers else None


def _apply_preset(targets: tuple[str, ...]) -> None:
    """Every preset key: ``apply_preset`` sets class attributes, so a key left out keeps the previous file's value."""
    from lycoris import LycorisNetwork

    LycorisNetwork.apply_preset(
        {
            "enable_conv": True,
            "target_module": list(targets),
            "target_name": [],
            "module_algo_map": {},
            "name_algo_map": {},
            "lora_prefix": PREFIX,
            "use_fnmatch": False,
            "exclude_name": [],
        }
    )


def _merged(lora: nn.Module) -> torch.Tensor:
    """The layer's weight with this module merged, as LyCORIS computes it (DoRA's decomposition included)."""
    shape = tuple(lora.org_module[0].weight.shape)
    return lora.get_merged_weight(multiplier=1, shape=shape)[0].reshape(shape)


def _relative_delta(lora: nn.Module) -> float:
    org = lora.org_module[0].weight
    return float((_merged(lora) - org).norm() / org.norm())


@torch.no_grad()
def seed_module(lora: nn.Module, seed: int) -> None:
    """Draw every parameter again, then scale all of them together until the delta is ``REL`` of the layer's weight;
    DoRA's magnitude, left out of that, last. The draws are small fan-in scaled normals, where every algorithm's delta
    grows as a power of the common scale (1 for full, IA3, norms and OFT's small rotations, 2 for LoCon, 4 for LoHa):
    the power is measured there, then three corrections at it."""
    g = torch.Generator().manual_seed(zlib.crc32(lora.lora_name.encode()) * 7919 + seed)
    draws = {
        name: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for name, p in lora.named_parameters()
    }
    scaled = [p for name, p in lora.named_parameters() if name != "dora_scale"]
    for name, p in lora.named_parameters():
        if name != "dora_scale":
            p.copy_(INIT * draws[name] / math.sqrt(math.prod(p.shape[1:])))

    def scale(c: float) -> float:
        for p in scaled:
            p.mul_(c)
        return _relative_delta(lora)

    current = _relative_delta(lora)
    doubled = scale(2.0)
    power, current = math.log2(doubled / current), doubled
    for _ in range(3):
        current = scale((REL / current) ** (1 / power))
    for name, p in lora.named_parameters():
        if name == "dora_scale":
            p.mul_(1 + DORA_SPREAD * draws[name])
            current = _relative_delta(lora)
    if not math.isclose(current, REL, rel_tol=0.03):
        raise RuntimeError(f"{lora.lora_name}: delta {current:.4f} of the weight, not {REL}")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Thousands of tiny ops: on a shared 2-core machine a second thread's sync costs 8x the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_lycoris(
    lora_dir: Path, ckpt: Path, seed: int = 0, webui_dir: str | Path | None = None
) -> dict[str, LoraInfo]:
    """Write every ``SPECS`` file into lora_dir for the SD1 checkpoint at ckpt (rank and alpha ``RANK``).

    Raises if a module name would not land on the layer it was made for under the built-in's lookup.
    """
    webui = resolve_webui_dir(webui_dir)
    convert = load_webui_name_converter(webui)
    layers = set(_layer_shapes(Path(ckpt)))
    lora_dir = Path(lora_dir)
    lora_dir.mkdir(parents=True, exist_ok=True)
    with _one_thread():
        unet = load_unet(Path(ckpt), webui)
        return {
            spec.name: _write(
                spec, unet, seed * 100 + index, lora_dir, lambda name: resolve_unet_module(name, convert, layers)
            )
            for index, spec in enumerate(SPECS)
        }


def _write(
    spec: LycoSpec, unet: nn.Module, seed: int, lora_dir: Path, resolve: Callable[[str], str | None]
) -> LoraInfo:
    from lycoris import LycorisNetwork
    from safetensors.torch import save_file

    _apply_preset(spec.targets)
    network = LycorisNetwork(
        unet, lora_dim=RANK, conv_lora_dim=RANK, alpha=RANK, conv_alpha=RANK, network_module=spec.algo, **spec.options
    )
    for lora in network.loras:
        seed_module(lora, seed)
    network.apply_to()  # registers the modules: the state dict is empty before
    try:
        state = {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}
    finally:
        network.restore()
    unet_layers = []
    for lora in network.loras:
        layer = resolve(lora.lora_name)
        if layer != "diffusion_model" + lora.lora_name[len(PREFIX) :]:
            raise RuntimeError(f"{spec.name}: {lora.lora_name} lands on {layer}, not on its own layer")
        unet_layers.append(layer)
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(RANK),
        "ss_network_alpha": str(RANK),
        "ss_network_args": json.dumps({"algo": spec.algo, **spec.options}),
        "ss_base_model_version": "sd_v1",
        "ss_output_name": spec.name,
    }
    path = lora_dir / f"{spec.name}.safetensors"
    save_file(state, str(path), metadata=metadata)
    return LoraInfo(
        name=spec.name,
        path=path,
        kind=spec.algo,
        rank=RANK,
        n_unet_modules=len(unet_layers),
        n_te_modules=0,
        unet_layers=tuple(unet_layers),
        te_layers=(),
    )
