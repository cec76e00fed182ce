"""cogumi: LoRA fine-tuning that proves the result is good before anyone ships it."""

__version__ = "0.1.0"
