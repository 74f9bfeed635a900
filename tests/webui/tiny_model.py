"""Deterministic random-weight SD1-architecture checkpoints for the real-webui test tier.

The webui must load these exactly like a downloaded SD1 checkpoint, so the state dict keys are taken from the very
classes the webui instantiates (ldm's ``UNetModel``/``Encoder``/``Decoder`` from the webui's
``repositories/stable-diffusion-stability-ai`` and transformers' ``CLIPTextModel``), built on the ``meta`` device
(shapes only, instant even for SD1.5 size) and then filled with seeded random values.  The ldm config written next to
the checkpoint (``<name>.yaml``, which the webui prefers over its own guess) is derived from the webui's
``configs/v1-inference.yaml``; its text encoder ``version`` points at a local folder holding a CLIP text config and
real CLIP tokenizer files, so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import importlib.util
import io
import json
import math
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TINY_NAME = "tiny-sd1"
SD15_NAME = "sd15-random"

#: Shrunk UNet: SD1's block structure (4 levels, 2 res blocks, attention on the first 3 levels, depth 1) so that
#: diffusers-style LoRA names convert exactly as they do for SD1, with small channels.  UNet GroupNorms use 32 groups,
#: so every channel count (including skip concatenations) must be a multiple of 32.
TINY_UNET: dict[str, Any] = {
    "model_channels": 32,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 2,
    "transformer_depth": 1,
    "context_dim": 64,
}

#: Shrunk VAE: still 4 levels (downsamples by 8); ldm's VAE GroupNorm also uses 32 groups.
TINY_VAE: dict[str, Any] = {"ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1}

#: Tiny CLIP text encoder: real vocabulary size and context length (the webui's prompt chunking relies on both).
TINY_CLIP: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 64,
}

#: CLIP ViT-L/14 text encoder, as used by SD1.x.
CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
}

SKIP_REASON = "SD_WEBUI_DIR is not set: real-webui tier skipped"


def resolve_webui_dir(webui_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the webui checkout to take configs and ldm from (argument, else ``$SD_WEBUI_DIR``)."""
    value = webui_dir if webui_dir is not None else os.environ.get("SD_WEBUI_DIR")
    if not value:
        raise RuntimeError(SKIP_REASON)
    path = Path(value).resolve()
    if not (path / "configs" / "v1-inference.yaml").is_file():
        raise RuntimeError(f"{path} does not look like an AUTOMATIC1111 webui checkout (no configs/v1-inference.yaml)")
    return path


@contextlib.contextmanager
def _repository_on_path(repo: Path) -> Iterator[None]:
    """Make one of the webui's ``repositories/`` importable for the block; its modules print chatter on import and
    instantiation, which is muted."""
    added = str(repo) not in sys.path
    if added:
        sys.path.insert(0, str(repo))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        if added:
            sys.path.remove(str(repo))


def _ldm_on_path(webui_dir: Path) -> contextlib.AbstractContextManager[None]:
    """The webui's ldm (stable-diffusion-stability-ai), importable for the block."""
    repo = webui_dir / "repositories" / "stable-diffusion-stability-ai"
    if not (repo / "ldm").is_dir():
        raise RuntimeError(f"{repo} is missing: the webui's repositories/ must be populated")
    return _repository_on_path(repo)


# --------------------------------------------------------------------------------------------------------------------
# CLIP tokenizer files
# --------------------------------------------------------------------------------------------------------------------


def _bpe_vocab_path() -> Path:
    """open-clip-torch ships the CLIP BPE merges; it is a webui requirement, so it is always present with the webui."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip (open-clip-torch) is not importable: it provides bpe_simple_vocab_16e6.txt.gz")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"{path} not found")
    return path


def write_clip_tokenizer(folder: Path) -> None:
    """Write vocab.json/merges.txt/tokenizer configs equal to openai/clip-vit-large-patch14's tokenizer.

    The vocabulary is built the way CLIP builds it: 256 byte symbols, the same with ``</w>``, one token per merge, then
    the two special tokens (49408 in all); merges.txt is the BPE file's merge list under a ``#version`` header, which
    is the line CLIPTokenizer skips.
    """
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    with gzip.open(_bpe_vocab_path()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    if len(vocab) != 49408:
        raise RuntimeError(f"unexpected CLIP vocabulary size {len(vocab)}")

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    tokenizer_config = {
        **special,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")


def write_clip_folder(folder: Path, clip: dict[str, Any]) -> Any:
    """Write a local ``FrozenCLIPEmbedder(version=folder)`` source: text config + tokenizer; return the config."""
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **clip,
    )
    config.architectures = ["CLIPTextModel"]
    config.save_pretrained(folder)
    write_clip_tokenizer(folder)
    return config


# --------------------------------------------------------------------------------------------------------------------
# config + state dict
# --------------------------------------------------------------------------------------------------------------------


def _load_v1_config(webui_dir: Path) -> dict[str, Any]:
    import yaml

    with open(webui_dir / "configs" / "v1-inference.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def make_config(
    webui_dir: Path, clip_folder: Path, unet: dict[str, Any] | None = None, vae: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The webui's v1-inference config with optional UNet/VAE overrides and a local text encoder folder."""
    config = copy.deepcopy(_load_v1_config(webui_dir))
    params = config["model"]["params"]
    params["unet_config"]["params"].update(unet or {})
    params["first_stage_config"]["params"]["ddconfig"].update(vae or {})
    params["cond_stage_config"]["params"] = {"version": str(clip_folder.resolve())}
    return config


def _shape_state_dict(webui_dir: Path, config: dict[str, Any], clip_config: Any) -> dict[str, torch.Tensor]:
    """Instantiate the model parts on the meta device and return their state dicts under the ldm checkpoint prefixes."""
    from transformers import CLIPTextModel

    params = config["model"]["params"]
    ddconfig = params["first_stage_config"]["params"]["ddconfig"]
    embed_dim = params["first_stage_config"]["params"]["embed_dim"]
    with _ldm_on_path(webui_dir), torch.device("meta"):
        from ldm.modules.diffusionmodules.model import Decoder, Encoder
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        unet = UNetModel(**params["unet_config"]["params"])
        vae = torch.nn.ModuleDict(
            {
                "encoder": Encoder(**ddconfig),
                "decoder": Decoder(**ddconfig),
                "quant_conv": torch.nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1),
                "post_quant_conv": torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1),
            }
        )
        text = CLIPTextModel(clip_config)

    sd: dict[str, torch.Tensor] = {}
    for prefix, module in (
        ("model.diffusion_model.", unet),
        ("first_stage_model.", vae),
        ("cond_stage_model.transformer.", text),
    ):
        for key, value in module.state_dict().items():
            sd[prefix + key] = value
    # Real SD1 checkpoints carry CLIP's position_ids whether or not this transformers version persists the buffer.
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.empty(1, 77, dtype=torch.int64)
    return sd


def _random_value(key: str, meta: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded per-key values (adding a key never shifts the others); nothing is left at zero.

    ldm zero-initialises the UNet's output layers, and zero LayerNorm biases make emphasised prompts produce NaNs,
    so weights get fan-in scaled normals, norm scales 1 + noise and biases small noise.
    """
    if key.endswith("position_ids"):
        return torch.arange(meta.shape[-1], dtype=torch.int64).reshape(meta.shape)
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()) * 7919 + seed)
    shape = tuple(meta.shape)
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    if key.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.05 * torch.randn(shape, generator=g)


def random_state_dict(
    webui_dir: Path, config: dict[str, Any], clip_config: Any, seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Full checkpoint state dict with deterministic random values."""
    out: dict[str, torch.Tensor] = {}
    for key, meta in _shape_state_dict(webui_dir, config, clip_config).items():
        value = _random_value(key, meta, seed)
        out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


def _write_checkpoint(
    out_dir: Path, name: str, webui_dir: Path, config: dict[str, Any], clip_config: Any, seed: int, dtype: torch.dtype
) -> Path:
    import yaml
    from safetensors.torch import save_file

    sd = random_state_dict(webui_dir, config, clip_config, seed, dtype)
    ckpt = out_dir / f"{name}.safetensors"
    save_file(sd, str(ckpt), metadata={"format": "pt", "multilora_test_seed": str(seed)})
    with open(out_dir / f"{name}.yaml", "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    return ckpt


def build_tiny_sd1(dir: Path, seed: int = 0, webui_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``tiny-sd1.safetensors`` + ``tiny-sd1.yaml`` + ``tiny-clip/`` into ``dir``; return the checkpoint path.

    Loads in a second on CPU and makes a 64x64 image in well under a second, yet has SD1's layer naming.
    """
    webui = resolve_webui_dir(webui_dir)
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    clip_folder = dir / "tiny-clip"
    clip_config = write_clip_folder(clip_folder, TINY_CLIP)
    config = make_config(webui, clip_folder, TINY_UNET, TINY_VAE)
    return _write_checkpoint(dir, TINY_NAME, webui, config, clip_config, seed, torch.float32)


def build_sd15_random(dir: Path, seed: int = 0, webui_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write an SD1.5-size random model (fp16 on disk, ~2 GB) for benchmarks; never used by the tests."""
    webui = resolve_webui_dir(webui_dir)
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    clip_folder = dir / "clip-l"
    clip_config = write_clip_folder(clip_folder, CLIP_L)
    config = make_config(webui, clip_folder)
    return _write_checkpoint(dir, SD15_NAME, webui, config, clip_config, seed, torch.float16)


def main(argv: list[str] | None = None) -> int:
    """CLI for building the benchmark model by hand: ``python tiny_model.py OUT_DIR [--sd15] [--seed N]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sd15", action="store_true", help="build the SD1.5-size model instead of the tiny one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--webui-dir", default=None, help="webui checkout (default: $SD_WEBUI_DIR)")
    args = parser.parse_args(argv)
    build = build_sd15_random if args.sd15 else build_tiny_sd1
    print(build(args.out_dir, seed=args.seed, webui_dir=args.webui_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --------------------------------------------------------------------------------------------------------------------
# SDXL
# --------------------------------------------------------------------------------------------------------------------

SDXL_NAME = "tiny-sdxl"

#: Shrunk SDXL UNet: SDXL's 3 levels, attention on the last two only, linear proj_in/proj_out and a transformer depth
#: that grows with the level (SDXL: 1, 2, 10), so kohya's sgm-style LoRA names (input_blocks_4_1_..., output_blocks_0_1_
#: ..., transformer_blocks_1_...) exist exactly as they do on SDXL.  Channels are multiples of 32 (GroupNorm groups).
TINY_SDXL_UNET: dict[str, Any] = {
    "model_channels": 32,
    "num_head_channels": 32,
    "transformer_depth": [1, 1, 2],
}

#: The OpenCLIP text tower (SDXL's second text encoder) is built by open_clip from an architecture name; only names in
#: open_clip's bundled model_configs/ are accepted, and this is the smallest text tower among them (10 layers, width
#: 256: ~21M parameters instead of bigG's ~700M).
TINY_SDXL_OPENCLIP_ARCH = "ViT-S-32-alt"


def _sdxl_base_config_path(webui_dir: Path) -> Path:
    """webui 1.10 takes SDXL's config from the generative-models repository (modules/sd_models_config.py)."""
    path = webui_dir / "repositories" / "generative-models" / "configs" / "inference" / "sd_xl_base.yaml"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: the webui's repositories/generative-models must be populated")
    return path


def _sgm_on_path(webui_dir: Path) -> contextlib.AbstractContextManager[None]:
    """The webui's sgm (generative-models), importable for the block."""
    return _repository_on_path(_sdxl_base_config_path(webui_dir).parents[2])


def _openclip_text_dims(arch: str) -> tuple[int, int]:
    """(text width, pooled size) of an open_clip architecture: the cross-attention and vector contributions."""
    import open_clip

    config = open_clip.get_model_config(arch)
    if config is None:
        raise RuntimeError(f"open_clip has no model config named {arch!r}")
    return int(config["text_cfg"]["width"]), int(config["embed_dim"])


def make_sdxl_config(
    webui_dir: Path,
    clip_folder: Path,
    clip: dict[str, Any],
    unet: dict[str, Any] | None = None,
    vae: dict[str, Any] | None = None,
    openclip_arch: str = TINY_SDXL_OPENCLIP_ARCH,
) -> dict[str, Any]:
    """The webui's sd_xl_base config, shrunk: the UNet's context/vector sizes follow the two text encoders.

    context_dim is the concatenation of both encoders' hidden states; adm_in_channels is the pooled OpenCLIP output
    plus every ConcatTimestepEmbedderND's output (outdim per element of a 2-element size/crop tuple).
    """
    import yaml

    with open(_sdxl_base_config_path(webui_dir), encoding="utf-8") as fh:
        config = yaml.safe_load(fh)
    params = config["model"]["params"]
    embedders = params["conditioner_config"]["params"]["emb_models"]
    clip_l, open_clip_g = embedders[0], embedders[1]
    targets = (clip_l["target"].rsplit(".", 1)[-1], open_clip_g["target"].rsplit(".", 1)[-1])
    if targets != ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2"):
        raise RuntimeError(f"unexpected sd_xl_base.yaml: text embedders {targets}")
    # CLIP-L from a local folder; "hidden" at the penultimate layer, as SDXL (layer_idx 11 of 12)
    clip_l["params"].update({"version": str(clip_folder.resolve()), "layer_idx": clip["num_hidden_layers"] - 1})
    # no pretrained tag: nothing to download even outside the webui's DisableInitialization
    open_clip_g["params"].update({"arch": openclip_arch, "version": None})
    width, pooled = _openclip_text_dims(openclip_arch)
    vector = pooled + sum(
        2 * int(e["params"]["outdim"]) for e in embedders if e["target"].endswith(".ConcatTimestepEmbedderND")
    )
    network = params["network_config"]["params"]
    network.update(unet or {})
    network.update({"context_dim": clip["hidden_size"] + width, "adm_in_channels": vector})
    params["first_stage_config"]["params"]["ddconfig"].update(vae or {})
    return config


def _sdxl_shape_state_dict(webui_dir: Path, config: dict[str, Any], clip_config: Any) -> dict[str, torch.Tensor]:
    """Instantiate the SDXL parts with sgm/open_clip/transformers on the meta device; sgm checkpoint prefixes."""
    import open_clip
    from transformers import CLIPTextModel

    params = config["model"]["params"]
    arch = params["conditioner_config"]["params"]["emb_models"][1]["params"]["arch"]
    with _sgm_on_path(webui_dir), torch.device("meta"):
        from sgm.util import instantiate_from_config

        unet = instantiate_from_config(params["network_config"])
        vae = instantiate_from_config(params["first_stage_config"])
        clip_l = CLIPTextModel(clip_config)
        clip_g = open_clip.create_model(arch, pretrained=None, device=torch.device("meta"))
    del clip_g.visual  # as FrozenOpenCLIPEmbedder2 does: checkpoints hold the text tower only

    sd: dict[str, torch.Tensor] = {}
    for prefix, module in (
        ("model.diffusion_model.", unet),
        ("first_stage_model.", vae),
        ("conditioner.embedders.0.transformer.", clip_l),
        ("conditioner.embedders.1.model.", clip_g),
    ):
        for key, value in module.state_dict().items():
            sd[prefix + key] = value
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.empty(1, 77, dtype=torch.int64)
    return sd


def _tame_openclip_residuals(sd: dict[str, torch.Tensor]) -> None:
    """Scale the OpenCLIP tower's residual-branch outputs by 1/sqrt(2 * layers) (GPT-2's init rule), in place.

    SDXL feeds the penultimate hidden state to cross-attention without a final LayerNorm. With plain fan-in init the
    residual stream of the 10-layer random tower grows to std ~3.4, which makes the random UNet chaotic: float
    rounding (batched vs sequential Composite) then grows into visible pixel differences over the steps.
    """
    prefix = "conditioner.embedders.1.model.transformer.resblocks."
    suffixes = (".attn.out_proj.weight", ".mlp.c_proj.weight")
    branch_outputs = [k for k in sd if k.startswith(prefix) and k.endswith(suffixes)]
    n_layers = len({k[len(prefix) :].split(".", 1)[0] for k in branch_outputs})
    for key in branch_outputs:
        sd[key] = sd[key] / math.sqrt(2 * n_layers)


def build_tiny_sdxl(dir: Path, seed: int = 0, webui_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``tiny-sdxl.safetensors`` + ``tiny-sdxl.yaml`` + ``tiny-sdxl-clip-l/`` into ``dir``; return the checkpoint.

    An SDXL-architecture model in the original sgm key layout, so the webui loads it as SDXL (``is_sdxl``, both text
    encoders, size/crop vector conditioning) and the built-in Lora extension names its layers as on SDXL, yet it is
    ~35M parameters and makes a 64x64 image in about a second on a CPU.
    """
    import yaml
    from safetensors.torch import save_file

    webui = resolve_webui_dir(webui_dir)
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    clip_folder = dir / f"{SDXL_NAME}-clip-l"
    clip_config = write_clip_folder(clip_folder, TINY_CLIP)
    config = make_sdxl_config(webui, clip_folder, TINY_CLIP, TINY_SDXL_UNET, TINY_VAE)
    shapes = _sdxl_shape_state_dict(webui, config, clip_config)
    sd = {key: _random_value(key, meta, seed) for key, meta in shapes.items()}
    _tame_openclip_residuals(sd)
    ckpt = dir / f"{SDXL_NAME}.safetensors"
    save_file(sd, str(ckpt), metadata={"format": "pt", "multilora_test_seed": str(seed)})
    with open(dir / f"{SDXL_NAME}.yaml", "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    return ckpt
