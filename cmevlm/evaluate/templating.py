"""The evaluation's HTML pages (report, expert sheet) from Jinja templates, escaped by default,
as the review app's pages are."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def _env():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    return Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html"]))


def render(template: str, **context) -> str:
    return _env().get_template(template).render(**context)
