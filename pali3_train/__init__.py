"""pali3-train: distributed training of PaLI-3-style vision-language models."""

from pali3_train.quiet import filter_warnings

filter_warnings()  # before any module of ours imports megatron-core or DeepSpeed
