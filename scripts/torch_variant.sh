#!/bin/sh
# Which build of torch `make install` puts in .venv; prints it on stdout, and why on stderr.
#
#   cpu     no working nvidia-smi here: torch comes from the ordinary index with every other
#           package (the CPU wheel; constraints.txt pins the version). The Makefile adds nothing.
#   cuXYZ   the newest CUDA build of the pinned torch that the NVIDIA driver runs (a driver runs
#           builds for its own CUDA version, the "CUDA Version" nvidia-smi prints, and older);
#           the Makefile installs it from https://download.pytorch.org/whl/cuXYZ first.
#
# TORCH_CUDA chooses instead: TORCH_CUDA=cpu, or one of VARIANTS (make install TORCH_CUDA=cu126).
# A driver older than every variant, or an unknown TORCH_CUDA, is an error (exit 1).
set -eu

# The CUDA builds PyTorch publishes of torch 2.13.0 (constraints.txt), newest first. Update
# together with the pin: https://download.pytorch.org/whl/torch/ lists every variant.
VARIANTS="cu132 cu130 cu129 cu126"

say() { echo "torch: $*" >&2; }

if [ -n "${TORCH_CUDA:-}" ]; then
    for variant in cpu $VARIANTS; do
        if [ "$TORCH_CUDA" = "$variant" ]; then
            say "$variant (TORCH_CUDA)"
            echo "$variant"
            exit 0
        fi
    done
    say "TORCH_CUDA=$TORCH_CUDA is none of: cpu $VARIANTS"
    exit 1
fi

if ! smi=$(nvidia-smi 2>/dev/null); then
    say "cpu (no working nvidia-smi: no NVIDIA driver here)"
    echo cpu
    exit 0
fi

# "CUDA Version: 12.8" in nvidia-smi's header -> 1208, comparable with a variant's 12.6 -> 1206.
driver=$(printf '%s\n' "$smi" | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -n 1)
if [ -z "$driver" ]; then
    say "nvidia-smi shows no CUDA version; choose one: TORCH_CUDA=cpu or one of $VARIANTS"
    exit 1
fi
set -- $driver
driver_cuda=$(($1 * 100 + $2))

for variant in $VARIANTS; do
    digits=${variant#cu}
    minor=${digits#??}
    major=${digits%"$minor"}
    if [ $((major * 100 + minor)) -le "$driver_cuda" ]; then
        say "$variant (the driver runs CUDA $1.$2; newest build of torch 2.13.0 it runs)"
        echo "$variant"
        exit 0
    fi
done
say "the driver runs CUDA $1.$2, older than every CUDA build of torch 2.13.0 ($VARIANTS):"
say "update the driver, or install the CPU build with TORCH_CUDA=cpu"
exit 1
