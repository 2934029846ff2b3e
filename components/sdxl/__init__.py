"""SDXL maths shared by training samples and evaluation: prompt encoding (`prompt_encoding`),
guidance (`guidance`) and seeded image generation (`generation`)."""
