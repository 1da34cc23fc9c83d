"""The `pdmesh` console script: serving, the ops CLI and benchmarks.

Subcommands are imported on first use, so that the ops commands start fast and
never import torch.
"""
from __future__ import annotations

import importlib

import click


class LazyGroup(click.Group):
    """A click group whose subcommands live in other modules ("module:attr")."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self._lazy:
            module_name, attr = self._lazy[name].split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, name)


class CliError(click.ClickException):
    """A command's failure as one line, `pdmesh: error: <what to fix>` (exit 1), with no traceback."""

    def show(self, file=None) -> None:
        click.echo(f"pdmesh: error: {self.format_message()}", file=file, err=file is None)


OPS = ("status", "ratio", "controller", "flip", "drain", "add", "remove", "decisions")


@click.group(cls=LazyGroup, lazy={"generate": "mesh.engine.cli:generate", "sim": "simtests.cli:command",
                                      "serve": "gateway.serve:serve", "what-if": "gateway.whatif_cli:what_if",
                                      "doctor": "gateway.doctor:doctor", "config": "gateway.config_check:config",
                                      **{name: f"gateway.ops:{name}" for name in OPS}})
@click.version_option(package_name="pdmesh")
def main() -> None:
    """pdmesh: a disaggregated prefill/decode serving mesh for LLMs."""


@main.group(cls=LazyGroup, lazy={"init": "mesh.engine.random_checkpoint:init_command"})
def model() -> None:
    """Model checkpoints."""


@main.group(
    cls=LazyGroup,
    lazy={
        "chaos": "gateway.chaos:command",
        "converge": "gateway.bench_converge:command",
        "engine": "mesh.engine.bench:command",
        "gateway": "gateway.bench:command",
        "mesh": "mesh.bench:command",
        "serve": "gateway.bench_serve:command",
        "transport": "transport.bench:command",
    },
)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Benchmarks: each prints a table, or one JSON object with --output json; progress goes
    to stderr (bars on a terminal, a line per phase otherwise)."""
    from gateway import progress

    ctx.with_resource(progress.shown(ctx.invoked_subcommand or ""))


if __name__ == "__main__":
    main()
