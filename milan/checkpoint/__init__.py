"""Checkpoint layouts, conversion and I/O."""

from milan.checkpoint.keymaps import mmpretrain_milan_to_milan, openai_clip_to_timm

__all__ = ["mmpretrain_milan_to_milan", "openai_clip_to_timm"]
