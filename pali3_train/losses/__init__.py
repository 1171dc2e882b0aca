"""Training objectives: token cross-entropy for the multimodal stages, sigmoid loss for stage 0."""
