"""The typer applications every command module registers on."""

import typer

app = typer.Typer(
    name="replay-bridge",
    help="Carry MoE routing from RL rollouts to the trainer: collect, check, store, replay.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks; each prints one JSON object.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
