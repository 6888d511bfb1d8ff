"""fieldgate: the glue that turns a small Linux box into a field data gateway."""

__version__ = "0.1.0"
