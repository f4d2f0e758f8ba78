"""packlora: packed, assistant-only LoRA fine-tuning of ChatML chat models on DeepSpeed."""
__version__ = "0.1.0"
