"""Transforms of one recording (interpolation, resampling, cleaning, normalisation) and the cache builder."""
