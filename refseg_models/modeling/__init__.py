"""The trainable parts of each method (one module per method, like segment-anything's modeling/)."""
