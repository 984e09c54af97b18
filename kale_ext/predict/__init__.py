"""Heads and objectives (ELBO, KL, alignment, focal loss); no eager imports: losses need torch only."""
