"""`pdmesh serve`: Ray (embedded, or an existing cluster by address), the scenarios' pools and
the gateway, until Ctrl-C or SIGTERM; then in-flight requests finish (or end UNAVAILABLE
after the grace period), the actors stop and an embedded Ray goes with them."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal

import click

from gateway.cli import CliError
from gateway.logs import FORMATS, LEVELS
from mesh import engine_options

log = logging.getLogger(__name__)


@click.command("serve")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="scenarios YAML (scenarios:, engine:, transport:, gateway:); default: one scenario on "
                   "--model, served by one aggregated actor on all cores without accelerators, else by 1 "
                   "prefill + 1 decode actor")
@engine_options
@click.option("--mode", type=click.Choice(["disaggregated", "aggregated", "auto"]), default=None,
              help="without --config: how the default scenario serves; default: aggregated on a host without "
                   "accelerators, else disaggregated (with --config, each scenario's mode: says)")
@click.option("--served-model-name", default=None,
              help="the model name clients ask for; default: the checkpoint folder's name")
@click.option("--max-model-len", type=click.IntRange(min=2), default=None,
              help="context length in tokens (prompt + output); default: the model's")
@click.option("--ray-address", default=None, help="an existing Ray cluster ('auto' or host:port); default: embedded")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--grpc-port", type=int, default=50051, show_default=True)
@click.option("--port", "--http-port", "http_port", type=int, default=8000, show_default=True,
              help="the OpenAI-compatible HTTP API's port")
@click.option("--api-key", default=None, help="an inference key clients must send as 'Authorization: Bearer "
                                              "<key>' (adds to --api-key-file and PDMESH_API_KEYS)")
@click.option("--api-key-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="inference keys, one a line (also PDMESH_API_KEYS=k1,k2); none: inference is open")
@click.option("--admin-key-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="admin keys (also PDMESH_ADMIN_KEY); none: the admin service is off")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option("--grace-s", type=float, default=10.0, show_default=True,
              help="on shutdown, how long in-flight requests may take to finish; then they end UNAVAILABLE "
                   "(HTTP: 503, or an error event on a stream) and the process exits")
@click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True)
@click.option("--log-format", type=click.Choice(FORMATS), default="text", show_default=True,
              help="json: one JSON object a line (ts, level, logger, message, exc)")
@click.option("--access-log", is_flag=True, help="log one line per HTTP request (logger aiohttp.access)")
def serve(config_path, model, device, dtype, kv_cache_gb, mode, served_model_name, max_model_len, ray_address, host,
          grpc_port, http_port, api_key, api_key_file, admin_key_file, tls_cert, tls_key, grace_s, log_level,
          log_format, access_log):
    """Serve the mesh over gRPC and OpenAI-compatible HTTP."""
    import uvloop

    from gateway import logs
    from gateway.auth import Keys
    from gateway.server import Listen

    cfg = _config(config_path, model, device, dtype, kv_cache_gb, served_model_name, max_model_len, mode)
    logs.configure(log_level, log_format)
    try:
        keys = Keys.load(api_key_file, admin_key_file)
    except ValueError as e:
        raise CliError(str(e)) from None
    if api_key:
        keys = dataclasses.replace(keys, inference=keys.inference + (api_key,))
    listen = Listen(host, grpc_port, http_port, tls_cert, tls_key, access_log)
    uvloop.run(_serve(cfg, keys, listen, ray_address, grace_s))


def _config(config_path, model, device, dtype, kv_cache_gb, served_model_name, max_model_len, mode):
    """The config file's (or the default one on --model), with the flags that override it, and
    each scenario's checkpoint checked before Ray starts: a bad one is one line, not a failed start."""
    from gateway import config as serve_config
    from mesh import EngineError, ModelConfig, Tokenizer, default_model_dir
    from scenarios.spec import SpecError

    if config_path and mode:
        raise CliError("--mode sets the default scenario's mode; with --config, set mode: in the scenario file")
    try:
        if config_path:
            cfg = serve_config.load(config_path)
        else:
            cfg = serve_config.default(model or default_model_dir(), device, mode,
                                       engine={"dtype": dtype, "kv_cache_gb": kv_cache_gb})
        overrides = {}
        if max_model_len:
            overrides["engine"] = {**cfg.engine, "max_model_len": max_model_len}
        if served_model_name:
            overrides["served_model_name"] = served_model_name
        if overrides:
            cfg = serve_config.ServeConfig(**{**dict(cfg), **overrides})
        for folder in sorted({s.model for s in cfg.scenarios}):
            ModelConfig.from_folder(folder)
            Tokenizer(folder)
    except (SpecError, ValueError, EngineError) as e:
        raise CliError(str(e)) from None
    return cfg


async def _serve(cfg, keys, listen, ray_address: str | None, grace_s: float) -> None:
    from gateway.server import Gateway
    from mesh import connect, disconnect, tracing

    if ray_address is None:
        log.info("starting an embedded Ray")
    else:
        log.info("joining the Ray cluster at %s", ray_address)
    connect(ray_address)
    log.info("starting the actors (each loads its model: this takes a while): %s", "; ".join(
        f"{s.name}: {_actors(s)} on {cfg.served_name(s)} ({s.mode})" for s in cfg.scenarios))
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


def _actors(spec) -> str:
    """"1 prefill + 1 decode", "1 both": what a scenario starts with."""
    return " + ".join(f"{n} {role}" for role, n in (("prefill", spec.prefill), ("decode", spec.decode),
                                                    ("both", spec.both)) if n)
