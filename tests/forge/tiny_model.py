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


def checkpoint_shapes(forge_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every checkpoint key (original ldm layout) and its shape."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_class, vae_class = forge_modules(forge_dir)
    configs = forge_dir / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5"
    with torch.device("meta"):
        parts = (
            (UNET_PREFIX, unet_class(**UNET_CONFIG)),
            ("first_stage_model.", vae_class.from_config(vae_class.load_config(str(configs / "vae")))),
            (TE_PREFIX, CLIPTextModel(CLIPTextConfig.from_pretrained(str(configs / "text_encoder")))),
        )
    return meta_shapes(parts)


def sdxl_shapes(forge_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every parameter of the SDXL model and its shape: the UNet and the VAE under their checkpoint keys, the text
    encoders as Forge holds them (``clip_l.``/``clip_g.`` + ``IntegratedCLIP``'s keys), before :func:`sdxl_checkpoint`.
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_class, vae_class = forge_modules(forge_dir)
    from backend.nn.clip import IntegratedCLIP
    from huggingface_guess import model_list

    configs = forge_dir / "backend" / "huggingface" / model_list.SDXL.huggingface_repo
    text_encoders = model_list.SDXL(SDXL_UNET_CONFIG).clip_target()  # {"clip_l": "text_encoder", ...}
    with torch.device("meta"):
        parts = (
            (UNET_PREFIX, unet_class(**SDXL_UNET_CONFIG)),
            ("first_stage_model.", vae_class.from_config(vae_class.load_config(str(configs / "vae")))),
            *(
                (f"{clip}.", IntegratedCLIP(CLIPTextModel, CLIPTextConfig.from_pretrained(str(configs / folder)), True))
                for clip, folder in text_encoders.items()
            ),
        )
    return meta_shapes(parts)


def meta_shapes(parts: tuple[tuple[str, Any], ...]) -> dict[str, tuple[int, ...]]:
    """``prefix + key``: shape, for each (prefix, module built on the meta device); without transformers'
    ``position_ids`` buffer."""
    return {
        prefix + key: tuple(value.shape)
        for prefix, module in parts
        for key, value in module.state_dict().items()
        if not key.endswith("position_ids")
    }


def sdxl_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """The SDXL state in the sgm layout of real SDXL checkpoints, the text encoders converted by
    ``huggingface_guess``'s own SDXL saver (the inverse of what Forge's loader does to them)."""
    from huggingface_guess import model_list

    guess = model_list.SDXL(SDXL_UNET_CONFIG)
    encoders = guess.clip_target()  # {"clip_l": ..., "clip_g": ...}
    rest = {key: value for key, value in state.items() if key.partition(".")[0] not in encoders}
    text = {key: value for key, value in state.items() if key.partition(".")[0] in encoders}
    return rest | guess.process_clip_state_dict_for_saving(text)


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


def lora_tensors(kind: str, targets: list[tuple[str, tuple[int, ...], bool]], generator: Any) -> dict[str, Any]:
    """A rank-4 kohya LoRA (``lora_down``/``lora_up``/``alpha``) or LoHa (``hada_w1_a/b``, ``hada_w2_a/b``, on the
    attention linears only), fp16."""
    import torch

    tensors = {}
    for name, shape, attention in targets:
        out_features, in_features, kernel = shape[0], shape[1], shape[2:]
        if kind == "loha":
            if not attention or kernel:
                continue
            # (w1a @ w1b) * (w2a @ w2b) spreads like a plain LoRA's up @ down: LORA_STRENGTH times the base
            for i in (1, 2):
                tensors[f"{name}.hada_w{i}_a"] = torch.randn(out_features, RANK, generator=generator) / math.sqrt(RANK)
                tensors[f"{name}.hada_w{i}_b"] = torch.randn(RANK, in_features, generator=generator) * math.sqrt(
                    LORA_STRENGTH / math.sqrt(in_features)
                )
        else:
            down = torch.randn(RANK, in_features, *kernel, generator=generator) / math.sqrt(in_features)
            up = torch.randn(out_features, RANK, *kernel, generator=generator) * (LORA_STRENGTH / math.sqrt(RANK))
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(float(RANK))
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


def build(out_dir: Path, forge_dir: Path, seed: int = 0, sdxl: bool = False) -> dict[str, Any]:
    """Write the checkpoint (SD1.5, or SDXL), its LoRAs and ``manifest.json`` under ``out_dir``; return the
    manifest."""
    import torch
    from safetensors.torch import save_file

    if sdxl:
        stem, shapes, specs = SDXL_NAME, sdxl_shapes(forge_dir), SDXL_LORAS
        targets = lora_targets(shapes, SDXL_TEXT_ENCODERS, SDXL_TE_LINEARS)
    else:
        stem, shapes, specs = CHECKPOINT_NAME, checkpoint_shapes(forge_dir), LORAS
        targets = lora_targets(shapes, TEXT_ENCODERS)
    generator = torch.Generator().manual_seed(seed)
    state = {key: random_tensor(key, shape, generator).to(torch.float16) for key, shape in shapes.items()}
    ckpt = out_dir / "Stable-diffusion" / f"{stem}.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_file(sdxl_checkpoint(state) if sdxl else state, str(ckpt))
    lora_dir = out_dir / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    loras = {}
    for name, kind, offset in specs:
        generator = torch.Generator().manual_seed(seed * 1000 + offset)
        if kind == "full":
            tensors = lycoris_tensors(shapes, generator)
        elif kind in PARTS:
            whole = lora_tensors("lora", targets, generator)
            tensors = {key: value for key, value in whole.items() if key.startswith(PARTS[kind])}
        else:
            tensors = lora_tensors(kind, targets, generator)
        path = lora_dir / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"ss_network_dim": str(RANK), "ss_network_alpha": str(RANK)})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--forge", type=Path, required=True, help="the Forge checkout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sdxl", action="store_true", help="the SDXL model and its LoRAs instead of SD1.5's")
    args = parser.parse_args()
    print(json.dumps(build(args.out_dir.resolve(), args.forge.resolve(), args.seed, args.sdxl)))


if __name__ == "__main__":
    main()
