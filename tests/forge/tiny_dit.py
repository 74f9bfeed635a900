"""Write the Forge tier's tiny random DiT checkpoints (FLUX.1-dev's layout, with its guidance embedding, and
FLUX.1-schnell's, without; the dev transformer as GGUF files too; Chroma's; SD3.5's) and Flux LoRAs in the two
layouts users have: kohya's and diffusers'/ai-toolkit's.

Run as a script with the host's python (``server.build_assets`` does, in a subprocess), so that pytest's process never
imports Forge::

    python tests/forge/tiny_dit.py OUT_DIR --forge FORGE_DIR [--seed 0]

It writes ``OUT_DIR/Stable-diffusion/``: ``tiny-flux-dev.safetensors``, ``tiny-flux-schnell.safetensors``,
``tiny-flux-dev-Q8_0.gguf``, ``tiny-flux-dev-Q6_K.gguf``, ``tiny-chroma.safetensors`` and ``tiny-sd35.safetensors``;
``OUT_DIR/modules/`` (the VAE and text encoders beside a GGUF), ``OUT_DIR/Lora/<name>.safetensors`` and
``OUT_DIR/manifest.json`` (the files and, per LoRA, its layout and how many transformer and text-encoder patch entries
Forge makes of it).

The shapes come from Forge's own classes built on the meta device: the transformer is Forge's
``IntegratedFluxTransformer2DModel`` at hidden 256 (4 heads of 64, ``axes_dim`` [16, 24, 24]: the rotary dims sum to
the head width), 2 double and 2 single blocks, context 4096 and pooled vector 768 as Flux's text encoders give them
(8.4M parameters). Forge's detection (``huggingface_guess``) fixes every Flux dimension but the guidance embedding to
FLUX.1's own, so this model loads only with the tier's one test-only patch, which reads them from the file (the
probe: ``multilora_forge_probe.py``). Forge builds the rest from its bundled ``black-forest-labs/FLUX.1-dev`` configs:
the VAE full size (16 latent channels, 84M), CLIP-L with its widths (its MLP is narrower: Forge's linear layers take
whatever the file holds) and T5-XXL at its width 4096 and 24 blocks, its attention and MLP 64 wide inside (the
embedding alone is 32128 x 4096). The keys are those of a single-file Flux checkpoint: ``model.diffusion_model.``,
``vae.``, ``text_encoders.clip_l.transformer.``, ``text_encoders.t5xxl.transformer.``. Chroma's
(``tiny-chroma``) has the same blocks, VAE and T5 and no CLIP-L; its modulation network is Forge's fixed one
(5120 wide, 5 layers: ``GuessChroma``) with narrow inner layers. SD3.5's (``tiny-sd35``, :data:`SD35_CONFIG`): an
MMDiT 2 joint blocks deep (Forge reads every dimension from the file: no patch), SD3's VAE, CLIP-L and CLIP-G (its
attention full width, 32 layers: 0.4 GB of the 1.2 GB file) and the same T5. Every tensor is seeded random
(norm weights and RMSNorm scales around 1) and none is zero; each key's tensor is drawn from a seed of its own, so the
files share every tensor they have in common.

LoRAs (fp16, rank 4, ``up @ down`` at weight 1 half the base weights' spread, as the SD1 tier's):

- kohya (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_te1_`` CLIP-L, ``lora_te2_`` T5: sd-scripts' names, which
  Forge maps 1:1): every linear of the double and single blocks, and the self-attention linears of both text
  encoders. ``mfA``, ``mfB``, and ``mfA2``, ``mfA``'s copy (its very tensors under another name); ``mfB_te1`` and
  ``mfB_te2``, ``mfB``'s part in one text encoder each; ``mfLoha``, a LoHa (``hada_w1_a``...) on the double blocks'
  attention linears and the text encoders' (a patch type other than a plain LoRA, which Forge merges from the
  weight).
- Chroma: ``mcA``, ``mcB`` (kohya, Chroma's block linears and T5's attention: Chroma has no modulation layers nor
  CLIP-L, and Forge skips a file with more than 12 keys it cannot place).
- SD3.5: ``msA``, ``msB`` (kohya, ``lora_unet_joint_blocks_0_x_block_attn_qkv``: every linear of the joint blocks,
  and CLIP-L's self-attention).
- diffusers / ai-toolkit (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, no alpha): q, k and v
  separate (Forge patches slices of the fused ``qkv`` and single-block ``linear1``: offset entries), every other
  linear of the blocks, and CLIP-L's self-attention (``text_encoder.text_model...``). ``mfdA``, ``mfdB``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

#: The checkpoints: FLUX.1-dev's layout (guidance embedding: distilled CFG) and FLUX.1-schnell's.
FLUX_NAME = "tiny-flux-dev"
SCHNELL_NAME = "tiny-flux-schnell"
#: Chroma (Flux's double and single blocks, a modulation network instead of Flux's modulation layers, T5 only).
CHROMA_NAME = "tiny-chroma"
#: Forge's ``IntegratedFluxTransformer2DModel`` arguments (and ``IntegratedChromaTransformer2DModel``'s, with its
#: modulation network's instead of the guidance embedding).
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
#: SD3.5 Large's layout (Forge's ``StableDiffusion3``, ``sd35.py``: an MMDiT with RMSNorm on q and k), as
#: ``MMDiTX``'s arguments. Forge reads its depth from the file (hidden = 64 x depth, one head of 64 per block) and
#: every other dimension too: this model needs no patch of the host. The position embedding covers 16 x 16 patches
#: (up to 256 px).
SD35_NAME = "tiny-sd35"
SD35_CONFIG = {
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "depth": 2,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "pos_embed_max_size": 16,
    "num_patches": 256,
    "qk_norm": "rms",
    "input_size": None,
    "pos_embed_scaling_factor": None,
}
#: The text encoders in an SD3 single-file checkpoint (``text_encoders.<name>.``) and their folders in Forge's bundled
#: ``stabilityai/stable-diffusion-3-medium-diffusers``: CLIP-L and CLIP-G with a text projection, and T5-XXL.
SD35_CLIPS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
SD35_VAE_PREFIX = "first_stage_model."
#: The dev transformer alone as GGUF files (as city96's Flux GGUFs are), one per quantization: Q8_0 (Forge requantizes
#: it when it merges a LoRA) and Q6_K, a K-quant (Forge applies LoRAs to it online only). 2-D weights whose rows
#: fill whole blocks are quantized; the rest (``img_in``, 64 wide) stays F16, vectors F32, as the converters do.
GGUF_QUANTS = ("Q8_0", "Q6_K")
#: The VAE and text encoders beside a GGUF transformer, each a file of its own in its usual key layout (Forge's
#: "VAE / Text Encoder" modules): (file stem, key prefix in the single-file checkpoint).
MODULES = (
    ("tiny-flux-ae", "vae."),
    ("tiny-flux-clip-l", "text_encoders.clip_l.transformer."),
    ("tiny-flux-t5xxl", "text_encoders.t5xxl.transformer."),
)
TRANSFORMER_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "vae."
#: Chroma's modulation network as Forge builds it for every Chroma file (``backend/loader.py``'s ``GuessChroma``): its
#: width and depth are fixed (its RMSNorms are built 5120 wide), its output is the transformer's width (a lazy linear)
#: and its MLPs' inner width is free (lazy linears): CHROMA_INNER.
CHROMA_GUIDANCE = {"guidance_hidden_dim": 5120, "guidance_n_layers": 5}
CHROMA_INNER = 64
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
    ("mfLoha", "loha", 5),
    ("mcA", "chroma", 6),
    ("mcB", "chroma", 7),
    ("msA", "sd35", 8),
    ("msB", "sd35", 9),
)
#: A LoRA file key's tensor name after its module's (kohya's, diffusers', LoHa's).
FACTOR = re.compile(r"\.(lora_(down|up|A|B)\.weight|alpha|hada_w[12]_[ab])$")
#: A text-encoder part's kohya prefix.
PARTS = {"te1": "lora_te1_", "te2": "lora_te2_"}


def host_modules(forge_dir: Path) -> dict[str, Any]:
    """Forge's Flux and Chroma transformers, T5, VAE and config reader (``tiny_model.forge_modules`` sets up its paths
    and CPU flag)."""
    from tiny_model import forge_modules

    vae = forge_modules(forge_dir)[1]
    from backend.nn.chroma import IntegratedChromaTransformer2DModel
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.t5 import IntegratedT5
    from backend.utils import read_arbitrary_config

    return {
        "flux": IntegratedFluxTransformer2DModel,
        "chroma": IntegratedChromaTransformer2DModel,
        "t5": IntegratedT5,
        "vae": vae,
        "read": read_arbitrary_config,
    }


def checkpoint_shapes(forge_dir: Path, chroma: bool = False) -> dict[str, tuple[int, ...]]:
    """Every key of the single-file checkpoint and its shape: Flux-dev's (its transformer, VAE, CLIP-L and T5) or,
    with ``chroma``, Chroma's (its transformer, the same VAE and T5). See the module docstring."""
    import torch
    from tiny_model import IntegratedCLIP, meta_shapes
    from transformers import CLIPTextConfig

    host = host_modules(forge_dir)
    repo = forge_dir / "backend" / "huggingface" / "black-forest-labs" / "FLUX.1-dev"
    clip_config = CLIPTextConfig.from_pretrained(str(repo / "text_encoder"))
    clip_config.intermediate_size = CLIP_MLP
    with torch.device("meta"):
        if chroma:
            transformer = host["chroma"](**FLUX_CONFIG, guidance_out_dim=FLUX_CONFIG["hidden_size"], **CHROMA_GUIDANCE)
        else:
            transformer = host["flux"](**FLUX_CONFIG, guidance_embed=True)
        parts = [
            (TRANSFORMER_PREFIX, transformer),
            (VAE_PREFIX, host["vae"].from_config(host["vae"].load_config(str(repo / "vae")))),
            (T5_PREFIX[: -len("transformer.")], host["t5"](host["read"](str(repo / "text_encoder_2")))),
        ]
        if not chroma:
            parts.insert(2, (CLIP_L_PREFIX[: -len("transformer.")], IntegratedCLIP(clip_config, False)))
    shapes = meta_shapes(tuple(parts))
    for key, shape in shapes.items():
        layer = key.split(".")[-2]
        if key.startswith(TRANSFORMER_PREFIX + "distilled_guidance_layer.layers.") and (
            key.endswith(".weight") or layer == "in_layer"
        ):  # the inner side of each MLP: in_layer's out (weight and bias), out_layer's in
            shapes[key] = narrowed(shape, 0 if layer == "in_layer" else 1, CHROMA_INNER)
    return t5_narrowed(shapes)


def sd35_shapes(forge_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every key of the tiny SD3.5 single-file checkpoint and its shape: the MMDiT (:data:`SD35_CONFIG`), the SD3 VAE
    (16 latent channels, full size), CLIP-L and CLIP-G at their widths with narrow MLPs (:data:`CLIP_MLP`; their
    attention must stay full: transformers splits it into the config's heads) and T5 as Flux's."""
    import torch
    from tiny_model import IntegratedCLIP, meta_shapes
    from transformers import CLIPTextConfig

    host = host_modules(forge_dir)
    from backend.nn.mmditx import MMDiTX

    repo = forge_dir / "backend" / "huggingface" / "stabilityai" / "stable-diffusion-3-medium-diffusers"
    with torch.device("meta"):
        parts = [
            (TRANSFORMER_PREFIX, MMDiTX(**SD35_CONFIG)),
            (SD35_VAE_PREFIX, host["vae"].from_config(host["vae"].load_config(str(repo / "vae")))),
        ]
        for name, folder in SD35_CLIPS.items():
            config = CLIPTextConfig.from_pretrained(str(repo / folder))
            config.intermediate_size = CLIP_MLP
            parts.append((f"text_encoders.{name}.", IntegratedCLIP(config, True)))
        parts.append((T5_PREFIX[: -len("transformer.")], host["t5"](host["read"](str(repo / "text_encoder_3")))))
    return t5_narrowed(meta_shapes(tuple(parts)))


def t5_narrowed(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``shapes`` with T5's linears :data:`T5_INNER` wide inside and without ``logit_scale`` (the CLIP wrapper's,
    which the loader ignores)."""
    out = {}
    for key, shape in shapes.items():
        layer = key.split(".")[-2]
        if key.endswith("logit_scale"):
            continue
        inner = key.startswith(T5_PREFIX) and layer in T5_INNER_AXIS
        out[key] = narrowed(shape, T5_INNER_AXIS[layer], T5_INNER) if inner else shape
    return out


def narrowed(shape: tuple[int, ...], axis: int, width: int) -> tuple[int, ...]:
    """``shape`` with dimension ``axis`` set to ``width`` (a lazy linear's inner side)."""
    return tuple(width if i == axis else n for i, n in enumerate(shape))


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


def kohya_targets(
    shapes: dict[str, tuple[int, ...]], blocks: tuple[str, ...] = ("double_blocks.", "single_blocks."), t5: bool = True
) -> list[tuple[str, tuple[int, ...], bool]]:
    """(kohya module name, weight shape, attention?) for a kohya-layout LoRA, which Forge maps 1:1 (``lora_unet_`` +
    the transformer's module path): every linear of the transformer's ``blocks`` (Flux's double and single blocks;
    SD3.5's ``joint_blocks.``), their attention ones marked; CLIP-L's (``lora_te1_``) and, with ``t5`` (sd-scripts'
    Flux LoRA), T5's (``lora_te2_``) self-attention linears."""
    targets = []
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        module = key[: -len(".weight")]
        if key.startswith(tuple(TRANSFORMER_PREFIX + block for block in blocks)):
            attention = "attn." in key  # Flux's img_attn/txt_attn, SD3's attn
            targets.append(("lora_unet_" + module[len(TRANSFORMER_PREFIX) :].replace(".", "_"), shape, attention))
        elif key.startswith(CLIP_L_PREFIX) and ".self_attn." in key:
            targets.append(("lora_te1_" + module[len(CLIP_L_PREFIX) :].replace(".", "_"), shape, True))
        elif t5 and key.startswith(T5_PREFIX) and ".SelfAttention." in key and "relative_attention_bias" not in key:
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


def q6_k(rows: Any) -> Any:
    """ggml's Q6_K blocks (210 bytes per 256 values: the low 4 and high 2 bits of each 6-bit level, one int8 scale per
    16 values, the block's fp16 scale) of a float32 matrix whose rows are multiples of 256 wide: gguf-py quantizes no
    K-quant, so this writes the plainest one, round to nearest, and checks it against Forge's own dequantizer."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    blocks = rows.reshape(-1, 16, 16).astype(np.float32)  # per block of 256: 16 scales of 16 values
    n = blocks.shape[0]
    sub = np.abs(blocks).max(-1) / 31
    d = (sub.max(-1, keepdims=True) / 127).astype(np.float16)
    step_d = np.where(d == 0, 1, d).astype(np.float32)
    scales = np.clip(np.round(sub / step_d), -128, 127).astype(np.int8)
    step = (d.astype(np.float32) * scales).reshape(-1, 1)
    levels = np.clip(np.round(blocks.reshape(-1, 16) / np.where(step == 0, 1, step)), -32, 31).astype(np.int16) + 32
    q = levels.astype(np.uint8).reshape(n, 2, 4, 32)  # per 128 values: four runs of 32
    low = (q & 0x0F).reshape(n, 2, 2, 2, 32)  # runs (0, 1) in the low nibbles, (2, 3) in the high ones
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql, qh.reshape(n, 64), scales.view(np.uint8), d.view(np.uint8)], axis=1)
    expected = (step * (levels.astype(np.float32) - 32)).reshape(rows.shape)
    assert np.array_equal(quants.dequantize(out, GGMLQuantizationType.Q6_K).reshape(rows.shape), expected)
    return out.reshape(rows.shape[0], -1)


def write_gguf(path: Path, transformer: dict[str, Any], quant: str) -> None:
    """The transformer's tensors (keys without a prefix) as a GGUF file of ``quant``, with Forge's own gguf writer
    (``packages_3rdparty/gguf``)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants

    qtype = GGMLQuantizationType[quant]
    block = GGML_QUANT_SIZES[qtype][0]
    writer = GGUFWriter(str(path), arch="flux")
    for key, tensor in transformer.items():
        data = tensor.float().numpy()
        if data.ndim == 2 and data.shape[1] % block == 0:
            packed = q6_k(data) if quant == "Q6_K" else quants.quantize(data, qtype)
            writer.add_tensor(key, packed, raw_dtype=qtype)
        else:
            writer.add_tensor(key, data.astype(np.float16 if data.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build(out_dir: Path, forge_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Write the checkpoints (dev, schnell, the dev transformer as GGUF), the VAE and text encoders as files of their
    own, the LoRAs and ``manifest.json`` under ``out_dir``; return the manifest."""
    import torch
    from safetensors.torch import save_file
    from tiny_model import RANK, lora_tensors

    ckpt_dir = out_dir / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    shapes = checkpoint_shapes(forge_dir)
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
    transformer = {k[len(TRANSFORMER_PREFIX) :]: v for k, v in state.items() if k.startswith(TRANSFORMER_PREFIX)}
    for quant in GGUF_QUANTS:
        checkpoints[f"{FLUX_NAME}-{quant}"] = ckpt_dir / f"{FLUX_NAME}-{quant}.gguf"
        write_gguf(checkpoints[f"{FLUX_NAME}-{quant}"], transformer, quant)
    modules = {}
    for stem, prefix in MODULES:
        modules[stem] = out_dir / "modules" / f"{stem}.safetensors"
        modules[stem].parent.mkdir(exist_ok=True)
        save_file({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, str(modules[stem]))
    del state, transformer
    chroma_shapes = checkpoint_shapes(forge_dir, chroma=True)
    checkpoints[CHROMA_NAME] = ckpt_dir / f"{CHROMA_NAME}.safetensors"
    save_file(random_state(chroma_shapes, seed), str(checkpoints[CHROMA_NAME]))
    sd35 = sd35_shapes(forge_dir)
    checkpoints[SD35_NAME] = ckpt_dir / f"{SD35_NAME}.safetensors"
    save_file(random_state(sd35, seed), str(checkpoints[SD35_NAME]))
    lora_dir = out_dir / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    targets = {
        "kohya": kohya_targets(shapes),
        "diffusers": diffusers_targets(shapes),
        "chroma": kohya_targets(chroma_shapes),
        "sd35": kohya_targets(sd35, ("joint_blocks.",), t5=False),
    }
    loras = {}
    for name, layout, offset in LORAS:
        generator = torch.Generator().manual_seed(seed * 1000 + 100 + offset)
        kind = "loha" if layout == "loha" else "lora"
        tensors = lora_tensors(
            kind, targets[layout if layout in ("diffusers", "chroma", "sd35") else "kohya"], generator
        )
        if layout in PARTS:
            tensors = {key: value for key, value in tensors.items() if key.startswith(PARTS[layout])}
        elif layout == "diffusers":
            tensors = diffusers_names(tensors)
        path = lora_dir / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"ss_network_dim": str(RANK)})
        patched = {FACTOR.sub("", key) for key in tensors}
        n_unet = sum(module.startswith(("lora_unet_", "transformer.")) for module in patched)
        loras[name] = {"path": str(path), "kind": layout, "n_unet": n_unet, "n_te": len(patched) - n_unet}
    manifest = {
        "modules": {stem: str(path) for stem, path in modules.items()},
        "ckpt": str(checkpoints[FLUX_NAME]),
        "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "lora_dir": str(lora_dir),
        "loras": loras,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


if __name__ == "__main__":
    from tiny_model import builder_cli

    builder_cli(__doc__, build)
