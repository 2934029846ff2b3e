"""Model loading (the real `from_pretrained` paths) and the tiny offline model set.

- `loaders`: SDXL pipeline and parts, BLIP, open_clip + the LAION aesthetic MLP, by id or path.
- `aesthetic`: the LAION aesthetic predictor's MLP and its safe, shape-checked loading.
- `tokenizers`: the CLIP BPE tokenizer rebuilt from open_clip's bundled vocabulary.
- `tiny`: builds a tiny randomly initialised model set in the real on-disk formats.
- `single_file`: single-file SDXL checkpoints in the original SGM layout (export, and reading a base).
- `hub_cache`: a Hugging Face cache of every `sdxl`-profile repository, real file layout, small weights.
"""
