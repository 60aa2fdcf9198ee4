"""edgeopt serve: an OIP v2 (KServe v2 / Triton HTTP) inference service for one or more models."""

from __future__ import annotations

from typing import Annotated

import typer

from edgeopt.cli import app
from edgeopt.cli.common import RuntimeOpt, ThreadsOpt, err_console, user_errors


@app.command()
@user_errors
def serve(
    models: Annotated[list[str], typer.Argument(help="Models to serve, each PATH (name = file stem) or NAME=PATH.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: a free one, printed).")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most samples merged into one runtime call; 1 turns batching off.")] = 8,
    max_delay_ms: Annotated[float, typer.Option("--max-delay-ms", help="Longest a request waits for others to join its batch.")] = 5.0,
    max_request_mb: Annotated[float, typer.Option("--max-request-mb", help="Largest request body (413 above).")] = 16.0,
    queue_size: Annotated[int, typer.Option("--queue-size", help="Most requests waiting per model (503 above).")] = 256,
    runtime: RuntimeOpt = None,
    threads: ThreadsOpt = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error (JSON lines on stderr).")] = "info",
) -> None:
    """Serve models over the Open Inference Protocol v2 with dynamic batching and Prometheus /metrics."""
    from edgeopt.serve.app import ServeConfig, load_served
    from edgeopt.serve.server import run_server

    config = ServeConfig(max_batch=max_batch, max_delay_ms=max_delay_ms, max_request_mb=max_request_mb,
                         queue_size=queue_size)
    served = load_served(models, runtime=runtime, threads=threads, max_batch=max_batch)

    def announce(bound_host: str, bound_port: int) -> None:
        names = ", ".join(f"{m.name} ({m.settings.runtime}, {m.settings.threads} thr, batch<={m.max_batch})"
                          for m in served)
        typer.echo(f"edgeopt serve: listening on http://{bound_host}:{bound_port} models: {names}", nl=True)

    run_server(served, config=config, host=host, port=port, log_level=log_level, on_listening=announce)
    err_console.print("edgeopt serve: stopped")
