"""What can stop an export (lesson 08); each message says what to do."""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export step that cannot go on; the message says what to do."""


class ConverterMissingError(ExportError):
    """llama.cpp's converter is not installed where the export looks for it."""


class DiskSpaceError(ExportError):
    """Not enough free disk for the merged model and its GGUF files."""


class RoundTripError(ExportError):
    """A GGUF that does not answer like the merged model: it must not be served or published."""


class QualityBarError(ExportError):
    """The merged model or a quantized GGUF misses its held-out answer-loss bar: it must not be served or published."""
