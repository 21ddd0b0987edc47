"""Loaders and recipes for one-step and few-step distilled students (pure PyTorch + safetensors)."""
