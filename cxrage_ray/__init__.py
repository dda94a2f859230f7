"""cxrage-ray: the published CXR-Age model, scored reproducibly at archive scale on Ray."""

__version__ = "0.1.0"
