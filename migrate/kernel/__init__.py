"""Linux interfaces: the only package that touches cffi or raw syscalls."""
