"""Checkpoint conversion between HuggingFace layouts (SigLIP, T5 v1.1 / UL2) and ours."""
