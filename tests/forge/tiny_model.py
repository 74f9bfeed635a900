"""Write the Forge tier's test model: a tiny random-weight SD1.5 checkpoint that Forge recognises as SD1.5, and
kohya-format LoRAs for it.

Run as a script with Forge's python (the conftest does, in a subprocess): it takes the exact parameter shapes from
Forge's own ``IntegratedUNet2DConditionModel`` and ``IntegratedAutoencoderKL`` and from transformers'
``CLIPTextModel``, built on the meta device, so pytest's process never imports Forge::

    python tests/forge/tiny_model.py OUT_DIR --forge FORGE_DIR [--seed 0]

It writes ``OUT_DIR/Stable-diffusion/tiny-sd15.safetensors``, ``OUT_DIR/Lora/<name>.safetensors`` and
``OUT_DIR/manifest.json`` (the checkpoint and, per LoRA, its kind and how many UNet and text-encoder parameters it
patches).

Forge guesses the model type from the UNet's keys (``huggingface_guess``'s SD15): 320 model channels, context 768,
no ``label_emb``, conv ``proj_in``; channel multipliers and res blocks are free, so the UNet has one level with one
res block (26M parameters), attention included. The text encoder (CLIP-L) and the VAE must be full size: Forge
builds them from its bundled ``runwayml/stable-diffusion-v1-5`` configs. Every tensor is seeded random and none is
zero: zero norms or output layers give NaN or flat images.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

CHECKPOINT_NAME = "tiny-sd15"
UNET_PREFIX = "model.diffusion_model."
TE_PREFIX = "cond_stage_model.transformer."
#: (name, kind, seed offset): plain LoRAs on every transformer linear and proj_in/proj_out (1x1 convs) of the UNet
#: and every text-encoder linear; the LoHa on the attention linears of both; LyCORIS full and norm patches on the
#: UNet alone (weight and bias of one layer patched together).
LORAS = (("mlA", "lora", 1), ("mlB", "lora", 2), ("mlC", "lora", 3), ("mlLoha", "loha", 4), ("mlFull", "full", 5))
#: What each kind of file key patches (Forge's ``load_lora``): the layer's weight or its bias.
PATCHED = {".lora_down.weight": "weight", ".hada_w1_a": "weight", ".diff": "weight", ".w_norm": "weight"}
PATCHED |= {".diff_b": "bias", ".b_norm": "bias"}
RANK = 4
#: A LoRA's ``up @ down`` at weight 1, relative to the base weight's spread (the base is 1/sqrt(fan_in)).
LORA_STRENGTH = 0.5
ATTENTION = (".attn1.", ".attn2.", ".self_attn.")


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
    unet_config = {
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
    with torch.device("meta"):
        parts = (
            (UNET_PREFIX, unet_class(**unet_config)),
            ("first_stage_model.", vae_class.from_config(vae_class.load_config(str(configs / "vae")))),
            (TE_PREFIX, CLIPTextModel(CLIPTextConfig.from_pretrained(str(configs / "text_encoder")))),
        )
    return {
        prefix + key: tuple(value.shape)
        for prefix, module in parts
        for key, value in module.state_dict().items()
        if not key.endswith("position_ids")
    }


def random_tensor(key: str, shape: tuple[int, ...], generator: Any) -> Any:
    """Weights at 1/sqrt(fan_in) (embeddings at 0.02), norm weights around 1, biases small: never zero."""
    import torch

    if len(shape) >= 2:
        scale = 0.02 if "embedding" in key else 1 / math.sqrt(math.prod(shape[1:]))
        return torch.randn(shape, generator=generator) * scale
    if key.endswith(".weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    return 0.02 * torch.randn(shape, generator=generator)


def lora_targets(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...], bool]]:
    """(kohya module name, weight shape, attention?) for every layer a test LoRA may patch: the UNet transformers'
    linears and ``proj_in``/``proj_out``, and the text encoder's linears. Kohya names are the ldm module path with
    ``_`` for ``.``, as Forge's key map (``model_lora_keys_unet``/``_clip``) expects."""
    targets = []
    for key, shape in shapes.items():
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        if key.startswith(UNET_PREFIX) and (
            ".transformer_blocks." in key or key.endswith((".proj_in.weight", ".proj_out.weight"))
        ):
            name = "lora_unet_" + module[len(UNET_PREFIX) :].replace(".", "_")
        elif key.startswith(TE_PREFIX + "text_model.encoder.layers.") and len(shape) == 2:
            name = "lora_te_" + module[len(TE_PREFIX) :].replace(".", "_")
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


def build(out_dir: Path, forge_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Write the checkpoint, the LoRAs and ``manifest.json`` under ``out_dir``; return the manifest."""
    import torch
    from safetensors.torch import save_file

    shapes = checkpoint_shapes(forge_dir)
    generator = torch.Generator().manual_seed(seed)
    state = {key: random_tensor(key, shape, generator).to(torch.float16) for key, shape in shapes.items()}
    ckpt = out_dir / "Stable-diffusion" / f"{CHECKPOINT_NAME}.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(ckpt))
    lora_dir = out_dir / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    targets = lora_targets(shapes)
    loras = {}
    for name, kind, offset in LORAS:
        generator = torch.Generator().manual_seed(seed * 1000 + offset)
        tensors = lycoris_tensors(shapes, generator) if kind == "full" else lora_tensors(kind, targets, generator)
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
            "n_te": sum(module.startswith("lora_te_") for module, _ in patched),
        }
    manifest = {"ckpt": str(ckpt), "lora_dir": str(lora_dir), "loras": loras}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--forge", type=Path, required=True, help="the Forge checkout")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build(args.out_dir.resolve(), args.forge.resolve(), args.seed)))


if __name__ == "__main__":
    main()
