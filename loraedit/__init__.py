"""loraedit: edit a whole video from an edited first frame (mask-aware LoRA on Wan I2V)."""

__version__ = "0.1.0"
