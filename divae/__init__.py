"""DiVAE model library: pure PyTorch (VQ stage, diffusion decoder, AR prior). No DeepSpeed, no launchers."""

__version__ = "0.1.0"
