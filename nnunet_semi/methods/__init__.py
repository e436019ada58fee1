"""One module per semi-supervised method; each overrides one hook of the base trainer."""
