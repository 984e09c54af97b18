"""Test scaffolding shared by several test files (kept out of the production modules)."""
