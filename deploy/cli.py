"""The ``routeloop`` command.

    routeloop broker                      the embedded broker, with the topics created
    routeloop worker router|feedback|learner
    routeloop up                          broker and every worker, for local use
    routeloop replay [--dataset PATH]     a dataset through the whole loop, then a report
    routeloop topics                      create (if missing) and list the topics
    routeloop schemas export DIR          one JSON Schema per topic

Settings come from ``ROUTELOOP_*`` variables or ``--config FILE`` (TOML); see schemas.settings.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import click
import orjson

from schemas.settings import Settings

#: Where the shared RouterBench rows live, relative to the repository's working directory.
DEFAULT_DATASET = Path("../shared/data/routerbench-0shot")
ROUTERBENCH_HINT = """\
RouterBench was not found at {path}. To replay the real thing, download RouterBench's
published file routerbench_0shot.pkl (the dataset withmartian/routerbench on Hugging Face)
and run:  routeloop replay --dataset routerbench_0shot.pkl
Running on a small SYNTHETIC routing world instead (the report says so)."""


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]


@click.group()
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="A TOML settings file.")
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """routeloop: route prompts to LLMs through Kafka and learn online from bandit feedback."""
    ctx.ensure_object(dict)
    ctx.obj["settings"] = Settings.load(config_file=config)


@main.command()
@click.option("--port", type=int, default=None, help="Port on 127.0.0.1 (default: the bootstrap port).")
@click.pass_context
def broker(ctx: click.Context, port: int | None) -> None:
    """Start the embedded Tansu broker, create the topics, and serve until Ctrl-C."""
    from deploy.broker import run_broker

    run_broker(_settings(ctx), port)


@main.command()
@click.argument("name", type=click.Choice(["router", "feedback", "learner"]))
@click.pass_context
def worker(ctx: click.Context, name: str) -> None:
    """Run one worker in the foreground."""
    settings = _settings(ctx)
    if name == "router":
        from router.worker import run_routing_worker

        run_routing_worker(settings)
    elif name == "feedback":
        from streams.app import run_feedback_worker

        run_feedback_worker(settings)
    else:
        from streams.learner import run_learner

        run_learner(settings)


@main.command()
@click.option("--log-dir", default=".routeloop/logs", show_default=True)
@click.pass_context
def up(ctx: click.Context, log_dir: str) -> None:
    """Start the embedded broker and every worker; stop them all with Ctrl-C."""
    from deploy.local import LocalLoop

    with LocalLoop(_settings(ctx), log_dir=log_dir) as loop:
        click.echo(f"broker on {loop.settings.bootstrap_servers}; workers "
                   f"{', '.join(loop.processes)}; logs in {log_dir}; Ctrl-C stops")
        try:
            while True:
                loop.check_alive()
                time.sleep(1)
        except KeyboardInterrupt:
            pass


@main.command()
@click.pass_context
def topics(ctx: click.Context) -> None:
    """Create the topics that are missing and list them with their partitions."""
    from deploy.topics import ensure_topics

    for name, partitions in asyncio.run(ensure_topics(_settings(ctx))).items():
        click.echo(f"{name}\t{partitions}")


@main.command()
@click.option("--dataset", type=click.Path(exists=True), default=None,
              help="RouterBench folder/CSV/pickle/parquet or JSONL (default: ../shared/data/routerbench-0shot).")
@click.option("--preference", default=None, help="quality=W,cost=W (default: the settings' default).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON to this file.")
@click.option("--external", is_flag=True,
              help="Use the cluster and the running workers the settings name, instead of starting them.")
@click.option("--reward-wait-s", type=float, default=15.0, show_default=True,
              help="The reward wait window for this replay (evaluator delays average 2 s).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--log-dir", default=".routeloop/logs", show_default=True)
@click.pass_context
def replay(ctx, dataset, preference, report_path, external, reward_wait_s, seed, log_dir) -> None:
    """Replay a routing dataset through the whole loop and report what was learned."""
    from deploy.local import LocalLoop
    from deploy.replay import Replay, ReplayOptions, format_report
    from router.datasets import load_dataset, synthetic_dataset
    from schemas import Preference

    settings = _settings(ctx)
    if dataset is None and DEFAULT_DATASET.exists():
        dataset = str(DEFAULT_DATASET)
    if dataset is None:
        click.echo(ROUTERBENCH_HINT.format(path=DEFAULT_DATASET.resolve()), err=True)
        data = synthetic_dataset()
        # The synthetic prompts are bags of telling words: the hashing featuriser is the right tool.
        settings = settings.model_copy(update={"featuriser": "hashing://?dim=384"})
    else:
        click.echo(f"loading {dataset}", err=True)
        data = load_dataset(dataset)
    settings = settings.model_copy(update={"models": data.models, "reward_wait_s": reward_wait_s})
    options = ReplayOptions(
        preference=Preference.parse(preference) if preference else settings.default_preference, seed=seed)
    click.echo(f"{data.name}: {len(data.train())} train / {len(data.test())} test prompts, "
               f"{len(data.models)} models, featuriser {settings.featuriser}", err=True)

    if external:
        report = asyncio.run(Replay(settings, data, options).run())
    else:
        with LocalLoop(settings, log_dir=log_dir) as loop:
            click.echo(f"broker and workers up on {loop.settings.bootstrap_servers} (logs in {log_dir})", err=True)
            report = asyncio.run(Replay(loop.settings, data, options, watchdog=loop.check_alive).run())
            loop.check_alive()
    click.echo(format_report(report))
    if report_path:
        Path(report_path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        click.echo(f"report written to {report_path}", err=True)


@main.group()
def schemas() -> None:
    """Event contracts."""


@schemas.command("export")
@click.argument("directory", type=click.Path(file_okay=False))
def schemas_export(directory: str) -> None:
    """Write one JSON Schema per topic into DIRECTORY."""
    from schemas.export import export_json_schemas

    for path in export_json_schemas(Path(directory)):
        click.echo(str(path))


if __name__ == "__main__":
    sys.exit(main())
