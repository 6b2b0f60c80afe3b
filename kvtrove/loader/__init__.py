"""Checkpoints in, a state dict with Hugging Face parameter names out."""

from kvtrove.loader.checkpoint import Checkpoint, load_checkpoint, load_config

__all__ = ["Checkpoint", "load_checkpoint", "load_config"]
