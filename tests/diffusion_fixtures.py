"""Tiny diffusion transformers for the tests: the presets' classes at toy widths (~50k parameters).

The configs live in the package (loraq_export.models.diffusion_presets) so that tiny pipeline
folders can be built from them too; tests import them from here as before."""
from __future__ import annotations

from loraq_export.models.diffusion_presets import tiny_config

__all__ = ["tiny_config"]
