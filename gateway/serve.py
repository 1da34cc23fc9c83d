"""`pdmesh serve`: Ray (embedded, or an existing cluster by address), the scenarios' pools and
the gateway, until Ctrl-C or SIGTERM; then in-flight requests finish (or end UNAVAILABLE
after the grace period), the actors stop and an embedded Ray goes with them."""
from __future__ import annotations

import asyncio
import logging
import signal

import click

from mesh import engine_options

log = logging.getLogger(__name__)


@click.command("serve")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="scenarios YAML (scenarios:, engine:, transport:, gateway:); default: one scenario, "
                   "1 prefill + 1 decode actor on --model")
@engine_options
@click.option("--ray-address", default=None, help="an existing Ray cluster ('auto' or host:port); default: embedded")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--grpc-port", type=int, default=50051, show_default=True)
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--api-key-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="inference keys, one a line (also PDMESH_API_KEYS=k1,k2); none: inference is open")
@click.option("--admin-key-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="admin keys (also PDMESH_ADMIN_KEY); none: the admin service is off")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option("--grace-s", type=float, default=10.0, show_default=True,
              help="on shutdown, how long in-flight requests may take to finish; then they end UNAVAILABLE "
                   "(HTTP: 503, or an error event on a stream) and the process exits")
def serve(config_path, model, device, dtype, kv_cache_gb, ray_address, host, grpc_port, http_port, api_key_file,
          admin_key_file, tls_cert, tls_key, grace_s):
    """Serve the mesh over gRPC and OpenAI-compatible HTTP."""
    import uvloop

    from gateway import config as serve_config
    from gateway.auth import Keys
    from gateway.server import Listen
    from mesh import default_model_dir
    from scenarios.spec import SpecError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if config_path:
            cfg = serve_config.load(config_path)
        else:
            cfg = serve_config.default(model or default_model_dir(), device,
                                       engine={"dtype": dtype, "kv_cache_gb": kv_cache_gb})
        keys = Keys.load(api_key_file, admin_key_file)
    except (SpecError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    listen = Listen(host, grpc_port, http_port, tls_cert, tls_key)
    uvloop.run(_serve(cfg, keys, listen, ray_address, grace_s))


async def _serve(cfg, keys, listen, ray_address: str | None, grace_s: float) -> None:
    from gateway.server import Gateway
    from mesh import connect, disconnect, tracing

    connect(ray_address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(cfg, keys, listen)
    try:
        starting = asyncio.create_task(gateway.start())
        await asyncio.wait([starting, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a failed start ends here, with its error
            a = gateway.addresses
            click.echo(f"pdmesh: serving {', '.join(gateway.service.models())} "
                       f"(scenarios: {', '.join(gateway.fleet.scenarios)})\n"
                       f"  gRPC  {a['grpc']}  (pdmesh.v1.Inference, pdmesh.v1.Admin, health, reflection)\n"
                       f"  HTTP  {a['http']}/v1  (OpenAI completions, chat), {a['http']}/health, "
                       f"{a['http']}/metrics\n  Ctrl-C stops", err=True)
            await stop.wait()
        else:
            starting.cancel()
        click.echo("pdmesh: shutting down", err=True)
    finally:
        await gateway.stop(grace_s)
        tracing.shutdown()
        disconnect()
