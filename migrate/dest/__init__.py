"""The destination side: the restore pipeline."""
