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
    header_timeout: Annotated[float, typer.Option("--header-timeout", help="Seconds a client has to send a request's headers (408 after; idle sockets are closed).")] = 10.0,
    body_timeout: Annotated[float, typer.Option("--body-timeout", help="Seconds a client has to send a request's body after its headers (408 after).")] = 60.0,
    max_connections: Annotated[int, typer.Option("--max-connections", help="Most open connections; above it the longest idle one is closed.")] = 1024,
    token: Annotated[str | None, typer.Option("--token", envvar="EDGEOPT_SERVE_TOKEN", show_envvar=True,
                                              help="Require 'Authorization: Bearer TOKEN' on every endpoint but /v2/health/*. Prefer the environment variable: a flag shows in ps.")] = None,
    runtime: RuntimeOpt = None,
    threads: ThreadsOpt = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error (JSON lines on stderr).")] = "info",
) -> None:
    """Serve models over the Open Inference Protocol v2 with dynamic batching and Prometheus /metrics."""
    from edgeopt.serve.app import ServeConfig, load_served
    from edgeopt.serve.server import check_fd_limit, is_loopback, run_server

    config = ServeConfig(max_batch=max_batch, max_delay_ms=max_delay_ms, max_request_mb=max_request_mb,
                         queue_size=queue_size, header_timeout_s=header_timeout, body_timeout_s=body_timeout,
                         max_connections=max_connections, token=token)
    check_fd_limit(max_connections)
    served = load_served(models, runtime=runtime, threads=threads, max_batch=max_batch)

    def announce(bound_host: str, bound_port: int) -> None:
        names = ", ".join(f"{m.name} ({m.settings.runtime}, {m.settings.threads} thr, batch<={m.max_batch})"
                          for m in served)
        typer.echo(f"edgeopt serve: listening on http://{bound_host}:{bound_port} models: {names}", nl=True)

    if not is_loopback(host) and token is None:
        err_console.print(f"edgeopt serve: warning: listening on {host} without a token; anyone who can reach it "
                          "can run the models (set EDGEOPT_SERVE_TOKEN)", markup=False)
    run_server(served, config=config, host=host, port=port, log_level=log_level, on_listening=announce)
    err_console.print("edgeopt serve: stopped")
