"""The checkpoint image format (DESIGN.md §2): schema, files, page store."""

from migrate.images.imgfile import (  # noqa: F401
    FORMAT_VERSION, ImageDir, ImageKind, PagesReader, PagesWriter,
    PE_IN_PARENT, PE_LAZY, PE_PRESENT, PE_ZERO, decode_file, kind_of,
)
