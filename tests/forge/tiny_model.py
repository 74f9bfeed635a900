"""Write the Forge tier's test models: a tiny random-weight SD1.5 checkpoint that Forge recognises as SD1.5 (or,
with ``--sdxl``, an SDXL one that it recognises as SDXL), and kohya-format LoRAs for it.

Run as a script with Forge's python (the conftest does, in a subprocess): it takes the exact parameter shapes from
Forge's own ``IntegratedUNet2DConditionModel`` and ``IntegratedAutoencoderKL`` and from transformers'
``CLIPTextModel``, built on the meta device, so pytest's process never imports Forge::

    python tests/forge/tiny_model.py OUT_DIR --forge FORGE_DIR [--seed 0] [--sdxl]

It writes ``OUT_DIR/Stable-diffusion/tiny-sd15.safetensors`` (``tiny-sdxl``), ``OUT_DIR/Lora/<name>.safetensors`` and
``OUT_DIR/manifest.json`` (the checkpoint and, per LoRA, its kind and how many UNet and text-encoder parameters it
patches).

Forge guesses the model type from the UNet's keys (``huggingface_guess``'s SD15): 320 model channels, context 768,
no ``label_emb``, conv ``proj_in``; channel multipliers and res blocks are free, so the UNet has one level with one
res block (26M parameters), attention included. The text encoder (CLIP-L) and the VAE must be full size: Forge
builds them from its bundled ``runwayml/stable-diffusion-v1-5`` configs. Every tensor is seeded random and none is
zero: zero norms or output layers give NaN or flat images.

SDXL (``--sdxl``): ``huggingface_guess``'s SDXL matches 320 model channels, linear ``proj_in``, context 2048, a
``label_emb`` of 2816 inputs, no temporal layers and the input res blocks' transformer depths ``[0, 0, 2, 2, 10, 10]``;
the channel multipliers and the middle and output blocks' depths are free. So the UNet keeps SDXL's three levels of
two res blocks and its 24 input transformer blocks, but every level is 320 channels wide and the middle block and the
output blocks of levels 2 and 3 are one transformer deep (160M parameters; SDXL's has 2.6G). CLIP-L, CLIP-G (OpenCLIP
bigG's text tower: 32 layers, width 1280) and the VAE are full size, as Forge builds them from its bundled
``stabilityai/stable-diffusion-xl-base-1.0`` configs (Forge's ``IntegratedCLIP``); the text encoders are written in
the sgm layout by ``huggingface_guess``'s own SDXL saver: ``conditioner.embedders.0.transformer.*`` (CLIP-L) and
``conditioner.embedders.1.model.*`` (CLIP-G as OpenCLIP, q/k/v fused into ``in_proj``). 1.06G parameters, 2.1 GB.
Its LoRAs patch the UNet as SD1's do and the text encoders' self-attention linears (``SDXL_TE_LINEARS``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKPOINT_NAME = "tiny-sd15"
SDXL_NAME = "tiny-sdxl"
UNET_PREFIX = "model.diffusion_model."
TE_PREFIX = "cond_stage_model.transformer."
#: Each text encoder's key prefix (up to transformers' ``text_model``) and its kohya LoRA prefix: SD1's, and SDXL's
#: two in Forge's layout (``clip_l``/``clip_g``, as ``huggingface_guess``'s SDXL names them before saving).
TEXT_ENCODERS = {TE_PREFIX: "lora_te_"}
SDXL_TEXT_ENCODERS = {"clip_l.transformer.": "lora_te1_", "clip_g.transformer.": "lora_te2_"}
#: What the SDXL LoRAs patch in each text-encoder layer: the self-attention's linears. Forge merges all of a CLIP
#: patcher's LoRAs again whenever its set changes: with CLIP-G's MLPs too, that took ~10 s a generation on 2 cores.
SDXL_TE_LINEARS = ".self_attn."
#: (name, kind, seed offset): plain LoRAs on every transformer linear and proj_in/proj_out (1x1 convs) of the UNet
#: and every text-encoder linear; the LoHa on the attention linears of both; LyCORIS full and norm patches on the
#: UNet alone (weight and bias of one layer patched together).
LORAS = (("mlA", "lora", 1), ("mlB", "lora", 2), ("mlC", "lora", 3), ("mlLoha", "loha", 4), ("mlFull", "full", 5))
#: The SDXL model's: plain LoRAs on the UNet and both text encoders, and mlxB's part in each text encoder as a file of
#: its own (kind ``te1``/``te2``, mlxB's seed: its very tensors), to tell what each text encoder makes of it.
SDXL_LORAS = (("mlxA", "lora", 1), ("mlxB", "lora", 2), ("mlxB_te1", "te1", 2), ("mlxB_te2", "te2", 2))
#: A part kind's kohya prefix.
PARTS = {"te1": "lora_te1_", "te2": "lora_te2_"}
#: What each kind of file key patches (Forge's ``load_lora``): the layer's weight or its bias.
PATCHED = {".lora_down.weight": "weight", ".hada_w1_a": "weight", ".diff": "weight", ".w_norm": "weight"}
PATCHED |= {".diff_b": "bias", ".b_norm": "bias"}
RANK = 4
#: A LoRA's ``up @ down`` at weight 1, relative to the base weight's spread (the base is 1/sqrt(fan_in)).
LORA_STRENGTH = 0.5
ATTENTION = (".attn1.", ".attn2.", ".self_attn.")
#: Forge's ``IntegratedUNet2DConditionModel`` arguments: SD1.5's widths and context, one level with one res block.
UNET_CONFIG = {
    "in_channels": 4,
    "model_channels": 320,
    "out_channels": 4,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "num_heads": 8,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
}
#: SD1.5's own UNet (four levels of two res blocks, attention on the first three): the benchmark's model
#: (``bench/compare.py --host forge|reforge``), never the tests'.
SD15_UNET_CONFIG = UNET_CONFIG | {
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}
#: The benchmark's LoRA rank on the SD1.5-size model (as on A1111's).
SD15_RANK = 16
#: The SDXL UNet (see the module docstring): what huggingface_guess's SDXL matches, at 320 channels on every level.
SDXL_UNET_CONFIG = {
    "in_channels": 4,
    "model_channels": 320,
    "out_channels": 4,
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1],
    "num_heads": -1,
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 2048,
    "use_linear_in_transformer": True,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
}


def is_reforge(webui_dir: Path) -> bool:
    """reForge (Forge's older backend, ``ldm_patched``) rather than Forge (``backend``)."""
    return not (webui_dir / "backend").is_dir() and (webui_dir / "ldm_patched").is_dir()


def forge_modules(forge_dir: Path) -> tuple[Any, Any]:
    """Forge's UNet and VAE classes. ``backend.args`` parses ``sys.argv`` when imported: it gets Forge's CPU flag
    alone."""
    for path in (forge_dir, forge_dir / "repositories" / "huggingface_guess", forge_dir / "packages_3rdparty"):
        sys.path.insert(0, str(path))
    argv, sys.argv = sys.argv, [sys.argv[0], "--always-cpu"]
    try:
        from backend.nn.unet import IntegratedUNet2DConditionModel
        from backend.nn.vae import IntegratedAutoencoderKL
    finally:
        sys.argv = argv
    return IntegratedUNet2DConditionModel, IntegratedAutoencoderKL


def reforge_import(webui_dir: Path, module: str) -> Any:
    """A module of reForge's ``ldm_patched``, its memory manager on the CPU (``--always-cpu``: its args parser reads
    no ``sys.argv`` unless told to, and the memory manager picks its device at import). Some import the webui's
    ``modules.shared``, whose flags parser reads ``sys.argv``: it gets none."""
    import importlib

    if str(webui_dir) not in sys.path:
        sys.path.insert(0, str(webui_dir))
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        importlib.import_module("ldm_patched.modules.args_parser").args.always_cpu = True
        return importlib.import_module(module)
    finally:
        sys.argv = argv


class HostModels:
    """The host's own model classes and configs, for the shapes (Forge: ``backend`` and its bundled diffusers
    configs; reForge: ``ldm_patched`` and its bundled CLIP configs). Both hosts hold the same modules under the same
    keys in the same order: a seed gives the same files on either."""

    def __init__(self, webui_dir: Path, sdxl: bool) -> None:
        self.webui_dir, self.sdxl, self.reforge = webui_dir, sdxl, is_reforge(webui_dir)

    def unet(self, config: dict[str, Any]) -> Any:
        if self.reforge:
            openaimodel = reforge_import(self.webui_dir, "ldm_patched.ldm.modules.diffusionmodules.openaimodel")
            return openaimodel.UNetModel(image_size=None, **config)
        return forge_modules(self.webui_dir)[0](**config)

    def controlnet(self, config: dict[str, Any], hint_channels: int) -> Any:
        """The host's ControlNet (the UNet's encoder half and a hint block) for the UNet ``config``."""
        if self.reforge:
            cldm = reforge_import(self.webui_dir, "ldm_patched.controlnet.cldm")
            return cldm.ControlNet(image_size=None, hint_channels=hint_channels, **config)
        forge_modules(self.webui_dir)  # Forge's paths and its CPU flag, before its backend is imported
        from backend.nn.cnets.cldm import ControlNet

        return ControlNet(hint_channels=hint_channels, **config)

    def _forge_configs(self) -> Path:
        forge_modules(self.webui_dir)
        if not self.sdxl:
            return self.webui_dir / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5"
        from huggingface_guess import model_list

        return self.webui_dir / "backend" / "huggingface" / model_list.SDXL.huggingface_repo

    def vae(self) -> Any:
        """SD1's and SDXL's VAE (one architecture)."""
        if self.reforge:
            autoencoder = reforge_import(self.webui_dir, "ldm_patched.ldm.models.autoencoder")
            ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3}
            ddconfig |= {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": []}
            return autoencoder.AutoencoderKL(ddconfig={**ddconfig, "dropout": 0.0}, embed_dim=4)
        vae_class = forge_modules(self.webui_dir)[1]
        return vae_class.from_config(vae_class.load_config(str(self._forge_configs() / "vae")))

    def text_config(self, encoder: str) -> Any:
        """CLIP-L's (``text_encoder``) or CLIP-G's (``text_encoder_2``) transformers config."""
        from transformers import CLIPTextConfig

        if self.reforge:
            name = "clip_config_bigg.json" if encoder == "text_encoder_2" else "sd1_clip_config.json"
            return CLIPTextConfig.from_json_file(str(self.webui_dir / "ldm_patched" / "modules" / name))
        return CLIPTextConfig.from_pretrained(str(self._forge_configs() / encoder))

    def sdxl_guess(self) -> Any:
        """The host's SDXL model class (``huggingface_guess``'s or ``ldm_patched``'s: the same clip saver)."""
        if self.reforge:
            return reforge_import(self.webui_dir, "ldm_patched.modules.supported_models").SDXL(SDXL_UNET_CONFIG)
        forge_modules(self.webui_dir)
        from huggingface_guess import model_list

        return model_list.SDXL(SDXL_UNET_CONFIG)


class IntegratedCLIP:
    """Forge's ``backend.nn.clip.IntegratedCLIP`` (a transformers text model, ``logit_scale`` and, for SDXL, a
    ``text_projection``): the keys its loader fills, built the same way on either host."""

    def __new__(cls, config: Any, add_text_projection: bool) -> Any:
        import torch
        from transformers import CLIPTextModel

        module = torch.nn.Module()
        module.transformer = CLIPTextModel(config)
        module.logit_scale = torch.nn.Parameter(torch.tensor(4.6055))
        if add_text_projection:
            module.transformer.text_projection = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        return module


def checkpoint_shapes(webui_dir: Path, unet_config: dict[str, Any] = UNET_CONFIG) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key (original ldm layout) and its shape."""
    import torch
    from transformers import CLIPTextModel

    host = HostModels(webui_dir, sdxl=False)
    with torch.device("meta"):
        parts = (
            (UNET_PREFIX, host.unet(unet_config)),
            ("first_stage_model.", host.vae()),
            (TE_PREFIX, CLIPTextModel(host.text_config("text_encoder"))),
        )
    return meta_shapes(parts)


#: SDXL's text encoders as Forge names them (``clip_l``, ``clip_g``) and their folders in a diffusers repo.
SDXL_ENCODERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


def sdxl_shapes(webui_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every parameter of the SDXL model and its shape: the UNet and the VAE under their checkpoint keys, the text
    encoders as Forge holds them (``clip_l.``/``clip_g.`` + ``IntegratedCLIP``'s keys), before :func:`sdxl_checkpoint`.
    """
    import torch

    host = HostModels(webui_dir, sdxl=True)
    with torch.device("meta"):
        parts = (
            (UNET_PREFIX, host.unet(SDXL_UNET_CONFIG)),
            ("first_stage_model.", host.vae()),
            *((f"{clip}.", IntegratedCLIP(host.text_config(folder), True)) for clip, folder in SDXL_ENCODERS.items()),
        )
    return meta_shapes(parts)


#: The order Forge's transformer block registers its parts in (reForge's ``ldm_patched`` block registers ``ff`` after
#: ``attn1`` and the norms last): the random tensors are drawn in key order, so both hosts' files are the same.
BLOCK_ORDER = ("attn1.", "norm1.", "attn2.", "norm2.", "ff.", "norm3.")


def meta_shapes(parts: tuple[tuple[str, Any], ...]) -> dict[str, tuple[int, ...]]:
    """``prefix + key``: shape, for each (prefix, module built on the meta device); without transformers'
    ``position_ids`` buffer; each transformer block's keys in Forge's order (:data:`BLOCK_ORDER`)."""
    shapes = {
        prefix + key: tuple(value.shape)
        for prefix, module in parts
        for key, value in module.state_dict().items()
        if not key.endswith("position_ids")
    }

    def block(key: str) -> tuple[str, int]:
        head, found, tail = key.partition(".transformer_blocks.")
        if not found:
            return key, 0
        index, _, rest = tail.partition(".")
        rank = next((i for i, part in enumerate(BLOCK_ORDER) if rest.startswith(part)), len(BLOCK_ORDER))
        return f"{head}.transformer_blocks.{index}", rank

    first: dict[str, int] = {}  # where each block (or lone key) starts: blocks keep their place, keys sort inside
    for i, key in enumerate(shapes):
        first.setdefault(block(key)[0], i)
    ordered = sorted(shapes, key=lambda key: (first[block(key)[0]], block(key)[1]))  # stable
    return {key: shapes[key] for key in ordered}


def sdxl_checkpoint(state: dict[str, Any], webui_dir: Path) -> dict[str, Any]:
    """The SDXL state in the sgm layout of real SDXL checkpoints, the text encoders converted by the host's own SDXL
    saver (``huggingface_guess``'s or ``ldm_patched``'s: the inverse of what its loader does to them)."""
    rest = {key: value for key, value in state.items() if key.partition(".")[0] not in SDXL_ENCODERS}
    text = {key: value for key, value in state.items() if key.partition(".")[0] in SDXL_ENCODERS}
    return rest | HostModels(webui_dir, sdxl=True).sdxl_guess().process_clip_state_dict_for_saving(text)


def random_tensor(key: str, shape: tuple[int, ...], generator: Any) -> Any:
    """Weights at 1/sqrt(fan_in) (embeddings at 0.02), norm weights around 1, biases small: never zero."""
    import torch

    if len(shape) >= 2:
        scale = 0.02 if "embedding" in key else 1 / math.sqrt(math.prod(shape[1:]))
        return torch.randn(shape, generator=generator) * scale
    if key.endswith(".weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    return 0.02 * torch.randn(shape, generator=generator)


def lora_targets(
    shapes: dict[str, tuple[int, ...]], text_encoders: dict[str, str], te_linears: str = ""
) -> list[tuple[str, tuple[int, ...], bool]]:
    """(kohya module name, weight shape, attention?) for every layer a test LoRA may patch: the UNet transformers'
    linears and ``proj_in``/``proj_out``, and the linears of each text encoder (``{key prefix: kohya prefix}``) whose
    key holds ``te_linears``. Kohya names are the ldm (transformers) module path with ``_`` for ``.``, as Forge's key
    map (``model_lora_keys_unet``/``_clip``) expects."""
    targets = []
    for key, shape in shapes.items():
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        encoder = next((p for p in text_encoders if key.startswith(p + "text_model.encoder.layers.")), None)
        if key.startswith(UNET_PREFIX) and (
            ".transformer_blocks." in key or key.endswith((".proj_in.weight", ".proj_out.weight"))
        ):
            name = "lora_unet_" + module[len(UNET_PREFIX) :].replace(".", "_")
        elif encoder is not None and len(shape) == 2 and te_linears in key:
            name = text_encoders[encoder] + module[len(encoder) :].replace(".", "_")
        else:
            continue
        if len(shape) == 2 or shape[2:] == (1, 1):
            targets.append((name, shape, any(a in key for a in ATTENTION)))
    return targets


def lora_tensors(
    kind: str, targets: list[tuple[str, tuple[int, ...], bool]], generator: Any, rank: int = RANK
) -> dict[str, Any]:
    """A kohya LoRA (``lora_down``/``lora_up``/``alpha``) or LoHa (``hada_w1_a/b``, ``hada_w2_a/b``, on the attention
    linears only) of rank ``rank``, fp16."""
    import torch

    tensors = {}
    for name, shape, attention in targets:
        out_features, in_features, kernel = shape[0], shape[1], shape[2:]
        if kind == "loha":
            if not attention or kernel:
                continue
            # (w1a @ w1b) * (w2a @ w2b) spreads like a plain LoRA's up @ down: LORA_STRENGTH times the base
            for i in (1, 2):
                tensors[f"{name}.hada_w{i}_a"] = torch.randn(out_features, rank, generator=generator) / math.sqrt(rank)
                tensors[f"{name}.hada_w{i}_b"] = torch.randn(rank, in_features, generator=generator) * math.sqrt(
                    LORA_STRENGTH / math.sqrt(in_features)
                )
        else:
            down = torch.randn(rank, in_features, *kernel, generator=generator) / math.sqrt(in_features)
            up = torch.randn(out_features, rank, *kernel, generator=generator) * (LORA_STRENGTH / math.sqrt(rank))
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return {key: value.to(torch.float16).contiguous() for key, value in tensors.items()}


def lycoris_tensors(shapes: dict[str, tuple[int, ...]], generator: Any) -> dict[str, Any]:
    """LyCORIS "full" (``diff`` and ``diff_b``: the weight and bias deltas) on the UNet transformers' attention
    output, feed-forward output and proj_in/proj_out, and "norm" (``w_norm``, ``b_norm``) on their LayerNorms and
    GroupNorm: each layer gets a weight and a bias patch, as Forge loads them (``diff`` patches on both). fp16."""
    import torch

    tensors = {}
    ends = (".attn1.to_out.0.weight", ".attn2.to_out.0.weight", ".ff.net.2.weight", ".proj_in.weight")
    ends += (".proj_out.weight", ".norm1.weight", ".norm2.weight", ".norm3.weight", ".0.norm.weight", ".1.norm.weight")
    for key, shape in shapes.items():
        module = key[: -len(".weight")]
        if not key.startswith(UNET_PREFIX) or not key.endswith(ends) or module + ".bias" not in shapes:
            continue
        name = "lora_unet_" + module[len(UNET_PREFIX) :].replace(".", "_")
        if len(shape) == 1:  # a norm: its weight is about 1, its bias about 0.02
            tensors[f"{name}.w_norm"] = 0.1 * LORA_STRENGTH * torch.randn(shape, generator=generator)
            tensors[f"{name}.b_norm"] = 0.02 * LORA_STRENGTH * torch.randn(shape, generator=generator)
        else:
            scale = LORA_STRENGTH / math.sqrt(math.prod(shape[1:]))
            tensors[f"{name}.diff"] = scale * torch.randn(shape, generator=generator)
            tensors[f"{name}.diff_b"] = 0.02 * LORA_STRENGTH * torch.randn(shape[:1], generator=generator)
    return {key: value.to(torch.float16).contiguous() for key, value in tensors.items()}


def build(out_dir: Path, forge_dir: Path, seed: int = 0, sdxl: bool = False, sd15: bool = False) -> dict[str, Any]:
    """Write the checkpoint (SD1.5 tiny or, with ``sd15``, full size; or SDXL), its LoRAs and ``manifest.json`` under
    ``out_dir``; return the manifest. The full-size model gets the plain LoRAs only, at :data:`SD15_RANK`."""
    import torch
    from safetensors.torch import save_file

    rank = SD15_RANK if sd15 else RANK
    if sdxl:
        stem, shapes, specs = SDXL_NAME, sdxl_shapes(forge_dir), SDXL_LORAS
        targets = lora_targets(shapes, SDXL_TEXT_ENCODERS, SDXL_TE_LINEARS)
    else:
        unet_config, specs = (SD15_UNET_CONFIG, LORAS[:3]) if sd15 else (UNET_CONFIG, LORAS)
        stem, shapes = CHECKPOINT_NAME, checkpoint_shapes(forge_dir, unet_config)
        targets = lora_targets(shapes, TEXT_ENCODERS)
    generator = torch.Generator().manual_seed(seed)
    state = {key: random_tensor(key, shape, generator).to(torch.float16) for key, shape in shapes.items()}
    ckpt = out_dir / "Stable-diffusion" / f"{stem}.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_file(sdxl_checkpoint(state, forge_dir) if sdxl else state, str(ckpt))
    lora_dir = out_dir / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    loras = {}
    for name, kind, offset in specs:
        generator = torch.Generator().manual_seed(seed * 1000 + offset)
        if kind == "full":
            tensors = lycoris_tensors(shapes, generator)
        elif kind in PARTS:
            whole = lora_tensors("lora", targets, generator, rank)
            tensors = {key: value for key, value in whole.items() if key.startswith(PARTS[kind])}
        else:
            tensors = lora_tensors(kind, targets, generator, rank)
        path = lora_dir / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
        patched = {
            (key.partition(".")[0], parameter)
            for key in tensors
            for suffix, parameter in PATCHED.items()
            if key.endswith(suffix)
        }
        loras[name] = {
            "path": str(path),
            "kind": kind,
            "n_unet": sum(module.startswith("lora_unet_") for module, _ in patched),
            "n_te": sum(module.startswith("lora_te") for module, _ in patched),
        }
    manifest = {"ckpt": str(ckpt), "lora_dir": str(lora_dir), "loras": loras}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def builder_cli(doc: str, build: Callable[..., Any], **flags: str) -> None:
    """The command line every test-model builder of this tier takes, ``OUT_DIR --forge FORGE_DIR [--seed N]`` and
    its own switches (``flags``: name -> help), and what it prints: ``build``'s result as one JSON line."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--forge", type=Path, required=True, help="the Forge (or reForge) checkout")
    parser.add_argument("--seed", type=int, default=0)
    for name, text in flags.items():
        parser.add_argument(f"--{name}", action="store_true", help=text)
    args = vars(parser.parse_args())
    out_dir, forge = args.pop("out_dir").resolve(), args.pop("forge").resolve()
    print(json.dumps(build(out_dir, forge, **args)))


if __name__ == "__main__":
    builder_cli(
        __doc__,
        build,
        sdxl="the SDXL model and its LoRAs instead of SD1.5's",
        sd15="SD1.5's full-size UNet and rank-16 LoRAs (the benchmark's model) instead of the tiny one",
    )
