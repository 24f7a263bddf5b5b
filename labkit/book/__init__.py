"""The course as a book (``python -m labkit book``): every notebook executed and rendered to static HTML."""
from .labels import notebook_number, section_label, section_labels

__all__ = ["notebook_number", "section_label", "section_labels"]
