"""Sphinx configuration for bilinearpool."""

from __future__ import annotations

import bilinearpool

project = "bilinearpool"
author = "bilinearpool developers"
release = bilinearpool.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Shape", "params_style")]
nitpicky = False
html_theme = "furo"
html_title = f"bilinearpool {release}"
exclude_patterns = ["_build"]
