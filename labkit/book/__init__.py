"""The course as a book (``python -m labkit book``): every notebook executed in parallel and rendered to a static
HTML site with Sphinx and myst-nb, with a Chinese companion (``book/zh``). See :mod:`labkit.book.build`."""
from .build import BookError, build, machine_info
from .labels import notebook_number, section_label, section_labels
from .pages import split_benchmarks, stage_notebook

__all__ = ["BookError", "build", "machine_info", "notebook_number", "section_label", "section_labels",
           "split_benchmarks", "stage_notebook"]
