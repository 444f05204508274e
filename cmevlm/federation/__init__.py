"""Federated SFT across hospitals on NVIDIA FLARE: frames never leave their site (README, Consortium)."""
