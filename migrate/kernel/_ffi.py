"""cffi (out-of-line ABI mode): the only place migrate talks C.

Nothing outside ``migrate/kernel/`` imports this module, and no cdata
leaves the kernel package (CONVENTIONS.md §1).  The declarations live in
``_ffi_build.py``; the generated ``_ffi_gen.py`` is made at build time, or
here on first import of a fresh checkout.
"""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_GEN = os.path.join(_HERE, "_ffi_gen.py")
_SRC = os.path.join(_HERE, "_ffi_build.py")

if not os.path.exists(_GEN) or os.path.getmtime(_GEN) < os.path.getmtime(_SRC):
    from migrate.kernel import _ffi_build
    _ffi_build.build()

from migrate.kernel._ffi_gen import ffi  # noqa: E402

libc = ffi.dlopen(None)
