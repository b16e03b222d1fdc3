"""Process state, one module per kind, dump and restore side by side."""
