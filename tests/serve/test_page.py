"""The served page says when its answers come from the demo weights: the report's own banner, nothing else
changed; with real weights the page is the static file as it is. No Ray started."""

from __future__ import annotations

from importlib.resources import files

import pytest

pytest.importorskip("fastapi")

from cxrage_ray.model.registry import DEMO_WEIGHTS_NAME  # noqa: E402
from cxrage_ray.report.page import demo_banner_html  # noqa: E402
from cxrage_ray.serve.app import page_html  # noqa: E402

INDEX = (files("cxrage_ray.serve") / "static" / "index.html").read_text(encoding="utf-8")


def test_demo_weights_open_the_page_with_the_reports_banner():
    page = page_html(INDEX, DEMO_WEIGHTS_NAME)
    banner = demo_banner_html()
    assert 'id="demo-weights-banner"' in banner and "DEMO WEIGHTS" in banner and "#b00020" in banner
    assert page.index(banner) > page.index("<body>") and page.index(banner) < page.index("<h1>")
    assert page.replace(banner, "").replace("<body>\n", "<body>", 1) == INDEX


def test_real_weights_leave_the_page_as_it_is():
    assert page_html(INDEX, "plco-fine-tuned-120419") == INDEX == page_html(INDEX, None)
