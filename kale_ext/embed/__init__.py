"""Encoders, fusion layers, the multimodal VAE and its configurations (no eager imports: fusion needs torch only)."""
