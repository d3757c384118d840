"""One DeepSpeed trainer for all three DiVAE stages (python -m trainer.train)."""
