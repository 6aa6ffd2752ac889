"""Post-training stages of `kiln train` (Llama 3 / Qwen 2 / AFM): SFT, reward model, DPO.

    data     TRL's row formats, the chat format's token masks, samplers (packing)
    models   the DPO policy and the reward model (each computes its loss in its forward)
    stages   setting a stage of each kind up: data, model, the DPO reference cache, held-out measures
"""
