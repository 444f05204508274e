"""Evaluation: base vs SFT vs DPO on the held-out test set (`cmevlm evaluate`)."""
