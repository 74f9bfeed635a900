"""The pass's delta of every kind of patch entry a Forge backend makes of Flux LoRAs, against the backend's own merge.

Run with the host's python (``test_patch_math.py`` does; the test process never imports a host): ``python
patch_math.py forge|reforge HOST_DIR``. No server: the host's LoRA loader (``load_lora``), its Flux key map
(``flux_to_diffusers``, the ``transformer.`` prefix as ``model_lora_keys_unet`` adds it, and the generic
``diffusion_model.<path>`` and kohya ``lora_unet_`` keys), its patcher's ``add_patches`` and its merge
(``merge_lora_to_weight``, ``calculate_weight``) on a model with a Flux block's layer names at a small width, and
LoRA files in both layouts: diffusers (separate ``to_q``/``to_k``/``to_v`` and ``proj_mlp``, so offset entries into
the fused ``qkv``/``linear1``, and ``norm_out.linear``, the ``swap_scale_shift`` entry; no alpha), kohya (fused keys,
alpha), one at ``strength_model`` 0.5, one with DoRA, and a conv LoRA. Per layer and LoRA it prints one JSON line:
the delta's type, its spans and how many numbers its factors hold (plain low rank), and the largest difference
between the hooked layer's output and the layer with the host's merged weight, relative to that output's largest
value; and per layer the same for every plain LoRA merged and each one run alone by the complements (Switch and
Composite's hooks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

HIDDEN, RANK = 8, 4
ROOT = Path(__file__).resolve().parents[2]


def host_modules(host: str, host_dir: str) -> tuple:
    """The host's loader, Flux key map, patcher class and backend (:class:`PatcherHost`), imported as the webui
    imports them (its checkout on ``sys.path``, CPU-only arguments)."""
    sys.path[:0] = [host_dir, str(ROOT)]
    sys.argv = [sys.argv[0], "--always-cpu"]
    if host == "forge":
        sys.path.insert(1, str(Path(host_dir) / "packages_3rdparty"))
        from backend.patcher.base import ModelPatcher
        from backend.patcher.lora import load_lora
        from packages_3rdparty.comfyui_lora_collection.utils import flux_to_diffusers

        from lib_multilora.hosts.forge import ForgeHost

        return load_lora, flux_to_diffusers, ModelPatcher, ForgeHost()
    import ldm_patched.modules.options

    ldm_patched.modules.options.enable_args_parsing()
    from ldm_patched.modules.lora import load_lora
    from ldm_patched.modules.model_patcher import ModelPatcher
    from ldm_patched.modules.utils import flux_to_diffusers

    from lib_multilora.hosts.reforge import ReforgeHost

    return load_lora, flux_to_diffusers, ModelPatcher, ReforgeHost()


def flux_model() -> nn.Module:
    """One double and one single block's layers under their ldm names, the final modulation, and a conv."""
    h = HIDDEN
    layers = {
        "double_blocks.0.img_attn.qkv": nn.Linear(h, 3 * h),
        "double_blocks.0.txt_attn.qkv": nn.Linear(h, 3 * h),
        "double_blocks.0.img_attn.proj": nn.Linear(h, h),
        "double_blocks.0.img_mlp.0": nn.Linear(h, 4 * h),
        "single_blocks.0.linear1": nn.Linear(h, 7 * h),
        "single_blocks.0.linear2": nn.Linear(5 * h, h),
        "final_layer.adaLN_modulation.1": nn.Linear(h, 2 * h),
        "conv": nn.Conv2d(4, h, 3, padding=1),
    }
    root = nn.Module()
    root.diffusion_model = nn.Module()
    for path, layer in layers.items():
        parent = root.diffusion_model
        *parents, name = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name, layer)
    return root


def key_map(model: nn.Module, flux_to_diffusers: object) -> dict:
    """LoRA key -> model key as the hosts' ``model_lora_keys_unet`` builds it for Flux."""
    out: dict = {}
    for key in model.state_dict():
        if key.endswith(".weight"):
            out[f"lora_unet_{key[len('diffusion_model.') : -len('.weight')].replace('.', '_')}"] = key
            out[key[: -len(".weight")]] = key
    config = {"depth": 1, "depth_single_blocks": 1, "hidden_size": HIDDEN}
    for key, to in flux_to_diffusers(config, output_prefix="diffusion_model.").items():
        if key.endswith(".weight"):
            out[f"transformer.{key[: -len('.weight')]}"] = to
    return out


def factors(prefix: str, d_in: int, d_out: int, g: torch.Generator, layout: str, alpha: float | None = None) -> dict:
    up, down = torch.randn(d_out, RANK, generator=g), torch.randn(RANK, d_in, generator=g)
    names = ("lora_B", "lora_A") if layout == "diffusers" else ("lora_up", "lora_down")
    out = {f"{prefix}.{names[0]}.weight": up * 0.3, f"{prefix}.{names[1]}.weight": down * 0.3}
    if alpha is not None:
        out[f"{prefix}.alpha"] = torch.tensor(alpha)
    return out


def lora_files(g: torch.Generator) -> dict[str, tuple[dict, float]]:
    """name -> (state dict, strength_model)."""
    h = HIDDEN
    diffusers: dict = {}
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"):
        diffusers |= factors(f"transformer.transformer_blocks.0.attn.{name}", h, h, g, "diffusers")
    diffusers |= factors("transformer.transformer_blocks.0.ff.net.0.proj", h, 4 * h, g, "diffusers")
    for name in ("to_q", "to_k", "to_v"):
        diffusers |= factors(f"transformer.single_transformer_blocks.0.attn.{name}", h, h, g, "diffusers")
    diffusers |= factors("transformer.single_transformer_blocks.0.proj_mlp", h, 4 * h, g, "diffusers")
    diffusers |= factors("transformer.single_transformer_blocks.0.proj_out", 5 * h, h, g, "diffusers")
    diffusers |= factors("transformer.norm_out.linear", h, 2 * h, g, "diffusers")
    kohya: dict = {}
    for path, d_in, d_out in (
        ("double_blocks_0_img_attn_qkv", h, 3 * h),
        ("single_blocks_0_linear1", h, 7 * h),
        ("final_layer_adaLN_modulation_1", h, 2 * h),
    ):
        kohya |= factors(f"lora_unet_{path}", d_in, d_out, g, "kohya", alpha=2.0)
    conv = {
        "diffusion_model.conv.lora_up.weight": torch.randn(h, RANK, 1, 1, generator=g) * 0.3,
        "diffusion_model.conv.lora_down.weight": torch.randn(RANK, 4, 3, 3, generator=g) * 0.3,
        "diffusion_model.conv.alpha": torch.tensor(1.0),
    }
    dora = factors("transformer.single_transformer_blocks.0.proj_out", 5 * h, h, g, "diffusers", alpha=2.0)
    dora["transformer.single_transformer_blocks.0.proj_out.dora_scale"] = torch.rand(h, 1, generator=g) + 0.5
    scaled = factors("transformer.transformer_blocks.0.attn.to_k", h, h, g, "diffusers")
    return {"diffusers": (diffusers, 1.0), "kohya": (kohya, 1.0), "conv": (conv, 1.0), "dora": (dora, 1.0),
            "strength_model": (scaled, 0.5)}  # fmt: skip


def patched(model: nn.Module, host: str, loaded: dict, patcher_class: type, load_lora: object) -> dict:
    """Per model key, per file: the entries the host's patcher holds after adding each file's patches."""
    per_file = {}
    for name, (patches, strength_model) in loaded.items():
        patcher = patcher_class(model, torch.device("cpu"), torch.device("cpu"))
        if host == "forge":
            patcher.add_patches(filename=name, patches=patches, strength_patch=0.8, strength_model=strength_model)
            per_file[name] = next(iter(patcher.lora_patches.values()))
        else:
            patcher.add_patches(patches, 0.8, strength_model)
            per_file[name] = patcher.patches
    out: dict = {}
    for name, entries in per_file.items():
        for key, e in entries.items():
            out.setdefault(key, {})[name] = list(e)
    return out


def run(
    module: nn.Module, weight: torch.Tensor | None, x: torch.Tensor, engine: object = None, k: int = 0
) -> torch.Tensor:
    """The layer's output for ``x`` with ``weight`` in place of its own, or with the engine's LoRA ``k`` active."""
    original = module.weight.data
    if weight is not None:
        module.weight.data = weight
    try:
        if engine is None:
            return module(x)
        engine.install()
        with engine.active([(k, 0, None)]):
            return module(x)
    finally:
        module.weight.data = original
        if engine is not None:
            engine.remove()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    host, host_dir = sys.argv[1], sys.argv[2]
    load_lora, flux_to_diffusers, patcher_class, backend = host_modules(host, host_dir)
    from lib_multilora.engine import HookEngine, LowRank, build_engine

    g = torch.Generator().manual_seed(0)
    model = flux_model()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    keys = key_map(model, flux_to_diffusers)
    loaded = {}
    for name, (sd, strength_model) in lora_files(g).items():
        patches = load_lora(sd, keys)
        patches = patches[0] if isinstance(patches, tuple) else patches  # Forge: (patches, remaining)
        loaded[name] = (patches, strength_model)
    for key, files in sorted(patched(model, host, loaded, patcher_class, load_lora).items()):
        path, attribute = key.rsplit(".", 1)
        module = model.get_submodule(path)
        x = (
            torch.randn(2, 4, 5, 5, generator=g)
            if isinstance(module, nn.Conv2d)
            else torch.randn(3, module.in_features, generator=g)
        )
        weight = module.weight.detach().float()
        deltas = {}
        with torch.no_grad():
            for k, (name, entries) in enumerate(files.items()):
                delta = backend.make_delta(module, {attribute: (key, entries)})
                deltas[k] = delta
                engine = HookEngine()
                engine.add(module, 0, delta)
                expected = run(module, backend.merged(entries, weight.clone(), key), x)
                parts = (getattr(delta, "parts", None) or [delta]) if isinstance(delta, LowRank) else []
                record = {
                    "key": key,
                    "file": name,
                    "delta": type(delta).__name__,
                    "spans": [p.span for p in parts] or None,
                    "stored": sum(p.down.numel() + p.up.numel() for p in parts),
                    "offsets": [e[3] for e in entries],
                    "functions": [getattr(e[4], "__name__", None) for e in entries],
                    "diff": relative(run(module, None, x, engine), expected),
                }
                print(json.dumps(record), flush=True)
            plain = {k: d for k, d in deltas.items() if isinstance(d, LowRank)}
            if len(plain) > 1:  # every plain LoRA merged in the host's order, each run alone by its complement
                names = [name for k, name in enumerate(files) if k in plain]
                all_entries = [e for name in names for e in files[name]]
                merged = backend.merged(all_entries, weight.clone(), key)
                engine = build_engine({module: dict(enumerate(plain.values()))}, len(plain), True, stack=False)
                for k, name in enumerate(names):
                    alone = run(module, backend.merged(files[name], weight.clone(), key), x)
                    diff = relative(run(module, merged, x, engine, k), alone)
                    print(json.dumps({"key": key, "file": name, "complement_of": names, "diff": diff}), flush=True)


if __name__ == "__main__":
    main()
