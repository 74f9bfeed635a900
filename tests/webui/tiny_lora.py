"""Kohya-format LoRA / LoCon / LoHa files for the tiny SD1 test model.

Module names are emitted in the diffusers style real kohya files use (``lora_unet_down_blocks_0_attentions_0_...``,
``lora_te_text_model_encoder_layers_0_...``).  Each name is converted with the webui's own
``extensions-builtin/Lora/networks.py:convert_diffusers_name_to_compvis`` (extracted from the webui checkout and
executed, not copied) and must land on a layer of the checkpoint, so a file that builds is a file whose modules the
built-in Lora extension matches in full; the live probe extension re-checks that inside the webui.
"""

from __future__ import annotations

import ast
import json
import math
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .tiny_model import resolve_webui_dir

RANK = 4

ATTN_LINEARS = tuple(f"{attn}_{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out_0"))
FF_LINEARS = ("ff_net_0_proj", "ff_net_2")
TE_ATTN = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")
TE_MLP = ("mlp_fc1", "mlp_fc2")


@dataclass(frozen=True)
class LoraInfo:
    """What a generated file contains, so tests can compare it with what the webui reports after loading it."""

    name: str
    path: Path
    kind: str  # "lora" | "locon" | "loha"
    rank: int
    n_unet_modules: int
    n_te_modules: int
    unet_layers: tuple[str, ...] = field(repr=False)  # webui network layer names (sd keys), e.g. diffusion_model_...
    te_layers: tuple[str, ...] = field(repr=False)  # e.g. transformer_text_model_encoder_layers_0_mlp_fc1

    @property
    def n_modules(self) -> int:
        """Total number of network modules the webui should create for this file."""
        return self.n_unet_modules + self.n_te_modules

    @property
    def alias(self) -> str:
        """The name used in ``<lora:NAME:weight>`` prompt tags."""
        return self.name


def load_webui_name_converter(webui_dir: Path) -> Callable[[str, bool], str]:
    """Return the webui's ``convert_diffusers_name_to_compvis`` without importing networks.py (it needs gradio etc.).

    The function and the module-level tables it reads are taken from the webui's source by AST and executed.
    """
    source_path = webui_dir / "extensions-builtin" / "Lora" / "networks.py"
    tree = ast.parse(source_path.read_text(encoding="utf-8"), filename=str(source_path))
    wanted_globals = {"re_digits", "re_x_proj", "re_compiled", "suffix_conversion"}
    body: list[ast.stmt] = []
    for node in tree.body:
        is_table = isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in wanted_globals for t in node.targets
        )
        is_function = isinstance(node, ast.FunctionDef) and node.name == "convert_diffusers_name_to_compvis"
        if is_table or is_function:
            body.append(node)
    module = ast.Module(body=body, type_ignores=[])
    namespace: dict[str, Any] = {"re": re}
    exec(compile(module, str(source_path), "exec"), namespace)  # the webui's own code, run as is
    return namespace["convert_diffusers_name_to_compvis"]


def _layer_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Weight shapes by webui network layer name (as networks.assign_network_names_to_compvis_modules names layers)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    with safe_open(str(ckpt), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
            if not key.endswith(".weight"):
                continue
            stem = key[: -len(".weight")]
            if stem.startswith("model.diffusion_model."):
                layer = stem[len("model.") :]
            elif stem.startswith("cond_stage_model.transformer."):
                layer = stem[len("cond_stage_model.") :]
            else:
                continue
            shapes[layer.replace(".", "_")] = tuple(fh.get_slice(key).get_shape())
    return shapes


def _unet_structure(ckpt: Path) -> dict[str, Any]:
    import yaml

    with open(ckpt.with_suffix(".yaml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)["model"]["params"]["unet_config"]["params"]


def diffusers_unet_modules(unet: dict[str, Any], groups: set[str]) -> Iterator[str]:
    """Diffusers module names of an SD1-structured UNet (kohya's naming), for the given target groups.

    groups: "attn" (attention linears), "ff", "proj" (proj_in/proj_out), "resnet" (conv1/conv2/time_emb_proj and
    conv_shortcut where present), "sampler" (down/upsampler convs).
    """
    levels = len(unet["channel_mult"])
    nrb = unet["num_res_blocks"]
    attn_levels = {i for i in range(levels) if 2**i in unet["attention_resolutions"]}
    depth = unet.get("transformer_depth", 1)

    def attention(prefix: str) -> Iterator[str]:
        if "proj" in groups:
            yield f"{prefix}_proj_in"
        for block in range(depth):
            tb = f"{prefix}_transformer_blocks_{block}"
            if "attn" in groups:
                yield from (f"{tb}_{name}" for name in ATTN_LINEARS)
            if "ff" in groups:
                yield from (f"{tb}_{name}" for name in FF_LINEARS)
        if "proj" in groups:
            yield f"{prefix}_proj_out"

    def resnet(prefix: str) -> Iterator[str]:
        if "resnet" in groups:
            yield from (f"{prefix}_{name}" for name in ("conv1", "conv2", "time_emb_proj", "conv_shortcut"))

    for i in range(levels):
        for j in range(nrb):
            yield from resnet(f"lora_unet_down_blocks_{i}_resnets_{j}")
            if i in attn_levels:
                yield from attention(f"lora_unet_down_blocks_{i}_attentions_{j}")
        if i < levels - 1 and "sampler" in groups:
            yield f"lora_unet_down_blocks_{i}_downsamplers_0_conv"
    yield from resnet("lora_unet_mid_block_resnets_0")
    yield from attention("lora_unet_mid_block_attentions_0")
    yield from resnet("lora_unet_mid_block_resnets_1")
    for i in range(levels):
        for j in range(nrb + 1):
            yield from resnet(f"lora_unet_up_blocks_{i}_resnets_{j}")
            if levels - 1 - i in attn_levels:
                yield from attention(f"lora_unet_up_blocks_{i}_attentions_{j}")
        if i < levels - 1 and "sampler" in groups:
            yield f"lora_unet_up_blocks_{i}_upsamplers_0_conv"


def diffusers_te_modules(n_layers: int, groups: set[str]) -> Iterator[str]:
    """Kohya text-encoder module names for the given groups ("attn", "mlp")."""
    for layer in range(n_layers):
        if "attn" in groups:
            yield from (f"lora_te_text_model_encoder_layers_{layer}_{name}" for name in TE_ATTN)
        if "mlp" in groups:
            yield from (f"lora_te_text_model_encoder_layers_{layer}_{name}" for name in TE_MLP)


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: str
    seed_offset: int
    unet_groups: frozenset[str]
    te_groups: frozenset[str]
    strength: float = 1.0


#: The test LoRAs: plain ones differ in seed, so their effects differ; LoCon adds resnet/sampler convs, LoHa is
#: Hadamard-product weights on attention linears only.
SPECS: tuple[_Spec, ...] = (
    _Spec("mlA", "lora", 1, frozenset({"attn", "ff", "proj"}), frozenset({"attn", "mlp"})),
    _Spec("mlB", "lora", 2, frozenset({"attn", "ff", "proj"}), frozenset({"attn", "mlp"})),
    _Spec("mlC", "lora", 3, frozenset({"attn", "ff", "proj"}), frozenset({"attn", "mlp"})),
    _Spec("mlLocon", "locon", 4, frozenset({"attn", "ff", "proj", "resnet", "sampler"}), frozenset({"attn", "mlp"})),
    _Spec("mlLoha", "loha", 5, frozenset({"attn"}), frozenset({"attn"})),
)


def _randn(shape: tuple[int, ...], key: str, seed: int, std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()) * 7919 + seed)
    return torch.randn(shape, generator=g) * std


def _module_weights(
    module: str, shape: tuple[int, ...], kind: str, rank: int, seed: int, strength: float
) -> dict[str, torch.Tensor]:
    """Weights whose product has roughly the layer's own weight scale (1/sqrt(fan_in)): a strong, visible effect."""
    out_dim, in_dim = shape[0], shape[1]
    kernel = tuple(shape[2:])
    fan_in = in_dim * math.prod(kernel)
    w: dict[str, torch.Tensor] = {}
    if kind == "loha":
        if kernel:
            raise ValueError(f"LoHa here is for linear layers only, got {module} {shape}")
        std_b = strength**0.5 * fan_in**-0.25
        w["hada_w1_a"] = _randn((out_dim, rank), module + "w1a", seed, rank**-0.5)
        w["hada_w1_b"] = _randn((rank, in_dim), module + "w1b", seed, std_b)
        w["hada_w2_a"] = _randn((out_dim, rank), module + "w2a", seed, rank**-0.5)
        w["hada_w2_b"] = _randn((rank, in_dim), module + "w2b", seed, std_b)
    else:
        # conv layers: lora_down carries the conv's kernel, lora_up is 1x1 (kohya LoCon layout; 1x1 for proj_in/out)
        w["lora_down.weight"] = _randn((rank, in_dim, *kernel), module + "down", seed, fan_in**-0.5)
        w["lora_up.weight"] = _randn((out_dim, rank, *([1] * len(kernel))), module + "up", seed, strength * rank**-0.5)
    w["alpha"] = torch.tensor(float(rank))
    return {f"{module}.{k}": v.to(torch.float16) if k != "alpha" else v for k, v in w.items()}


def build_loras(
    lora_dir: Path, ckpt: Path, seed: int = 0, webui_dir: str | Path | None = None, rank: int = RANK
) -> dict[str, LoraInfo]:
    """Write mlA, mlB, mlC, mlLocon and mlLoha ``.safetensors`` of rank ``rank`` into lora_dir for the checkpoint at
    ckpt (the tests use RANK; the benchmark builds SD1.5-size rank-16 ones).

    Raises if any module name would not map onto a layer of the checkpoint under the webui's own name conversion.
    """

    webui = resolve_webui_dir(webui_dir)
    convert = load_webui_name_converter(webui)
    shapes = _layer_shapes(Path(ckpt))
    unet = _unet_structure(Path(ckpt))
    n_te_layers = 1 + max(
        int(m.group(1)) for k in shapes if (m := re.match(r"transformer_text_model_encoder_layers_(\d+)_", k))
    )
    lora_dir = Path(lora_dir)
    lora_dir.mkdir(parents=True, exist_ok=True)

    infos: dict[str, LoraInfo] = {}
    for spec in SPECS:
        tensors: dict[str, torch.Tensor] = {}
        unet_layers: list[str] = []
        te_layers: list[str] = []
        candidates = [
            *diffusers_unet_modules(unet, set(spec.unet_groups)),
            *diffusers_te_modules(n_te_layers, set(spec.te_groups)),
        ]
        file_seed = seed * 100 + spec.seed_offset
        for module in candidates:
            layer = convert(module, False)
            if layer not in shapes:
                if module.endswith("_conv_shortcut"):
                    continue  # only resnets that change channel count have a shortcut conv
                raise RuntimeError(f"{spec.name}: {module} converts to {layer}, which is not a layer of {ckpt}")
            tensors.update(_module_weights(module, shapes[layer], spec.kind, rank, file_seed, spec.strength))
            (te_layers if module.startswith("lora_te_") else unet_layers).append(layer)
        extra = {"ss_network_args": json.dumps({"algo": spec.kind})}
        infos[spec.name] = save_lora(lora_dir, spec, rank, tensors, unet_layers, te_layers, "sd_v1", extra)
    return infos


# --------------------------------------------------------------------------------------------------------------------
# SDXL
# --------------------------------------------------------------------------------------------------------------------

#: Kohya's SDXL LoRA targets in the UNet: every Transformer2DModel's proj_in/proj_out (linear on SDXL), attention
#: linears and feed-forward, named by the sgm layer path (kohya's SDXL UNet keeps the original layout).
SDXL_UNET_TARGET = re.compile(
    r"^diffusion_model_(?:input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_"
    r"(?:proj_in|proj_out|transformer_blocks_\d+_(?:attn[12]_(?:to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))$"
)

#: The SDXL test LoRAs: plain LoRA on the UNet and both text encoders; they differ in seed, so their effects differ.
SDXL_SPECS: tuple[_Spec, ...] = (
    _Spec("mlxA", "lora", 11, frozenset({"attn", "ff", "proj"}), frozenset({"attn", "mlp"})),
    _Spec("mlxB", "lora", 12, frozenset({"attn", "ff", "proj"}), frozenset({"attn", "mlp"})),
)


def sdxl_layer_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Weight shapes by webui network layer name on SDXL (assign_network_names_to_compvis_modules prefixes each text
    encoder's layers with its embedder index); OpenCLIP's attention is one MultiheadAttention layer (``..._attn``)
    with the q/k/v projections stacked in ``in_proj_weight``."""
    from safetensors import safe_open

    prefixes = {
        "model.diffusion_model.": "diffusion_model.",
        "conditioner.embedders.0.transformer.": "0.transformer.",
        "conditioner.embedders.1.model.": "1.model.",
    }
    shapes: dict[str, tuple[int, ...]] = {}
    with safe_open(str(ckpt), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is None or not key.endswith(("weight", ".in_proj_weight")):
                continue
            stem = key.removesuffix(".in_proj_weight").removesuffix(".weight")
            layer = prefixes[prefix] + stem[len(prefix) :]
            shapes[layer.replace(".", "_")] = tuple(fh.get_slice(key).get_shape())
    return shapes


def resolve_sdxl_module(
    module: str, convert: Callable[[str, bool], str], shapes: dict[str, tuple[int, ...]]
) -> tuple[str, tuple[int, ...]] | None:
    """(network layer name, weight shape) the built-in Lora extension gives a kohya SDXL module, or None.

    The lookup order of networks.load_network on SDXL: the webui's name conversion (which maps ``lora_te2_`` to the
    OpenCLIP layers), then a q/k/v projection onto its MultiheadAttention, then the sgm-named ``lora_unet_`` and
    ``lora_te1_text_model`` spellings.  A q/k/v projection's shape is one third of ``in_proj_weight``.
    """
    key = convert(module, False)
    if key in shapes:
        return key, shapes[key]
    m = re.match(r"(.*)_([qkv]_proj)$", key)
    if m and m.group(1) in shapes:
        out_dim, in_dim = shapes[m.group(1)]
        return key, (out_dim // 3, in_dim)
    if module.startswith("lora_unet_"):
        key = "diffusion_model_" + module[len("lora_unet_") :]
    elif module.startswith("lora_te1_text_model_"):
        key = "0_transformer_text_model_" + module[len("lora_te1_text_model_") :]
    return (key, shapes[key]) if key in shapes else None


def sdxl_kohya_modules(shapes: dict[str, tuple[int, ...]], te_groups: set[str]) -> Iterator[str]:
    """Kohya SDXL module names: sgm-path UNet names, and HF CLIP names for both text encoders (``lora_te1_``,
    ``lora_te2_``; kohya loads OpenCLIP-G as a transformers CLIPTextModelWithProjection)."""
    yield from ("lora_unet_" + layer[len("diffusion_model_") :] for layer in shapes if SDXL_UNET_TARGET.match(layer))
    n_layers = {
        te: 1 + max(int(m.group(1)) for k in shapes if (m := re.match(pattern, k)))
        for te, pattern in (
            ("te1", r"0_transformer_text_model_encoder_layers_(\d+)_"),
            ("te2", r"1_model_transformer_resblocks_(\d+)_"),
        )
    }
    for te, count in n_layers.items():
        for name in diffusers_te_modules(count, te_groups):
            yield name.replace("lora_te_", f"lora_{te}_", 1)


def build_sdxl_loras(
    lora_dir: Path, ckpt: Path, seed: int = 0, webui_dir: str | Path | None = None, rank: int = RANK
) -> dict[str, LoraInfo]:
    """Write the kohya-format SDXL LoRAs mlxA and mlxB (plain, rank ``rank``) for the SDXL checkpoint at ckpt.

    Raises if any module would not land on a layer of the checkpoint under the built-in Lora extension's SDXL lookup.
    """

    webui = resolve_webui_dir(webui_dir)
    convert = load_webui_name_converter(webui)
    shapes = sdxl_layer_shapes(Path(ckpt))
    lora_dir = Path(lora_dir)
    lora_dir.mkdir(parents=True, exist_ok=True)

    infos: dict[str, LoraInfo] = {}
    for spec in SDXL_SPECS:
        tensors: dict[str, torch.Tensor] = {}
        unet_layers: list[str] = []
        te_layers: list[str] = []
        file_seed = seed * 100 + spec.seed_offset
        for module in sdxl_kohya_modules(shapes, set(spec.te_groups)):
            resolved = resolve_sdxl_module(module, convert, shapes)
            if resolved is None:
                raise RuntimeError(f"{spec.name}: {module} matches no layer of {ckpt}")
            layer, shape = resolved
            tensors.update(_module_weights(module, shape, spec.kind, rank, file_seed, spec.strength))
            (unet_layers if layer.startswith("diffusion_model_") else te_layers).append(layer)
        infos[spec.name] = save_lora(lora_dir, spec, rank, tensors, unet_layers, te_layers, "sdxl_base_v1-0")
    return infos


def save_lora(
    lora_dir: Path,
    spec: _Spec,
    rank: int,
    tensors: dict[str, torch.Tensor],
    unet_layers: list[str],
    te_layers: list[str],
    base_model: str,
    extra_metadata: dict[str, str] | None = None,
) -> LoraInfo:
    """Write one file with kohya's metadata (the webui reads the output name as the alias) and describe it."""
    from safetensors.torch import save_file

    metadata = {
        "ss_network_module": "lycoris.kohya" if spec.kind != "lora" else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": base_model,
        "ss_output_name": spec.name,
        **(extra_metadata or {}),
    }
    path = lora_dir / f"{spec.name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return LoraInfo(
        name=spec.name,
        path=path,
        kind=spec.kind,
        rank=rank,
        n_unet_modules=len(unet_layers),
        n_te_modules=len(te_layers),
        unet_layers=tuple(unet_layers),
        te_layers=tuple(te_layers),
    )


def main(argv: list[str] | None = None) -> int:
    """CLI for a process without the webui's packages (``python -m tests.hosts run``, the browser tier), run with
    the webui's python: ``python -m tests.webui.tiny_lora OUT_DIR [--webui-dir DIR]`` builds the tier's tiny
    model into ``OUT_DIR/Stable-diffusion`` and its LoRAs into ``OUT_DIR/Lora``, as the tier's fixture does, and
    prints ``{"ckpt": ..., "lora_dir": ...}``."""
    import argparse

    from .tiny_model import build_tiny_sd1

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--webui-dir", default=None, help="webui checkout (default: $SD_WEBUI_DIR)")
    args = parser.parse_args(argv)
    ckpt = build_tiny_sd1(args.out_dir / "Stable-diffusion", seed=0, webui_dir=args.webui_dir)
    build_loras(args.out_dir / "Lora", ckpt, seed=0, webui_dir=args.webui_dir)
    print(json.dumps({"ckpt": str(ckpt), "lora_dir": str(args.out_dir / "Lora")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
