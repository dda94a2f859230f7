"""One rule names the weights for every output (batch rows, records, served answers): `demo`, the published
model's registry id, or the weights file's name."""

from __future__ import annotations

from pathlib import Path

from cxrage_ray.model.registry import DEFAULT_MODEL, DEMO_WEIGHTS_NAME, ResolvedWeights, weights_label, weights_name


def test_demo_is_named_demo_and_anything_else_by_what_it_resolves_to():
    demo_file = ResolvedWeights(Path("/home/u/.cache/demo-random-seed0.pth"), "0" * 64, "explicit")
    assert weights_label("demo") == DEMO_WEIGHTS_NAME == "demo"
    assert weights_name(weights_label("demo"), demo_file) == "demo"
    assert weights_label("/w/PLCO_like.pth") is None and weights_label(None) is None
    assert weights_name(None, ResolvedWeights(Path("/w/PLCO_like.pth"), "1" * 64, "explicit")) == "PLCO_like.pth"
    for source in ("cache", "fetched"):
        assert weights_name(None, ResolvedWeights(Path("/cache/x.pth"), "2" * 64, source)) == DEFAULT_MODEL
