"""The typer applications every command module registers on."""

import typer

SETTINGS = dict(
    name="replay-bridge",
    help="Carry MoE routing from RL rollouts to the trainer: collect, check, store, replay.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app = typer.Typer(**SETTINGS)
"""The built-in commands (plugins are added to a copy: see ``replay_bridge.cli.command_line``)."""
bench_app = typer.Typer(help="Benchmarks; each prints one JSON object.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def with_builtins() -> typer.Typer:
    """A new app holding the built-in commands, for plugins to be added to."""
    whole = typer.Typer(**SETTINGS)
    whole.registered_commands = list(app.registered_commands)
    whole.registered_groups = list(app.registered_groups)
    return whole
