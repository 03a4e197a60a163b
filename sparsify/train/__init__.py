"""Router (and gate) training: LoRA + KL-to-teacher on accelerate. Entry point: `train.loop.train`."""
