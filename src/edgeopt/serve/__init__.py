"""Inference microservice: Open Inference Protocol v2 over HTTP, dynamic batching, metrics.

``edgeopt serve MODEL...`` loads each model with its stored runtime, then serves
``/v2/models/{name}/infer`` (JSON tensors or the binary tensor extension) to any OIP v2 client.
FastAPI, uvicorn and prometheus-client are imported only when a server is built.
"""

from edgeopt.serve.app import ServeConfig, ServedModel, create_app, load_served
from edgeopt.serve.server import run_server

__all__ = ["ServeConfig", "ServedModel", "create_app", "load_served", "run_server"]
