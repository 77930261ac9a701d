"""User-facing inference: the ``refseg predict`` command (mask + overlay PNG for an image pair)."""
