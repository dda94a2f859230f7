"""`cxrage serve`: the web page and scoring API on Ray Serve.

    config.py   ServeConfig (frozen): weights, host/port, limits, batching, Ray
    uploads.py  request body -> multipart parts, in memory, size-limited
    scoring.py  Upload -> prepared row -> scored result object (the batch scorer's stage functions; no Ray)
    prepare.py  FilmPreparer: the deployment that decodes, runs the seed chain and orientation (one film a call)
    model.py    FilmScorer: the model deployment, films batched across requests with @serve.batch
    app.py      ScoreAPI: the FastAPI ingress (page, /v1/score, /v1/model, /healthz, /docs)
    run.py      start Ray + Serve, run until SIGINT/SIGTERM, shut down
    static/     index.html, app.js, app.css: the page, served by the app itself (works offline)
"""
