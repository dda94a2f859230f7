"""cxrage-ray: the published CXR-Age model, scored reproducibly at archive scale on Ray.

The journey of a film, one folder per stage: manifest -> storage -> decode -> preprocess -> orient -> predict ->
write, wired by `pipeline` (read `pipeline/itinerary.py` top to bottom), run by `runtime`; `model` holds the
network and its weights, `pacs` DICOMweb in and SR out, `report` the analysis, `serve` the web page. `config`
(settings) and `contract` (the rows) are leaves every stage reads.
"""

__version__ = "0.1.0"
