// Hover hints for the Multi-LoRA Composition panel, through the webui's `titles` mechanism.
(function () {
    const hints = {
        "Multi-LoRA Composition": "Compose the <lora> tags of the prompt with LoRA Switch, LoRA Composite (Zhong et al., 2024) or Spatial Composite instead of merging them all into the weights.",
        "Switch": "LoRA Switch: one LoRA is active at a time; the active LoRA changes every τ steps, cycling in prompt order. Costs the same as a normal generation.",
        "Composite": "LoRA Composite: every step runs the UNet once per LoRA and averages the predictions before CFG. Costs N UNet passes per step for N LoRAs.",
        "Switch every τ steps": "LoRA Switch: step i uses LoRA (i // τ) mod N. With τ ≥ steps only the first LoRA runs in the UNet.",
        "Composite execution": "Sequential: N UNet calls per step (other extensions see their normal batch). Batched: one call on the batch replicated per LoRA (faster on GPU, N× activation memory). Auto: Batched on CUDA.",
        "Sequential": "Composite runs the UNet once per LoRA, one after the other.",
        "Batched": "Composite runs one UNet call on the batch replicated once per LoRA; falls back to Sequential on out-of-memory.",
        "Text encoder sees": "All: every <lora> shapes the prompt's conditioning (webui default). First: only the first composed LoRA (the paper's Switch). None: no composed LoRA.",
        "Hires pass": "Restart: the schedule starts again in the hires pass. Continue: it keeps counting from the first pass. Off: the hires pass runs merged.",
        "LoRAs to compose": "Pick among the <lora> tags of the prompt. None picked: every <lora> of the prompt is composed. Otherwise only the picks are composed; the other <lora> tags stay merged as usual.",
        "LoRAs to compose, by name": "What is composed, as comma-separated names: the picks write it; a name typed here that is not in the prompt makes the run fall back to Merge (the preview says so).",
        "Spatial": "Spatial Composite: per latent patch, the LoRA that moves the prediction furthest from the base (no composed LoRA) leads there. Costs N+1 UNet passes per step.",
        "Composite weights": "One mixing weight per composed LoRA, in composed order (e.g. 2,1,1), normalised to sum 1. Empty: equal weights. A weight of 0 skips that LoRA's pass.",
        "Runs from": "The step the method starts at: up to 1 a fraction of the steps, above 1 a step number. Before it every LoRA acts merged.",
        "until (merged outside)": "The step the method stops at (not included): up to 1 a fraction of the steps (1 = the end), above 1 a step number. After it every LoRA acts merged.",
        "Spatial patch (latent px)": "Spatial Composite's patch size in latent pixels (8 = 64x64 image pixels). Larger: calmer, blockier regions.",
        "Spatial temperature": "Spatial Composite's softmin temperature: lower hands each patch more decisively to one LoRA; very high is plain Composite.",
    };
    if (typeof titles === "object") {
        Object.assign(titles, hints);
    }
})();
