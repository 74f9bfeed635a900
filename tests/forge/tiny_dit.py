"""Write the Forge tier's tiny random Flux checkpoints (FLUX.1-dev's layout, with its guidance embedding, and
FLUX.1-schnell's, without) and Flux LoRAs in the two layouts users have: kohya's and diffusers'/ai-toolkit's.

Run as a script with the host's python (``server.build_assets`` does, in a subprocess), so that pytest's process never
imports Forge::

    python tests/forge/tiny_dit.py OUT_DIR --forge FORGE_DIR [--seed 0]

It writes ``OUT_DIR/Stable-diffusion/tiny-flux-dev.safetensors`` and ``tiny-flux-schnell.safetensors``,
``OUT_DIR/Lora/<name>.safetensors`` and ``OUT_DIR/manifest.json`` (the checkpoints and, per LoRA, its layout and how
many transformer and text-encoder patch entries Forge makes of it).

The shapes come from Forge's own classes built on the meta device: the transformer is Forge's
``IntegratedFluxTransformer2DModel`` at hidden 256 (4 heads of 64, ``axes_dim`` [16, 24, 24]: the rotary dims sum to
the head width), 2 double and 2 single blocks, context 4096 and pooled vector 768 as Flux's text encoders give them
(8.4M parameters). Forge's detection (``huggingface_guess``) fixes every Flux dimension but the guidance embedding to
FLUX.1's own, so this model loads only with the tier's one test-only patch, which reads them from the file (the
probe: ``multilora_forge_probe.py``). Forge builds the rest from its bundled ``black-forest-labs/FLUX.1-dev`` configs:
the VAE full size (16 latent channels, 84M), CLIP-L with its widths (its MLP is narrower: Forge's linear layers take
whatever the file holds) and T5-XXL at its width 4096 and 24 blocks, its attention and MLP 64 wide inside (the
embedding alone is 32128 x 4096). The keys are those of a single-file Flux checkpoint: ``model.diffusion_model.``,
``vae.``, ``text_encoders.clip_l.transformer.``, ``text_encoders.t5xxl.transformer.``. Every tensor is seeded random
(norm weights and RMSNorm scales around 1) and none is zero; both checkpoints share every tensor they both have.

LoRAs (fp16, rank 4, ``up @ down`` at weight 1 half the base weights' spread, as the SD1 tier's):

- kohya (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_te1_`` CLIP-L, ``lora_te2_`` T5: sd-scripts' names, which
  Forge maps 1:1): every linear of the double and single blocks, and the self-attention linears of both text
  encoders. ``mfA``, ``mfB``, and ``mfA2``, ``mfA``'s copy (its very tensors under another name); ``mfB_te1`` and
  ``mfB_te2``, ``mfB``'s part in one text encoder each.
- diffusers / ai-toolkit (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, no alpha): q, k and v
  separate (Forge patches slices of the fused ``qkv`` and single-block ``linear1``: offset entries), every other
  linear of the blocks, and CLIP-L's self-attention (``text_encoder.text_model...``). ``mfdA``, ``mfdB``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: The checkpoints: FLUX.1-dev's layout (guidance embedding: distilled CFG) and FLUX.1-schnell's.
FLUX_NAME = "tiny-flux-dev"
SCHNELL_NAME = "tiny-flux-schnell"
#: Forge's ``IntegratedFluxTransformer2DModel`` arguments (``guidance_embed`` per checkpoint).
FLUX_CONFIG = {
    "in_channels": 16,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 256,
    "mlp_ratio": 4.0,
    "num_heads": 4,
    "depth": 2,
    "depth_single_blocks": 2,
    "axes_dim": [16, 24, 24],
    "theta": 10000,
    "qkv_bias": True,
}
TRANSFORMER_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "vae."
#: The inner widths of the text encoders' lazy linears: CLIP-L's MLP, T5's attention (64 heads of 1) and MLP.
CLIP_MLP = 64
T5_INNER = 64
#: Which dimension of each T5 linear is inner (Forge builds them all 4096 wide and takes the file's shapes).
T5_INNER_AXIS = {"q": 0, "k": 0, "v": 0, "o": 1, "wi_0": 0, "wi_1": 0, "wo": 1}
#: (name, layout, seed offset): ``mfA2`` is ``mfA`` again (same seed); ``mfB_te1``, ``mfB_te2``: ``mfB``'s part in
#: CLIP-L and in T5 alone (its very tensors), to tell what each text encoder makes of it.
LORAS = (
    ("mfA", "kohya", 1),
    ("mfB", "kohya", 2),
    ("mfA2", "kohya", 1),
    ("mfB_te1", "te1", 2),
    ("mfB_te2", "te2", 2),
    ("mfdA", "diffusers", 3),
    ("mfdB", "diffusers", 4),
)
#: A text-encoder part's kohya prefix.
PARTS = {"te1": "lora_te1_", "te2": "lora_te2_"}


def host_modules(forge_dir: Path) -> dict[str, Any]:
    """Forge's Flux transformer, T5, VAE and config reader (``tiny_model.forge_modules`` sets up its paths and CPU
    flag)."""
    from tiny_model import forge_modules

    vae = forge_modules(forge_dir)[1]
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.t5 import IntegratedT5
    from backend.utils import read_arbitrary_config

    return {"flux": IntegratedFluxTransformer2DModel, "t5": IntegratedT5, "vae": vae, "read": read_arbitrary_config}


def flux_shapes(forge_dir: Path, guidance: bool) -> dict[str, tuple[int, ...]]:
    """Every key of the single-file checkpoint and its shape (see the module docstring)."""
    import torch
    from tiny_model import IntegratedCLIP, meta_shapes
    from transformers import CLIPTextConfig

    host = host_modules(forge_dir)
    repo = forge_dir / "backend" / "huggingface" / "black-forest-labs" / "FLUX.1-dev"
    clip_config = CLIPTextConfig.from_pretrained(str(repo / "text_encoder"))
    clip_config.intermediate_size = CLIP_MLP
    with torch.device("meta"):
        parts = (
            (TRANSFORMER_PREFIX, host["flux"](**FLUX_CONFIG, guidance_embed=guidance)),
            (VAE_PREFIX, host["vae"].from_config(host["vae"].load_config(str(repo / "vae")))),
            (CLIP_L_PREFIX[: -len("transformer.")], IntegratedCLIP(clip_config, False)),
            (T5_PREFIX[: -len("transformer.")], host["t5"](host["read"](str(repo / "text_encoder_2")))),
        )
    shapes = meta_shapes(parts)
    for key, shape in shapes.items():
        layer = key.split(".")[-2]
        if key.startswith(T5_PREFIX) and layer in T5_INNER_AXIS:
            shape = list(shape)
            shape[T5_INNER_AXIS[layer]] = T5_INNER
            shapes[key] = tuple(shape)
    return {key: shape for key, shape in shapes.items() if not key.endswith("logit_scale")}


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Any]:
    """Seeded random fp16 tensors, one generator per key (a key's tensor does not depend on which others the model
    has); RMSNorm scales around 1, like norm weights."""
    import hashlib

    import torch
    from tiny_model import random_tensor

    state = {}
    for key, shape in shapes.items():
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        name = key[: -len(".scale")] + ".weight" if key.endswith(".scale") else key
        state[key] = random_tensor(name, shape, generator).to(torch.float16).contiguous()
    return state


def kohya_targets(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...], bool]]:
    """(kohya module name, weight shape, attention?) for sd-scripts' Flux LoRA: every linear of the double and single
    blocks; CLIP-L's (``lora_te1_``) and T5's (``lora_te2_``) self-attention linears."""
    targets = []
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        module = key[: -len(".weight")]
        if key.startswith(tuple(TRANSFORMER_PREFIX + blocks for blocks in ("double_blocks.", "single_blocks."))):
            targets.append(("lora_unet_" + module[len(TRANSFORMER_PREFIX) :].replace(".", "_"), shape, False))
        elif key.startswith(CLIP_L_PREFIX) and ".self_attn." in key:
            targets.append(("lora_te1_" + module[len(CLIP_L_PREFIX) :].replace(".", "_"), shape, True))
        elif key.startswith(T5_PREFIX) and ".SelfAttention." in key and "relative_attention_bias" not in key:
            targets.append(("lora_te2_" + module[len(T5_PREFIX) :].replace(".", "_"), shape, True))
    return targets


def diffusers_targets(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...], bool]]:
    """(diffusers module name, the shape of the weight or slice it patches, attention?) for a diffusers/ai-toolkit Flux
    LoRA: every linear of ``transformer_blocks`` and ``single_transformer_blocks`` as Forge's own map names them
    (``flux_to_diffusers``: q, k, v and the single blocks' ``proj_mlp`` are slices of a fused weight), and CLIP-L's
    self-attention (``text_encoder.``)."""
    from packages_3rdparty.comfyui_lora_collection.utils import flux_to_diffusers

    config = {key: FLUX_CONFIG[key] for key in ("depth", "depth_single_blocks", "hidden_size")}
    targets = []
    for name, target in flux_to_diffusers(config).items():
        if not name.endswith(".weight") or not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        shape = shapes[TRANSFORMER_PREFIX + key]
        if len(shape) != 2:  # the q/k norms' scales
            continue
        if offset is not None:
            shape = (offset[2], shape[1])
        targets.append(("transformer." + name[: -len(".weight")], shape, ".attn." in name))
    for key, shape in shapes.items():
        if key.startswith(CLIP_L_PREFIX) and ".self_attn." in key and key.endswith(".weight"):
            targets.append(("text_encoder." + key[len(CLIP_L_PREFIX) : -len(".weight")], shape, True))
    return targets


def diffusers_names(tensors: dict[str, Any]) -> dict[str, Any]:
    """kohya's ``lora_down``/``lora_up`` as diffusers' ``lora_A``/``lora_B``, without alpha (ai-toolkit writes none:
    Forge then scales by 1, as kohya's alpha = rank does)."""
    renamed = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            continue
        renamed[key.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight")] = value
    return renamed


def build(out_dir: Path, forge_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Write both checkpoints, the LoRAs and ``manifest.json`` under ``out_dir``; return the manifest."""
    import torch
    from safetensors.torch import save_file
    from tiny_model import RANK, lora_tensors

    ckpt_dir = out_dir / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    shapes = flux_shapes(forge_dir, guidance=True)
    state = random_state(shapes, seed)
    checkpoints = {
        FLUX_NAME: ckpt_dir / f"{FLUX_NAME}.safetensors",
        SCHNELL_NAME: ckpt_dir / f"{SCHNELL_NAME}.safetensors",
    }
    save_file(state, str(checkpoints[FLUX_NAME]))
    guidance = TRANSFORMER_PREFIX + "guidance_in."
    save_file(
        {key: value for key, value in state.items() if not key.startswith(guidance)}, str(checkpoints[SCHNELL_NAME])
    )
    del state
    lora_dir = out_dir / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    targets = {"kohya": kohya_targets(shapes), "diffusers": diffusers_targets(shapes)}
    loras = {}
    for name, layout, offset in LORAS:
        generator = torch.Generator().manual_seed(seed * 1000 + 100 + offset)
        tensors = lora_tensors("lora", targets["kohya" if layout in PARTS else layout], generator)
        if layout in PARTS:
            tensors = {key: value for key, value in tensors.items() if key.startswith(PARTS[layout])}
        elif layout == "diffusers":
            tensors = diffusers_names(tensors)
        path = lora_dir / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"ss_network_dim": str(RANK)})
        modules = {key.partition(".lora_")[0] for key in tensors if ".lora_" in key}
        n_unet = sum(module.startswith(("lora_unet_", "transformer.")) for module in modules)
        loras[name] = {"path": str(path), "kind": layout, "n_unet": n_unet, "n_te": len(modules) - n_unet}
    manifest = {
        "ckpt": str(checkpoints[FLUX_NAME]),
        "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "lora_dir": str(lora_dir),
        "loras": loras,
    }
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
