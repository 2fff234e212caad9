"""Duplicates, disorder and restarts give the model of the clean sequence (no broker needed).

The join and the learner are pure objects; these tests drive them with the event sequences a
broker can deliver under at-least-once processing.
"""

import numpy as np
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from router.snapshot import decode_snapshot
from schemas import ModelResponse, Preference, RewardEvent, RouteDecision
from schemas.settings import Settings
from streams.join import RewardJoiner
from streams.learner import Learner

MODELS = ("small", "large")
SETTINGS = Settings(models=MODELS, reward_wait_s=30.0, snapshot_every_n=10)
N = 60


def events(n=N, seed=0):
    """The decision, response and reward of n requests."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        model = MODELS[i % 2]
        x = rng.standard_normal(16).astype(np.float32)
        out.append((
            RouteDecision(request_id=f"q{i}", model=model, propensity=0.5, distribution={m: 0.5 for m in MODELS},
                          preference=Preference(quality=0.8, cost=0.2), features=x, featuriser="f",
                          policy="decomposed-ts", snapshot_version=0, cold_start=True, created_at=0.0),
            ModelResponse(request_id=f"q{i}", model=model, cost_usd=0.001 * (1 + i % 2), created_at=0.0),
            RewardEvent(reward_id=f"r{i}", request_id=f"q{i}", quality=float(rng.random() < 0.7), created_at=0.0),
        ))
    return out


def join(sequence):
    joiner = RewardJoiner.from_settings({}, SETTINGS)
    outcomes = []
    handlers = {RouteDecision: joiner.on_decision, ModelResponse: joiner.on_response, RewardEvent: joiner.on_reward}
    for t, event in enumerate(sequence):
        outcomes += handlers[type(event)](event, now=float(t) * 0.01).outcomes
    return joiner, outcomes


def learn(outcomes):
    learner = Learner(SETTINGS)
    for offset, outcome in enumerate(outcomes):
        learner.apply(outcome, offset)
    return learner


def test_every_event_twice_and_shuffled_gives_the_clean_model():
    clean_sequence = [e for triple in events() for e in triple]
    _, clean = join(clean_sequence)
    dirty_sequence = clean_sequence * 2
    np.random.default_rng(1).shuffle(dirty_sequence)  # 360 events, all within one wait window
    joiner, dirty = join(dirty_sequence)

    assert len(clean) == len(dirty) == N
    assert joiner.counters.duplicates >= N  # every second copy was refused
    key = lambda o: (o.request_id, o.model, o.quality, o.cost_usd)  # noqa: E731
    assert sorted(map(key, dirty)) == sorted(map(key, clean))

    a, b = learn(clean).policy, learn(dirty).policy
    # The same outcomes in another order: the same sums up to float rounding, the same decisions.
    for name, array in a.arrays().items():
        np.testing.assert_allclose(b.arrays()[name], array, rtol=1e-12, atol=1e-12)
    X = np.random.default_rng(2).standard_normal((50, 16))
    for w in (1.0, 0.5, 0.0):
        assert (a.greedy(X, w) == b.greedy(X, w)).all()


def test_a_re_emitted_outcome_is_applied_once():
    _, outcomes = join([e for triple in events() for e in triple])
    with_repeats = []
    for outcome in outcomes:
        with_repeats.append(outcome)
        if outcome.request_id.endswith("3"):
            with_repeats.append(outcome)  # the feedback worker crashed after emitting it
    clean, repeated = learn(outcomes), learn(with_repeats)
    assert repeated.duplicates == sum(o.request_id.endswith("3") for o in outcomes)
    assert repeated.policy.n_updates == N
    for name, array in clean.policy.arrays().items():
        assert np.array_equal(repeated.policy.arrays()[name], array)


def test_a_restarted_learner_reaches_the_state_of_one_that_never_stopped():
    _, outcomes = join([e for triple in events() for e in triple])
    uninterrupted = learn(outcomes)

    first = Learner(SETTINGS)
    for offset, outcome in enumerate(outcomes[:25]):
        first.apply(outcome, offset)
    frame = first.snapshot_frame()  # then the learner is killed
    restarted = Learner(SETTINGS)
    restarted.restore(frame)
    for offset in range(restarted.offset + 1, len(outcomes)):
        restarted.apply(outcomes[offset], offset)

    expected = decode_snapshot(uninterrupted.snapshot_frame()).header
    got = decode_snapshot(restarted.snapshot_frame()).header
    assert (got.outcomes_offset, got.n_updates) == (expected.outcomes_offset, expected.n_updates) == (N - 1, N)
    assert got.sha256 == expected.sha256


# -- the join state held back until its outcomes are acknowledged (streams.app.TableState) --------


class ChangelogTable:
    """What TableState uses of a Faust Table: ``data``, and writes that go to a changelog."""

    def __init__(self, changelog=()):
        self.data, self.changelog = {}, []
        for key, value in changelog:  # recovery: the changelog replayed
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value

    def __setitem__(self, key, value):
        self.data[key] = value
        self.changelog.append((key, value))

    def __delitem__(self, key):
        del self.data[key]
        self.changelog.append((key, None))


@hsettings(max_examples=60, deadline=None)
@given(st.data())
def test_a_crash_before_the_outcomes_are_acknowledged_loses_none(data):
    """Kill the worker at any event with any subset of its outcomes acknowledged: the state
    recovered from the changelog, fed the events from the first one whose outcome was not
    acknowledged (the committed offset is at most there, see FeedbackWorker._release_when_acked),
    emits every outcome that was not acknowledged."""
    import weakref

    from faust.streams import _current_event

    from streams.app import TableState, _StandInEvent

    sequence = [e for triple in events(20, seed=3) for e in triple]
    sequence = data.draw(st.permutations(sequence), label="order")
    crash_at = data.draw(st.integers(0, len(sequence)), label="events before the crash")

    def run(table, todo):
        """Join ``todo`` as the worker does; (index, outcomes, held keys) of every close."""
        state = TableState(table, "decisions")
        joiner = RewardJoiner.from_settings(state, SETTINGS)
        handlers = {RouteDecision: joiner.on_decision, ModelResponse: joiner.on_response,
                    RewardEvent: joiner.on_reward}
        closes = []
        for i, event in todo:
            stand_in = _StandInEvent("decisions", 0)  # inside the event of partition 0
            token = _current_event.set(weakref.ref(stand_in))
            try:
                with state.holding() as closed:
                    result = handlers[type(event)](event, float(i) * 0.01)
            finally:
                _current_event.reset(token)
            assert [o.request_id for o in result.outcomes] == closed  # only closes are held
            if closed:
                closes.append((i, result.outcomes, closed))
        return state, closes

    table = ChangelogTable()
    state, closes = run(table, list(enumerate(sequence))[:crash_at])
    acked = data.draw(st.sets(st.sampled_from(range(len(closes))) if closes else st.nothing()), label="acked")
    emitted = set()
    for n, (_, outcomes, closed) in enumerate(closes):
        if n in acked:
            emitted |= {o.request_id for o in outcomes}
            for key in closed:
                state.release(key)
    # Never in the changelog: a tombstone whose outcome was not acknowledged.
    assert {k for k, v in table.changelog if v and "closed_at" in v} <= emitted

    unacked = [i for n, (i, _, _) in enumerate(closes) if n not in acked]
    committed = min(unacked, default=crash_at)
    _, after = run(ChangelogTable(table.changelog), list(enumerate(sequence))[committed:])
    emitted |= {o.request_id for _, outcomes, _ in after for o in outcomes}
    assert emitted == {f"q{i}" for i in range(20)}


class _Topic:
    """A Faust topic whose sends stay in flight until the test settles them."""

    def __init__(self):
        self.sent = []

    async def send(self, key, value):
        import asyncio

        self.sent.append(asyncio.get_running_loop().create_future())
        return self.sent[-1]


async def test_a_failed_outcome_produce_keeps_the_join_pending_and_its_event_unacknowledged():
    """FeedbackWorker._settle: the closing event's outcome produce fails, so the held tombstone is
    discarded (the changelog keeps the pending entry a replay joins again), the event is never
    acknowledged (its offset is never committed) and the worker crashes for a restart. The same
    close acknowledged writes the tombstone and acknowledges the event."""
    import asyncio
    import weakref
    from types import SimpleNamespace

    from aiokafka.errors import KafkaTimeoutError
    from faust.streams import _current_event
    from faust.types.tuples import ConsumerMessage

    from schemas.codec import encode
    from streams.app import FeedbackWorker, TableState, _StandInEvent

    async def close_one(settle):
        crashes, acked = [], []
        app = SimpleNamespace(
            consumer=SimpleNamespace(ack=lambda message: acked.append(message.offset) or True),
            sensors=SimpleNamespace(on_message_out=lambda *args: None),
            should_stop=False,
        )

        async def crash(exc):
            crashes.append(exc)

        app.crash = crash
        table = ChangelogTable()
        state = TableState(table, SETTINGS.topic("decisions"))
        outcomes = _Topic()
        worker = FeedbackWorker(app, SETTINGS, RewardJoiner.from_settings(state, SETTINGS), state=state,
                                worker_name="test", outcomes_topic=outcomes, deadletter_topic=_Topic())
        for offset, (short, event) in enumerate(zip(("decisions", "responses", "rewards"), events(1)[0])):
            topic = SETTINGS.topic(short)
            message = ConsumerMessage(topic, 0, offset, 0.0, 0, [], b"q0", encode(event), None)
            message.incref()  # the stream's reference, dropped as it moves on
            current = _StandInEvent(topic, 0)  # the agent's event, with its message
            current.message = message
            token = _current_event.set(weakref.ref(current))
            try:
                await worker.handle(topic, 0, offset, b"q0", encode(event))
            finally:
                _current_event.reset(token)
            message.ack(app.consumer)
        assert len(outcomes.sent) == 1 and state.held() == 1  # the reward closed the join
        assert not [v for _, v in table.changelog if v and "closed_at" in v]
        settle(outcomes.sent[0])
        await asyncio.sleep(0)  # the done callbacks
        await asyncio.sleep(0)  # the crash task
        return state, table, acked, crashes

    state, table, acked, crashes = await close_one(lambda f: f.set_exception(KafkaTimeoutError()))
    assert state.held() == 0
    assert "closed_at" not in table.data["q0"]  # still pending: a replayed reward joins again
    assert acked == [0, 1]  # the decision and the response; never the reward
    assert [type(e) for e in crashes] == [KafkaTimeoutError]

    state, table, acked, crashes = await close_one(lambda f: f.set_result(None))
    assert state.held() == 0 and "closed_at" in table.data["q0"]
    assert acked == [0, 1, 2] and crashes == []
