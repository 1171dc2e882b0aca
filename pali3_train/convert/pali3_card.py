"""The model card (README.md) of an exported PaLI-3 directory (``pali3_hf``).

Its one Python block is the way to run the export with stock transformers, so it is tested as
code: ``tests/convert/test_pali3_export.py`` runs it from a generated card and compares its tokens
with ``PaLI3.generate``'s. It reproduces what training fed the model: the image preprocessing of
``data_pipeline.transforms`` (not ``SiglipImageProcessor``'s bicubic resize), the prompt as
``Tokenizer.encode`` makes it (pieces then EOS, read with ``sentencepiece`` itself), and greedy
decoding from PAD.
"""

from __future__ import annotations

import json

from pali3_train.data_pipeline.tasks import TASKS

SNIPPET = """\
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    SiglipVisionModel,
    T5ForConditionalGeneration,
)

model_dir = Path(".")  # this directory
image_path, prompt, max_new_tokens = "image.png", "Caption in EN:", 32

vision = SiglipVisionModel.from_pretrained(model_dir / "vision").eval()
language = T5ForConditionalGeneration.from_pretrained(model_dir / "language").eval()
projection = torch.nn.Linear(vision.config.hidden_size, language.config.d_model)
projection.load_state_dict(load_file(model_dir / "projection.safetensors"))
tokenizer = spm.SentencePieceProcessor(model_file=str(model_dir / "spiece.model"))

# As in training: RGB, squashed to a square (antialiased bilinear on uint8), scaled to [-1, 1].
size = vision.config.image_size
with Image.open(image_path) as image:
    image.draft("RGB", (size, size))  # a large JPEG decodes at a smaller scale
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]
if pixels.shape[-2:] != (size, size):
    pixels = F.interpolate(pixels, (size, size), mode="bilinear", antialias=True)
pixel_values = pixels.float() / 127.5 - 1.0

# The prompt's pieces then EOS, no BOS; the image tokens come first in the encoder's input.
prompt_ids = torch.tensor([tokenizer.encode(prompt) + [tokenizer.eos_id()]])
with torch.no_grad():
    visual = projection(vision(pixel_values=pixel_values).last_hidden_state)
    embeds = torch.cat([visual, language.get_input_embeddings()(prompt_ids)], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    # A cache that grows a layer at a time: the one transformers 5 builds for T5 has as many
    # layers as the encoder, too few where the decoder is deeper.
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    tokens = language.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
answer = tokens[0, 1:].tolist()  # tokens[0, 0] is the decoder's start token (PAD)
print(tokenizer.decode(answer[: answer.index(1)] if 1 in answer else answer))
"""


def prompt_formats() -> dict[str, str]:
    """Task -> the prompt template training uses for it (``data_pipeline.tasks``)."""
    return {name: task.default_prompt for name, task in TASKS.items()}


def model_card(manifest: dict, source: str) -> str:
    """README.md for an export of ``source`` whose ``pali3.json`` is ``manifest``."""
    model = manifest["model"]
    vit, ul2 = model["vit"], model["ul2"]
    step = f" at step {manifest['step']}" if manifest.get("step") is not None else ""
    prompts = "\n".join(f"- {name}: `{fmt}`" for name, fmt in manifest["prompt_formats"].items())
    tokenizer = (
        "`spiece.model` is the SentencePiece model it was trained with."
        if manifest.get("tokenizer")
        else "**No tokenizer**: the weights recorded none (or it was not found). Put the "
        "SentencePiece model it was trained with here as `spiece.model` before running the "
        "snippet or importing back."
    )
    return f"""# PaLI-3 (pali3-train export)

A PaLI-3 vision-language model trained with pali3-train, exported from `{source}`{step} as
stock HuggingFace parts. The image tokens of a SigLIP encoder, linearly projected, are prepended
to the embedded prompt; a T5 v1.1 / UL2 encoder runs over both, and its decoder writes the answer.

- image encoder: {vit["image_size_px"]} px, patch {vit["patch_size_px"]}, width {vit["width"]}, \
{vit["depth"]} layers
- language model: d_model {ul2["d_model"]}, {ul2["num_encoder_layers"]} encoder and \
{ul2["num_decoder_layers"]} decoder layers, vocabulary {ul2["vocab_size"]}

## Files

- `vision/`: a `SiglipVisionModel` with `vision_use_head: false`. PaLI-3 feeds the language
  model the image tokens before pooling, so SigLIP's MAP head is not part of it, and the
  model's `pooler_output` is `None`; use `last_hidden_state`.
- `projection.safetensors`: `weight` [{ul2["d_model"]}, {vit["width"]}] and `bias`
  [{ul2["d_model"]}], the linear map from image tokens to the language model's width.
- `language/`: a `T5ForConditionalGeneration` with its own (untied) LM head.
- `spiece.model`: the tokenizer (PAD 0, EOS 1, UNK 2, no BOS).
- `pali3.json`: the pali3-train model config as recorded, and these input conventions.

{tokenizer}

## Prompts

pali3-train's task formats (`{{lang}}` is an upper-case language code such as `EN`); the weights
do not record which of them the training mixture used:

{prompts}

## Running it with transformers

Greedy decoding, computed as pali3-train's `PaLI3.generate` computes it (checked on a small
model: encoder output and logits within 1e-5 in fp32, the same tokens):

```python
{SNIPPET}```

Fidelity notes:

- Images: the resize above is what training used; `SiglipImageProcessor` (bicubic) gives the
  same [-1, 1] range but slightly different pixels.
- Beam search: pali3-train keeps finished hypotheses with their frozen total log-probability (no
  length normalisation); HF's `num_beams > 1` uses its own stopping and length penalty, so beam
  answers can differ. Greedy answers do not.
- LM head: UL2's is its own weight (`tie_word_embeddings: false`). transformers 5 reads every
  T5 as tied and warns that `shared.weight` and `lm_head.weight` differ, so it does not tie
  them: that is as intended.
- Tokenizer: load `spiece.model` with `sentencepiece` as above. transformers' `T5Tokenizer`
  numbers 100 `<extra_id_*>` sentinels after the model's own pieces, where pali3-train's
  `add-symbols` puts task markers; plain prompts encode the same either way.

## Back to pali3-train

    python -m pali3_train.convert import pali3 <this directory> --out model.safetensors

rebuilds the original file (weights and model config identical, tokenizer copied beside it as
`model.spiece.model`), ready for `stage.init_from` or `python -m pali3_train.generate`.

`pali3.json`:

```json
{json.dumps(manifest, indent=2)}
```
"""
