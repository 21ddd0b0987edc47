"""CUDA-graph capture and replay of a diffusion model's forward pass (pure PyTorch)."""
