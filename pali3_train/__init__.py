"""pali3-train: distributed training of PaLI-3-style vision-language models."""
