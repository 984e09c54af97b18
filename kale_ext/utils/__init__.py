"""Small shared helpers: seeding, hashing, file I/O."""
