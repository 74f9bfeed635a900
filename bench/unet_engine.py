"""Merge vs Switch vs Composite on a real diffusers UNet (SD1.5, SDXL), driven by this project's engine as the host
drives it, with every output checked against merged-weight references before anything is timed.

``bench/engine_micro.py`` times the hooked layers alone; this runs whole UNets, so attention, convolutions and the
per-call overhead of the hooks are all in the ratios. The UNets are diffusers' ``UNet2DConditionModel`` built from the
standard SD1.5 / SDXL configs below with seeded random weights (nothing is downloaded). N rank-16 kohya-style LoRAs
touch the layers kohya trains (every Linear and 1x1 Conv2d inside a ``Transformer2DModel``: proj_in/proj_out,
attention to_q/k/v/to_out.0, feed-forward net.0.proj/net.2) and are merged into the weights as the webui does
(``W += scale * up @ down``). The engine is built as ``lib_multilora.engine.build_engine`` builds it for plain LoRAs
(``keep_merged=True``: the weights keep all N, LoRA k's hooks subtract the others) and run through
``lib_multilora.inner.MethodInner`` around an inner model that calls the UNet the way the webui's denoiser calls its
inner model (x batch first, cond+uncond rows).

Flux (``--model flux,flux-fused``): diffusers' ``FluxTransformer2DModel`` at FLUX.1-dev's full width (3072, 24 heads of
128), ``--flux-blocks`` double and single blocks (2 and 2 by default), guidance embedding, one row per call (CFG 1),
64 T5 tokens and a 256x256 image's 256 latent tokens on a CPU (1024x1024's 4096 on a GPU), rank-16
diffusers-format LoRAs on every Linear, to_q/to_k/to_v included. ``flux`` keeps those projections separate, as
diffusers does; ``flux-fused`` fuses each attention's q/k/v (and the text stream's) into one layer, as Forge and
reForge store Flux (``qkv``), so that each projection's LoRA is a span of the fused layer, what Forge's offset entries
become (``LowRankParts``); the LoRAs are the same numbers in both. No window or Spatial case there (Spatial's patches
are an image latent's).

Checks, before timing, per model and N (exit status 1 if any fails, so a fast wrong path cannot pass): Switch on
LoRA k equals the UNet with only LoRA k merged, for every k; Composite sequential and both batched variants equal the
mean of those references; batched equals sequential. Errors are relative to the reference's norm; the tolerance is
1e-4 in fp32 (correct paths differ by ~1e-6), 1e-2 in fp16 (they differ by ~2e-3: sd15 and the tiny models in fp16
on a CPU) and 1.5e-2 in bf16 (~7e-3: the tiny Flux on a CPU); and the references must differ from one another and
from Merge by over 5x the tolerance (they differ by 0.1-0.2), or the LoRAs would be too weak for the check to mean
anything.

Timed, interleaved with a rotating order, after one untimed round that also measures memory, medians of
``--repeats`` rounds: Merge (one call, no hooks), Switch (one call with one LoRA's complement hooks), Composite
sequential (N calls), Composite batched (one call on N x rows) with stacked and unstacked deltas. Memory per case:
the model's parameters, what the case's engine holds beyond the LoRAs' own factors (stacked complements, scaled
copies) and the call's peak above what was resident before it, against Merge's peak plus the LoRAs' factors
(``*_peak_over_merge_plus_factors``, target <= 1.05). On CUDA: CUDA
events, peak memory from ``torch.cuda.max_memory_allocated`` above what was allocated before the call. On a CPU: one
torch thread and its CPU time (hardly moved by other load), peak resident memory above the resident memory before the
call (VmHWM reset through /proc/self/clear_refs, freed heap given back with ``malloc_trim`` first; n/a where Linux's
/proc or glibc is missing). The host runs batched Composite stacked on CUDA and unstacked on a CPU; ``batched_*``
ratios use that variant. Prints a table per model and N, then, last, one JSON line.

    python bench/unet_engine.py                        # CPU: SD1.5 at 64x64, N = 2, 3, 5
    python bench/unet_engine.py --size 128 --n 2,3     # the CPU figures in the README
    python bench/unet_engine.py --model tiny,tiny-xl --n 2 --repeats 1   # seconds: the unit test's run
    python bench/unet_engine.py --model flux,flux-fused --n 2,3             # the README's Flux figures, ~17 min

GPU (fp16, SD1.5 at 512x512 and SDXL at 1024x1024, cond+uncond batch, N = 2, 3, 5; not run yet, no GPU was lent when
this was written; estimated 2-3 minutes on an H200 after the imports, cut off at 9). The device machine has torch and
diffusers' other needs but not diffusers: ``pip download --no-deps -d .whl diffusers==0.42.1`` here first (``.whl``
ignored in .git/info/exclude), carry ``.whl`` and run:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site &&
    PYTHONUNBUFFERED=1 timeout 540 python3 bench/unet_engine.py --device cuda --model sd15,sdxl --n 2,3,5 \
        --repeats 7 2>&1 | tee $OUT/unet_engine.log

Flux on a GPU, the whole FLUX.1-dev transformer (19 + 38 blocks, 12 B parameters: 24 GB in bf16, twice that with the
benchmark's copy of the weights for its references; an H200, nvidia-h200) at 1024x1024, N = 2, 3:

    PYTHONUNBUFFERED=1 timeout 540 python3 bench/unet_engine.py --device cuda --dtype bf16 --model flux,flux-fused \
        --flux-blocks 19,38 --n 2,3 --repeats 7 2>&1 | tee $OUT/unet_engine_flux.log
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, Transformer2DModel, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib_multilora.engine import HookEngine, LowRankDelta, LowRankParts, build_engine, low_rank_sum
from lib_multilora.inner import MethodInner, composite_mean
from lib_multilora.spatial import PATCH, TEMPERATURE, Spatial, spatial_mix

CONTEXT_TOKENS = 77
SD15_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD15_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
XL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
XL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class Model:
    """A UNet config and what its inputs look like; ``pooled`` is SDXL's pooled text embedding width (None: SD1).
    ``flux``: a ``FluxTransformer2DModel`` config instead, ``fused`` with its q/k/v projections fused as Forge and
    reForge store them (``qkv``), each LoRA's to_q/to_k/to_v then a span of the fused layer (Forge's offset entries);
    ``text`` its text tokens; one row per call (Flux-dev's distilled guidance runs at CFG 1, no uncond)."""

    config: dict[str, Any]
    gpu_size: int
    cpu_size: int
    pooled: int | None = None
    flux: bool = False
    fused: bool = False
    text: int = CONTEXT_TOKENS


MODELS = {
    # runwayml/stable-diffusion-v1-5 unet/config.json (the rest are diffusers' defaults, equal to that file).
    "sd15": Model(
        dict(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=SD15_DOWN,
            up_block_types=SD15_UP,
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        gpu_size=512,
        cpu_size=64,
    ),
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json.
    "sdxl": Model(
        dict(
            block_out_channels=(320, 640, 1280),
            down_block_types=XL_DOWN,
            up_block_types=XL_UP,
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=1280 + 6 * 256,
        ),
        gpu_size=1024,
        cpu_size=64,
        pooled=1280,
    ),
    # The same block structures, small enough for a unit test on a CPU in seconds.
    "tiny": Model(
        dict(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
        ),
        gpu_size=64,
        cpu_size=64,
    ),
    "tiny-xl": Model(
        dict(
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            cross_attention_dim=32,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        ),
        gpu_size=64,
        cpu_size=64,
        pooled=32,
    ),
}
#: black-forest-labs/FLUX.1-dev transformer/config.json at its full width (24 heads of 128), with 2 double-stream and
#: 2 single-stream blocks of its 19 + 38 on a CPU (``--flux-blocks 19,38`` on a GPU for the whole model).
FLUX = dict(
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    in_channels=64,
    axes_dims_rope=(16, 56, 56),
)
TINY_FLUX = dict(FLUX, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2)
TINY_FLUX.update(joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
for _name, _config, _gpu, _cpu, _text in (("flux", FLUX, 1024, 256, 64), ("tiny-flux", TINY_FLUX, 64, 64, 8)):
    for _fused in (False, True):
        MODELS[_name + ("-fused" if _fused else "")] = Model(
            _config, _gpu, _cpu, pooled=_config["pooled_projection_dim"], flux=True, fused=_fused, text=_text
        )
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1.5e-2}
SEPARATION = 5.0  # the references must differ by this many tolerances for the checks to mean anything
LORA_SCALE = 0.8  # the paper's LoRA weight, alpha = rank
UP_STD = 0.02  # each LoRA changes a layer's output by ~10% of its norm: weak, but far above the tolerances
#: Per case: the engine whose hooks it runs under (None: Merge, no hooks) and the call.
Cases = dict[str, tuple[HookEngine | None, Callable[[], torch.Tensor]]]
CASES = ("merge", "switch", "composite_seq", "batched_stacked", "batched_unstacked", "window", "spatial")
RATIOS = (
    "switch_over_merge",
    "composite_seq_over_n_merge",
    "batched_over_seq",
    "batched_over_merge",
    "stacked_over_unstacked",
    "window_over_merge",
    "spatial_over_n1_merge",
)
#: The windowed case: a run of this many steps with Composite until WINDOW_END of them, merged after; its time is a
#: whole run's, its ratio per step (expected about 1 + WINDOW_END * (N - 1) Merges).
WINDOW_STEPS, WINDOW_END = 10, 0.4


class Inner(nn.Module):
    """The UNet called the way the webui's CFG denoiser calls its inner model: the x batch first, every other
    per-row input after it, so that :class:`MethodInner` replicates them all for batched Composite."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, added: dict[str, torch.Tensor] | None
    ) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]


class FluxInner(nn.Module):
    """The Flux transformer called as a Forge model function is: the packed latent tokens first, then the timestep,
    the T5 tokens and the per-row vectors (CLIP's pooled output, the distilled guidance); the position ids have no
    row dim."""

    def __init__(self, transformer: FluxTransformer2DModel, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> None:
        super().__init__()
        self.transformer, self.img_ids, self.txt_ids = transformer, img_ids, txt_ids

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, added: dict[str, torch.Tensor]) -> Any:
        return self.transformer(
            x, context, added["pooled"], t, self.img_ids, self.txt_ids, added["guidance"], return_dict=False
        )[0]


@dataclass
class Lora:
    """One rank-r LoRA's factors on one layer, kohya's shapes (1x1 conv factors on a conv), in the model's dtype;
    with ``span`` on those output features of a fused layer (a diffusers-format LoRA's to_q on Flux's ``qkv``)."""

    down: torch.Tensor
    up: torch.Tensor
    span: tuple[int, int] | None = None

    def weight_delta(self, module: nn.Module) -> torch.Tensor:
        """The webui's merge: ``scale * up @ down``, reshaped to the weight (to its span's rows)."""
        delta = (LORA_SCALE * self.up.flatten(1).float() @ self.down.flatten(1).float()).reshape(
            -1, *module.weight.shape[1:]
        )
        if self.span is None:
            return delta
        full = torch.zeros(module.weight.shape, dtype=delta.dtype, device=delta.device)
        full[self.span[0] : self.span[1]] = delta
        return full

    def delta(self) -> LowRankDelta:
        return LowRankDelta(self.down, self.up, LORA_SCALE, self.span)


#: Where one LoRA's factors go: the layer and the span of its output features (None: all of them).
Site = tuple[nn.Module, tuple[int, int] | None]


def target_layers(unet: nn.Module) -> list[Site]:
    """The layers a kohya LoRA trains in the UNet: every Linear and Conv2d inside a Transformer2DModel."""
    return [
        (m, None)
        for block in unet.modules()
        if isinstance(block, Transformer2DModel)
        for m in block.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]


def flux_sites(transformer: FluxTransformer2DModel, fused: bool) -> list[Site]:
    """Every Linear of the transformer, as a diffusers-format LoRA trains them: one LoRA per projection, to_q, to_k
    and to_v included. ``fused``: q/k/v (and the text stream's) fused into one layer each, as Forge and reForge's Flux
    stores them; each projection's LoRA then lands on its span of the fused layer, in the same order, so the LoRAs
    (seeded per site) are the same numbers in both layouts."""
    separate = [(name, m) for name, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    if not fused:
        return [(m, None) for _, m in separate]
    fusions = {"to_q": ("to_qkv", 0), "to_k": ("to_qkv", 1), "to_v": ("to_qkv", 2)}
    fusions |= {"add_q_proj": ("to_added_qkv", 0), "add_k_proj": ("to_added_qkv", 1), "add_v_proj": ("to_added_qkv", 2)}
    transformer.fuse_qkv_projections()
    sites: list[Site] = []
    for name, m in separate:
        parent, _, leaf = name.rpartition(".")
        if leaf not in fusions:
            sites.append((m, None))
            continue
        fused_name, third = fusions[leaf]
        attention = transformer.get_submodule(parent)
        width = m.weight.shape[0]
        sites.append((getattr(attention, fused_name), (third * width, (third + 1) * width)))
    for name, _ in separate:  # the unfused projections are never called again: free them
        parent, _, leaf = name.rpartition(".")
        if leaf in fusions:
            delattr(transformer.get_submodule(parent), leaf)
    return sites


def make_loras(sites: list[Site], n: int, rank: int, like: torch.Tensor) -> list[dict[nn.Module, list[Lora]]]:
    """N LoRAs on every target site, LoRA k seeded by k alone (the same LoRA k whatever N), drawn on the CPU so
    that every device gets the same numbers."""
    loras = []
    for k in range(n):
        gen = torch.Generator().manual_seed(1000 + k)
        per_layer: dict[nn.Module, list[Lora]] = {}
        for m, span in sites:
            d_out, d_in = m.weight.shape[:2]
            d_out = d_out if span is None else span[1] - span[0]
            tail = (1, 1) if m.weight.dim() == 4 else ()
            down = torch.randn(rank, d_in, *tail, generator=gen) * d_in**-0.5
            up = torch.randn(d_out, rank, *tail, generator=gen) * UP_STD
            per_layer.setdefault(m, []).append(Lora(down.to(like), up.to(like), span))
        loras.append(per_layer)
    return loras


@torch.no_grad()
def merge_into(backup: dict[nn.Module, torch.Tensor], loras: list[dict[nn.Module, list[Lora]]], ks: list[int]) -> None:
    """The base weights plus LoRAs ``ks``, added one after the other in the weights' dtype as the webui merges."""
    for m, base in backup.items():
        m.weight.copy_(base)
        for k in ks:
            for lora in loras[k][m]:
                m.weight += lora.weight_delta(m).to(m.weight.dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` in fp32 (Frobenius); inf when either is not finite, so NaN can never pass."""
    out, ref = out.float(), ref.float()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm())


class Clock:
    """Per-call time and peak memory on one device: CUDA events and the allocator's peak, or this thread's CPU time
    and the process's peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._libc = None if self.cuda else _glibc()

    def seconds(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start_cpu = time.thread_time()
        fn()
        return time.thread_time() - start_cpu

    def peak_extra_mib(self, fn: Callable[[], object]) -> float | None:
        """Peak memory during ``fn`` above what was in use before it (activations and temporaries), in MiB."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        if self._libc is None:
            return None
        self._libc.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            before = _proc_kib("VmRSS")
            fn()
            return (_proc_kib("VmHWM") - before) / 1024
        except OSError:
            return None


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _proc_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"no {key} in /proc/self/status")


@contextlib.contextmanager
def hooked(engine: HookEngine | None) -> Iterator[None]:
    """The engine's hooks installed for the block (none for Merge), as the host installs them for a pass."""
    if engine is not None:
        engine.install()
    try:
        yield
    finally:
        if engine is not None:
            engine.remove()


def refuse_fallback(message: str) -> None:
    """MethodInner falls back to sequential calls on OOM; timing that as batched would be a lie."""
    raise RuntimeError(f"batched Composite fell back: {message}")


def build(name: str, size: int, args: argparse.Namespace) -> tuple[nn.Module, tuple, list[Site]]:
    """The UNet with seeded random weights on the device, one cond+uncond call's inputs, the LoRA target sites."""
    spec, device, dtype = MODELS[name], torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    if spec.flux:
        return build_flux(spec, size, args)
    with torch.device(device):  # initialised where it runs: seconds on a GPU, where SDXL's init takes a minute on a CPU
        unet = UNet2DConditionModel(sample_size=size // 8, **spec.config)
    unet = unet.to(dtype).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    rows, latent = args.rows or 2, size // 8
    x = torch.randn(rows, 4, latent, latent, generator=gen).to(device, dtype)
    t = torch.full((rows,), 500.0, device=device)
    context = torch.randn(rows, CONTEXT_TOKENS, spec.config["cross_attention_dim"], generator=gen).to(device, dtype)
    added = None
    if spec.pooled is not None:
        added = {
            "text_embeds": torch.randn(rows, spec.pooled, generator=gen).to(device, dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * rows, device=device, dtype=dtype),
        }
    return Inner(unet), (x, t, context, added), target_layers(unet)


def build_flux(spec: Model, size: int, args: argparse.Namespace) -> tuple[nn.Module, tuple, list[Site]]:
    """The Flux transformer (``--flux-blocks`` double and single blocks) with seeded random weights, one call's
    inputs: a ``size`` image's 16-channel latent packed into 2x2 patches, ``spec.text`` T5 tokens, guidance 3.5."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = dict(spec.config)
    if args.flux_blocks and spec.config is FLUX:
        config["num_layers"], config["num_single_layers"] = (int(v) for v in args.flux_blocks.split(","))
    with torch.device(device):
        transformer = FluxTransformer2DModel(**config)
    transformer = transformer.to(dtype).eval().requires_grad_(False)
    sites = flux_sites(transformer, spec.fused)
    gen = torch.Generator().manual_seed(1)
    rows, side = args.rows or 1, size // 16  # the VAE's 8x, then 2x2 patches
    x = torch.randn(rows, side * side, config["in_channels"], generator=gen).to(device, dtype)
    t = torch.full((rows,), 0.5, device=device, dtype=dtype)
    context = torch.randn(rows, spec.text, config["joint_attention_dim"], generator=gen).to(device, dtype)
    added = {
        "pooled": torch.randn(rows, config["pooled_projection_dim"], generator=gen).to(device, dtype),
        "guidance": torch.full((rows,), 3.5, device=device, dtype=dtype),
    }
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    inner = FluxInner(transformer, img_ids.reshape(-1, 3).to(device), torch.zeros(spec.text, 3, device=device))
    return inner, (x, t, context, added), sites


def make_cases(
    inner: nn.Module, inputs: tuple, loras: list[dict[nn.Module, list[Lora]]], cuda: bool, latent: bool
) -> tuple[Cases, list[int]]:
    """The cases over weights that hold all N LoRAs merged, each engine built as ``engine.build_engine`` builds it
    for plain LoRAs (a LoRA's parts on one layer summed as the host's ``make_delta`` sums them) and run through
    :class:`MethodInner` as the host installs it; the list is Switch's step. Only with an image-shaped latent
    (``latent``: not Flux's packed tokens) the window (a 10-step run) and Spatial (its patches are the latent's)."""
    n = len(loras)
    deltas = {m: {k: low_rank_sum([p.delta() for p in lora[m]]) for k, lora in enumerate(loras)} for m in loras[0]}
    stacked, unstacked = (build_engine(deltas, n, keep_merged=True, stack=stack) for stack in (True, False))
    host = stacked if cuda else unstacked  # what the host builds on this device
    step = [0]
    switch = MethodInner(inner, host, "Switch", n, 1, step=lambda: step[0])

    def composite(engine: HookEngine, batched: bool) -> Callable[[], torch.Tensor]:
        wrapper = MethodInner(inner, engine, "Composite", n, 1, step=lambda: 0, batched=batched, warn=refuse_fallback)
        return lambda: wrapper(*inputs)

    window_step = [0]
    windowed = MethodInner(
        inner,
        host,
        "Composite",
        n,
        1,
        step=lambda: window_step[0],
        window=(0.0, WINDOW_END),
        steps=lambda: WINDOW_STEPS,
    )

    def window_run() -> list[torch.Tensor]:
        outputs = []
        for window_step[0] in range(WINDOW_STEPS):
            outputs.append(windowed(*inputs))
        return outputs

    cases: Cases = {
        "merge": (None, lambda: inner(*inputs)),
        "switch": (host, lambda: switch(*inputs)),
        "composite_seq": (host, composite(host, False)),
        "batched_stacked": (stacked, composite(stacked, True)),
        "batched_unstacked": (unstacked, composite(unstacked, True)),
    }
    if latent:
        cases["window"] = (host, window_run)
        with_base = build_engine(deltas, n, keep_merged=True, stack=cuda, base=True)
        spatial = MethodInner(inner, with_base, "Spatial", n, 1, step=lambda: 0, spatial=spatial_settings(inputs))
        cases["spatial"] = (with_base, lambda: spatial(*inputs))
    return cases, step


def spatial_settings(inputs: tuple) -> Spatial:
    """Spatial Composite on the bench's call: its first half of rows cond, the rest uncond. (The diffusers UNet
    returns noise predictions, not denoised ones, and ``t`` is a timestep, not sigma: the mix is computed on other
    numbers than in a webui, at the same cost, and checked against the same formula on the references.)"""
    rows = inputs[0].shape[0]
    mask = torch.arange(rows) < (rows + 1) // 2
    return Spatial(PATCH, TEMPERATURE, lambda n_rows: mask[:n_rows])


def run_model(name: str, size: int, ns: list[int], args: argparse.Namespace, clock: Clock) -> Iterator[dict[str, Any]]:
    """Build one UNet, then check and time every case for each N; one result dict per N, as each is done."""
    inner, inputs, sites = build(name, size, args)
    backup = {m: m.weight.detach().clone() for m, _ in sites}
    cuda = torch.device(args.device).type == "cuda"
    tol = TOLERANCE[DTYPES[args.dtype]]
    model_mib = sum(p.numel() * p.element_size() for p in inner.parameters()) / 2**20
    for n in ns:
        loras = make_loras(sites, n, args.rank, like=backup[sites[0][0]])
        with torch.no_grad():
            refs = []
            for k in range(n):
                merge_into(backup, loras, [k])
                refs.append(inner(*inputs))
            merge_into(backup, loras, [])
            base = inner(*inputs)  # no LoRA: Spatial Composite's base
        merge_into(backup, loras, list(range(n)))  # what the webui holds for a prompt with these N LoRAs
        cases, step = make_cases(inner, inputs, loras, cuda, latent=not MODELS[name].flux)
        errors, separation = check(cases, refs, base, inputs, step)
        ok = all(e <= tol for e in errors.values()) and separation > SEPARATION * tol
        factors = {id(t): t for lora in loras for parts in lora.values() for p in parts for t in (p.down, p.up)}
        result: dict[str, Any] = {
            "model": name,
            "size": size,
            "n": n,
            "rows": inputs[0].shape[0],
            "layers": len(backup),
            "sliced_layers": sum(any(p.span for p in parts) for parts in loras[0].values()),
            "ok": ok,
            "tolerance": tol,
            "separation": separation,
            "max_rel_err": errors,
            "model_mib": model_mib,
            "lora_factors_mib": sum(t.numel() * t.element_size() for t in factors.values()) / 2**20,
        }
        if ok:
            result.update(timings(cases, n, args.repeats, clock, batched="stacked" if cuda else "unstacked"))
            result["engine_mib"] = {case: held_mib(engine, factors) for case, (engine, _) in cases.items()}
            result.update(memory_ratios(result))
        yield result


@torch.no_grad()
def check(
    cases: Cases, refs: list[torch.Tensor], base: torch.Tensor, inputs: tuple, step: list[int]
) -> tuple[dict[str, float], float]:
    """Every case's largest error against its merged-weight reference, and how far apart the references (and Merge)
    are: a check that a wrong path would also pass is no check. ``step`` drives Switch (tau = 1: step k runs LoRA k).
    The windowed run is Composite's mean inside the window and Merge after it; Spatial is the formula on the
    references (the single-LoRA ones and ``base``, no LoRA)."""
    n = len(refs)
    mean_ref = composite_mean(refs)
    outs, window = {}, []
    for case, (engine, fn) in cases.items():
        with hooked(engine):
            if case == "switch":
                switch_errs = []
                for k in range(n):
                    step[0] = k
                    switch_errs.append(rel_err(fn(), refs[k]))
                step[0] = 0
            elif case == "window":
                window = fn()
            else:
                outs[case] = fn()
    merge, spatial = outs.pop("merge"), outs.pop("spatial", None)
    errors = {"switch": max(switch_errs), **{case: rel_err(out, mean_ref) for case, out in outs.items()}}
    errors["batched_vs_seq"] = max(rel_err(outs[c], outs["composite_seq"]) for c in outs if c != "composite_seq")
    if window:
        inside = round(WINDOW_END * WINDOW_STEPS)
        errors["window"] = max(rel_err(out, mean_ref if i < inside else merge) for i, out in enumerate(window))
    if spatial is not None:
        settings = spatial_settings(inputs)
        cond_rows = settings.cond_rows(inputs[0].shape[0])
        expected = spatial_mix(refs, base, inputs[0], inputs[1], cond_rows, PATCH, TEMPERATURE)
        errors["spatial"] = rel_err(spatial, expected)
    apart = [rel_err(merge, ref) for ref in [*refs, mean_ref]]
    apart += [rel_err(refs[j], refs[k]) for j in range(n) for k in range(j)]
    return errors, min(apart)


def timings(cases: Cases, n: int, repeats: int, clock: Clock, batched: str) -> dict[str, Any]:
    """One untimed round that measures peak memory, then ``repeats`` interleaved rounds in a rotating order; medians
    and the ratios that matter."""
    names = list(cases)
    peak = {}
    samples: dict[str, list[float]] = {case: [] for case in names}
    with torch.no_grad():
        for case in names:
            engine, fn = cases[case]
            with hooked(engine):
                peak[case] = clock.peak_extra_mib(fn)
        for r in range(repeats):
            for case in names[r % len(names) :] + names[: r % len(names)]:
                engine, fn = cases[case]
                with hooked(engine):
                    samples[case].append(clock.seconds(fn))
    ms = {case: statistics.median(s) * 1e3 for case, s in samples.items()} if repeats else {}
    out: dict[str, Any] = {"median_ms": ms, "peak_extra_mib": peak, "batched": batched}
    if ms:
        merge, seq, chosen = ms["merge"], ms["composite_seq"], ms[f"batched_{batched}"]
        values = (ms["switch"] / merge, seq / (n * merge), chosen / seq, chosen / merge)
        values += (ms["batched_stacked"] / ms["batched_unstacked"],)
        if "window" in ms:
            values += (ms["window"] / (WINDOW_STEPS * merge), ms["spatial"] / ((n + 1) * merge))
        out.update(zip(RATIOS, values, strict=False))
    return out


def held_mib(engine: HookEngine | None, factors: dict[int, torch.Tensor]) -> float:
    """What an engine's deltas hold beyond the LoRAs' own factors (which the host holds anyway): stacked
    complements, scaled and cast copies, in MiB."""
    if engine is None:
        return 0.0
    seen: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if id(value) not in factors:
                seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, (LowRankDelta, LowRankParts)):
            for item in vars(value).values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    visit([list(per_layer.values()) for per_layer in engine.deltas.values()])
    return sum(seen.values()) / 2**20


def memory_ratios(result: dict[str, Any]) -> dict[str, float]:
    """Per case, its peak (the model, what its engine holds, the call's peak above that) over Merge's peak plus the
    LoRAs' factors: the target is 1.05 at most."""
    peak = result["peak_extra_mib"]
    if any(v is None for v in peak.values()):
        return {}
    budget = result["model_mib"] + peak["merge"] + result["lora_factors_mib"]
    return {
        f"{case}_peak_over_merge_plus_factors": (result["model_mib"] + result["engine_mib"][case] + peak[case]) / budget
        for case in peak
        if case != "merge"
    }


def print_table(result: dict[str, Any], device: str, dtype: str, rank: int, repeats: int) -> None:
    size, n = result["size"], result["n"]
    sliced = f" ({result['sliced_layers']} of them fused, LoRAs on spans)" if result["sliced_layers"] else ""
    print(
        f"{result['model']} {size}x{size}, rows {result['rows']}, N={n}, rank {rank}, {dtype} on {device}: "
        f"{result['layers']} LoRA layers{sliced}, median of {repeats}; references apart by "
        f"{result['separation']:.3g}, tolerance {result['tolerance']:g}: {'ok' if result['ok'] else 'FAILED'}"
    )
    print(
        f"  model {result['model_mib']:.0f} MiB, the N LoRAs' factors {result['lora_factors_mib']:.1f} MiB; "
        f"engine beyond them: {result.get('engine_mib', {}).get('switch', float('nan')):.1f} MiB"
    )
    errors, ms, peak = result["max_rel_err"], result.get("median_ms", {}), result.get("peak_extra_mib", {})
    merge = ms.get("merge")
    print(f"  {'case':<20} {'ms':>10} {'x merge':>8} {'peak+ MiB':>10} {'rel err':>9}")
    for case in CASES:
        t = ms.get(case)
        if t is not None and case == "window":
            t /= WINDOW_STEPS  # per step of its run
        mem = peak.get(case)
        err = errors.get(case)
        mem_text = "-" if case not in peak else "n/a" if mem is None else f"{mem:.0f}"
        print(
            f"  {case:<20} {'-' if t is None else f'{t:.1f}':>10} {'-' if t is None else f'{t / merge:.3f}':>8} "
            f"{mem_text:>10} {'-' if err is None else f'{err:.1e}':>9}"
        )
    print(f"  {'batched vs sequential':<20} {'':>10} {'':>8} {'':>10} {errors['batched_vs_seq']:>9.1e}")
    for key in RATIOS:
        if key in result:
            print(f"  {key:<28} {result[key]:.3f}")
    for key, value in result.items():
        if key.endswith("_peak_over_merge_plus_factors"):
            print(f"  {key:<44} {value:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: fp16 on CUDA, fp32 on a CPU")
    parser.add_argument(
        "--model",
        default=None,
        help=f"comma-separated, of {', '.join(MODELS)} (default: sd15,sdxl "
        "on CUDA; sd15 on a CPU, where SDXL's 10 GB of fp32 weights take minutes per call)",
    )
    parser.add_argument(
        "--size",
        type=int,
        help="image size in pixels, for every model (default: per model, 512 SD1.5 / 1024 SDXL on CUDA, 64 on a CPU)",
    )
    parser.add_argument("--n", default="2,3,5", help="comma-separated numbers of LoRAs (default 2,3,5)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--rows", type=int, help="rows per denoiser call (default: cond+uncond = 2; 1 for Flux, at CFG 1)"
    )
    parser.add_argument(
        "--flux-blocks", help="double,single blocks of the full-width Flux (default 2,2; 19,38 is FLUX.1's depth)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7 on CUDA, 3 on a CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.repeats = (7 if cuda else 3) if args.repeats is None else args.repeats
    models = (args.model or ("sd15,sdxl" if cuda else "sd15")).split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}")
    ns = [int(v) for v in args.n.split(",")]
    if any(n < 2 for n in ns):
        parser.error("composing needs N >= 2")
    diffusers_logging.set_verbosity_error()
    if cuda:  # fp32 means fp32: no TF32 in the checks' matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        device_name = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(1)  # the time measured is this thread's
        device_name = "cpu, 1 thread"
        if args.model is None:
            print("sdxl skipped on a CPU (10 GB of fp32 weights, minutes per call); --model sdxl runs it anyway")
    clock = Clock(device)
    results = []
    for name in models:
        size = args.size or (MODELS[name].gpu_size if cuda else MODELS[name].cpu_size)
        for result in run_model(name, size, ns, args, clock):
            print_table(result, device_name, args.dtype, args.rank, args.repeats)
            results.append(result)
    ok = all(r["ok"] for r in results)
    summary = {
        "device": device_name,
        "dtype": args.dtype,
        "rank": args.rank,
        "repeats": args.repeats,
        "timer": "cuda events" if cuda else "thread cpu time",
        "memory": "cuda max_memory_allocated - allocated" if cuda else "VmHWM - VmRSS after malloc_trim",
        "ok": ok,
        "results": results,
    }
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
