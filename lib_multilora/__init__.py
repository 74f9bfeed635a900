"""Multi-LoRA composition (LoRA Switch, LoRA Composite) for the AUTOMATIC1111 webui.

Pure modules (``schedule``, ``args``, ``tags``, ``engine``, ``inner``) import neither ``modules.*`` nor ``gradio``;
``host`` and ``ui`` are the only places that touch webui internals.
"""
