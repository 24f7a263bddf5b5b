"""Sphinx configuration of labkit's book (``python -m labkit book`` copies it into the staged sources).

The notebooks arrive executed (labkit.book runs them, in parallel, before Sphinx starts), so myst-nb only
renders them. Nothing is fetched when a page is viewed: MathJax is a local copy (``_static/mathjax``, from the
install step), the widgets' CDN scripts are turned off (the book shows each widget's static figure instead),
and the theme's assets ship with it.
"""
import os

project = "labkit"
author = "the labkit authors"
copyright = "2026, the labkit authors"
extensions = ["myst_nb"]
language = "en"

nb_execution_mode = "off"                   # executed by labkit.book, not by Sphinx
nb_ipywidgets_js = {}                       # no require.js or widget manager from a CDN
nb_merge_streams = True                     # a rank's interleaved prints read as one block
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3                    # `page.md#a-heading` links work across pages

master_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "_extra"]
html_extra_path = ["_extra"]                # the built lecture decks and their reveal.js
html_theme = "sphinx_book_theme"
html_title = "labkit: how large models are trained, measured"
html_static_path = ["_static"]
html_css_files = ["labkit-book.css"]
html_copy_source = False                    # the notebooks are in the repository; keep the site small
html_show_sourcelink = False
html_last_updated_fmt = None
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,           # its menu offers the .ipynb source, which html_copy_source drops
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
}

if os.path.isfile(os.path.join(os.path.dirname(__file__), "_static", "mathjax", "tex-chtml.js")):
    mathjax_path = "mathjax/tex-chtml.js"   # local: formulas render offline
else:
    # no local MathJax (the install step could not reach npm): formulas stay as their TeX source rather than
    # loading MathJax from a CDN when a page is viewed
    mathjax_path = "labkit-no-mathjax.js"
