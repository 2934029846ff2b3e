"""Train stage: full fine-tuning of an SDXL U-Net with diffusers + accelerate.

`data` turns captioned images into training examples with SDXL's size and crop conditioning,
`sdxl` holds the diffusion maths (prompt encoding, time ids, noise and loss), `loop` runs the
optimisation with accelerate, logs through dvclive and saves a diffusers pipeline.
"""

from components.train.loop import run_train

__all__ = ["run_train"]
