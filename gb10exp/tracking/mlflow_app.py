"""``mlflow ui --app-name gb10exp-ui``: MLflow's own server with one change, so that gb10exp's link opens on
the comparison in a browser that has never seen MLflow (no click needed).

MLflow 3.17 decides two things in the browser from localStorage, which no server option, environment
variable or experiment tag reaches (read from its JS bundle; docs/identity_and_ui.md):
- ``mlflow.workflowType_v1``, the layout: unset means ``"genai"`` (sidebar Traces/Sessions/Judges/Prompts, a
  run's page titled "Evaluations"); only the sidebar's "GenAI | Model training" toggle writes it;
- ``mlflow.assistant.fab.autoOpenedOnFirstLoad_v1``: unset, the "MLflow Assistant" panel opens by itself on
  the first load from localhost/127.0.0.1, taking ~400 of 1600 pixels and hiding two metric columns.
This app serves MLflow's ``index.html`` with a script first in its ``<head>`` that sets both keys before
MLflow's bundle runs, only when unset (a user who later picks GenAI or opens the Assistant keeps that).
Everything else (REST API, security middleware, static files, the Assistant's routes) is MLflow's. It relies
on two MLflow internals, the Flask view name ``serve`` and the two key names; tests/test_ui.py renders the
page in Chromium and fails when an upgrade breaks either.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)

APP_NAME = "gb10exp-ui"  # the entry point in pyproject.toml, group mlflow.app
DEFAULTS = {
    "mlflow.workflowType_v1": "machine_learning",  # the "Model training" layout
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,  # "already auto-opened once": it stays closed
}
# MLflow's useLocalStorage stores JSON values: "machine_learning" with its quotes, true without.
SEED = (
    "<script>(function(){try{var s=window.localStorage,d="
    + json.dumps({k: json.dumps(v) for k, v in DEFAULTS.items()})
    + ";for(var k in d){if(s.getItem(k)===null)s.setItem(k,d[k]);}}catch(e){}})();</script>"
)


def seeded_index(html: str) -> str:
    """MLflow's index.html with the seeding script first in its head (unchanged when there is no head)."""
    if "<head>" not in html:
        log.warning("gb10exp-ui: MLflow's index.html has no <head>: the UI opens on MLflow's own defaults")
        return html
    return html.replace("<head>", "<head>" + SEED, 1)


def create_app():
    """The factory ``mlflow ui --app-name gb10exp-ui`` imports (as MLflow's basic-auth app does)."""
    from flask import Response
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app

    original = app.view_functions["serve"]  # the "/" route of mlflow.server: send index.html
    index = os.path.join(app.static_folder, "index.html")

    def serve():
        if not os.path.exists(index):  # a source install without the built UI: MLflow's own message
            return original()
        with open(index, encoding="utf-8") as f:
            return Response(seeded_index(f.read()), mimetype="text/html")

    app.view_functions["serve"] = serve
    if _MLFLOW_SGI_NAME.get() == "uvicorn":  # `mlflow ui`'s default server: MLflow's FastAPI wrapper
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(app)
    return app
