"""Write a tiny random ControlNet for the Forge tier's tiny SD1.5 model (``tiny_model.py``), for its built-in
ControlNet to load: the encoder half of the same one-level UNet (320 channels, context 768) with Forge's hint block.

Run as a script with the host's python (``test_neighbours.py`` does, in a subprocess): the shapes come from Forge's
own ``backend.nn.cnets.cldm.ControlNet`` (reForge's ``ldm_patched.controlnet.cldm.ControlNet``: the same keys, the
same file) built on the meta device with ``tiny_model.UNET_CONFIG`` and 3 hint channels, so the keys are the layout
the host's loader recognises (``zero_convs.0.0.weight`` at the top level: it then detects the config from the keys,
``modules_forge/supported_controlnet.py``)::

    python tests/forge/tiny_controlnet.py OUT_DIR --forge FORGE_DIR [--seed 0]

It writes ``OUT_DIR/tiny-cn-sd15.safetensors`` (fp16). Every tensor is seeded random as the checkpoint's are, none
zero: a real ControlNet starts with zero convolutions, and with those it would leave the UNet as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_model import UNET_CONFIG, HostModels, builder_cli, meta_shapes, random_tensor

NAME = "tiny-cn-sd15"
HINT_CHANNELS = 3


def build(out_dir: Path, forge_dir: Path, seed: int = 0) -> dict[str, str]:
    """Write the ControlNet under ``out_dir``; return its path (``{"path": ...}``)."""
    import torch
    from safetensors.torch import save_file

    config = {key: value for key, value in UNET_CONFIG.items() if key != "out_channels"}
    with torch.device("meta"):
        model = HostModels(forge_dir, sdxl=False).controlnet(config, HINT_CHANNELS)
    shapes = meta_shapes((("", model),))
    generator = torch.Generator().manual_seed(seed * 1000 + 100)
    state = {key: random_tensor(key, shape, generator).to(torch.float16) for key, shape in shapes.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{NAME}.safetensors"
    save_file(state, str(path))
    return {"path": str(path)}


if __name__ == "__main__":
    builder_cli(__doc__, build)
