"""Model releases without an engine: the pure picks, the rollback rule, and the release book
on a real database (SQLite and PostgreSQL). The fleet tests (test_model_releases.py) run the
same rules through real workers and vLLM."""

from __future__ import annotations

import asyncio
import random

import pytest
from sqlalchemy import Engine

from coordinator.errors import InvalidRequest, ModelNotFound
from coordinator.observability import Metrics
from coordinator.services.releases.book import AUTO, ReleaseBook
from coordinator.services.releases.health import Window, WindowStats, rollback_reason
from coordinator.services.releases.policy import (
    ROLLED_BACK,
    Release,
    RollbackPolicy,
    Version,
    split_ref,
    sticky_draw,
)
from coordinator.store import audit_store


def release(*weights: int, sticky: bool = False) -> Release:
    versions = tuple(
        Version("chat", f"v{i + 1}", f"tiny-v{i + 1}", weight=w) for i, w in enumerate(weights)
    )
    return Release("chat", "v1", versions, sticky=sticky)


def test_a_canary_takes_its_weight_of_draws() -> None:
    rng = random.Random(7)
    picks = [release(80, 20).pick(rng.random()).version for _ in range(10_000)]
    share = picks.count("v2") / len(picks)
    assert abs(share - 0.2) < 4 * (0.2 * 0.8 / len(picks)) ** 0.5  # 4 standard deviations


def test_without_weights_the_stable_version_serves() -> None:
    assert release(0, 0).pick(0.99).version == "v1"
    both = (Version("chat", "v1", "a", 0), Version("chat", "v2", "b", 100, state=ROLLED_BACK))
    rolled = Release("chat", "v1", both)
    assert rolled.pick(0.5).version == "v1"


def test_a_keys_draw_is_fixed_and_keys_spread() -> None:
    assert sticky_draw("chat", "key-1") == sticky_draw("chat", "key-1")
    draws = [sticky_draw("chat", f"key-{i}") for i in range(2_000)]
    assert 0.45 < sum(d < 0.5 for d in draws) / len(draws) < 0.55


def test_refs() -> None:
    assert split_ref("chat@v2") == ("chat", "v2")
    assert split_ref("chat") == ("chat", None)
    assert split_ref("@v2") == ("@v2", None)


def stats(requests: int, failed: int, p95: float | None = 0.1) -> WindowStats:
    return WindowStats(requests, failed, p95, p95)


@pytest.mark.parametrize(
    ("candidate", "stable", "rolled"),
    [
        (stats(19, 19), stats(100, 0), False),  # below the minimum sample
        (stats(20, 4), stats(100, 0), True),  # 20 % > 1 %, stable 0 %
        (stats(20, 1), stats(100, 0), False),  # 5 %, but 1 in 20 may be chance at 1 %
        (stats(100, 1), stats(100, 0), False),  # 1 % is not above 1 %
        (stats(100, 5), stats(100, 3), False),  # 5 % < 2 x 3 %
        (stats(100, 12), stats(100, 3), True),
        (stats(20, 3), stats(200, 9), False),  # 15 % vs 4.5 %: 3 in 20 happens by chance
        (stats(100, 0, 0.5), stats(100, 0, 0.2), True),  # TTFT p95 2.5x stable
        (stats(99, 0, 0.5), stats(200, 0, 0.2), False),  # a p95 of 99 samples is too noisy
        (stats(100, 0, 0.5), stats(50, 0, 0.2), False),  # and so is the stable's
    ],
)
def test_rollback_rule(candidate: WindowStats, stable: WindowStats, rolled: bool) -> None:
    assert (rollback_reason(candidate, stable, RollbackPolicy()) is not None) is rolled


def test_a_window_forgets_what_is_older_than_its_span() -> None:
    window = Window(10.0)
    window.add(0.0, True, None)
    window.add(5.0, False, 0.2)
    assert window.stats(9.0).requests == 2
    later = window.stats(12.0)
    assert (later.requests, later.failed, later.ttft_p95_s) == (1, 0, 0.2)


@pytest.fixture
def book(engine: Engine) -> ReleaseBook:
    return ReleaseBook(engine, metrics=Metrics(), rng=random.Random(1))


def versions(*weights: int) -> list[Version]:
    return [Version("", f"v{i + 1}", f"tiny-v{i + 1}", weight=w) for i, w in enumerate(weights)]


async def test_a_failing_canary_is_rolled_back_and_the_books_say_why(
    book: ReleaseBook, engine: Engine
) -> None:
    policy = RollbackPolicy(min_requests=5, window_s=60)
    await book.create("chat", versions(90, 10), "v1", "test", policy)
    targets = book.targets("chat@v2", "k")
    assert targets is not None
    assert targets[0].shown == "chat@v2"
    for _ in range(10):
        book.observe(book.targets("chat@v1", "k")[0], failed=False, ttft_s=0.1)  # type: ignore[index]
    for i in range(5):
        assert book.get("chat").version("v2").weight == 10, i  # type: ignore[union-attr]
        book.observe(targets[0], failed=True, ttft_s=None)
    v2 = book.get("chat").version("v2")  # type: ignore[union-attr]
    assert v2 is not None
    assert (v2.weight, v2.state) == (0, ROLLED_BACK)
    picks = {t[0].shown for _ in range(200) if (t := book.targets("chat", "k"))}
    assert picks == {"chat@v1"}  # nothing goes to the rolled-back version any more
    history = await book.history("chat")
    assert history[0]["kind"] == "rolled_back"
    assert history[0]["actor"] == AUTO
    assert "error rate 100.0% over 5 requests" in history[0]["detail"]["reason"]
    actions = [e["action"] for e in audit_store.latest(engine, 5)]
    assert actions[0] == "model.rolled_back"
    assert "model.created" in actions
    reloaded = ReleaseBook(engine)
    reloaded.load()
    assert reloaded.get("chat") == book.get("chat")  # the rollback is in the database


async def test_a_canary_falls_back_to_the_stable_version(book: ReleaseBook) -> None:
    await book.create("chat", versions(0, 100), "v1", "test")
    targets = book.targets("chat", "k")
    assert targets is not None
    assert [(t.shown, t.canary) for t in targets] == [("chat@v2", True), ("chat@v1", False)]


async def test_sticky_keys_stay_on_one_version(book: ReleaseBook) -> None:
    await book.create("chat", versions(50, 50), "v1", "test")
    await book.release("chat", "test", sticky=True)
    seen = {}
    for key in (f"key-{i}" for i in range(40)):
        picks = {t[0].shown for _ in range(10) if (t := book.targets("chat", key))}
        assert len(picks) == 1
        seen[key] = picks.pop()
    assert set(seen.values()) == {"chat@v1", "chat@v2"}


async def test_operators_changes_are_checked(book: ReleaseBook) -> None:
    await book.create("chat", versions(100), "v1", "test")
    with pytest.raises(InvalidRequest):
        await book.create("chat", versions(100), "v1", "test")
    with pytest.raises(InvalidRequest):
        await book.release("chat", "test", weights={"v9": 1})
    with pytest.raises(InvalidRequest):
        await book.roll_back("chat", "test", "v1")  # the stable version
    with pytest.raises(ModelNotFound):
        book.targets("chat@v9", "k")
    assert book.targets("tiny", "k") is None  # not a catalogue name: served as asked


async def test_a_pinned_tokenizer_must_be_the_one_the_network_recounts_with(
    engine: Engine,
) -> None:
    digest = "a" * 64
    book = ReleaseBook(engine, tokenizer_of=lambda served: digest if served == "tiny-v1" else None)
    pinned = [Version("", "v1", "tiny-v1", tokenizer_sha256=digest)]
    await book.create("chat", pinned, "v1", "test")
    with pytest.raises(InvalidRequest, match="recounts `tiny-v2` with none"):
        await book.add_version("chat", Version("", "v2", "tiny-v2", tokenizer_sha256=digest), "t")
    wrong = [Version("", "v1", "tiny-v1", tokenizer_sha256="b" * 64)]
    with pytest.raises(InvalidRequest, match="pins tokenizer"):
        await book.create("other", wrong, "v1", "test")


async def test_promotion_moves_all_traffic_and_keeps_history(book: ReleaseBook) -> None:
    await book.create("chat", versions(95, 5), "v1", "test")
    await book.promote("chat", "v2", "test")
    assert book.get("chat").stable == "v2"  # type: ignore[union-attr]
    assert {t[0].shown for _ in range(50) if (t := book.targets("chat", "k"))} == {"chat@v2"}
    kinds = [e["kind"] for e in await book.history("chat")]
    assert kinds == ["promoted", "created"]


async def test_another_process_sees_a_change_within_its_refresh(engine: Engine) -> None:
    mine, theirs = ReleaseBook(engine), ReleaseBook(engine, refresh_s=0.05)
    theirs.load()
    fresh = asyncio.create_task(theirs.keep_fresh())
    try:
        await mine.create("chat", versions(100), "v1", "test")
        for _ in range(250):  # 5 s
            if theirs.get("chat") is not None:
                break
            await asyncio.sleep(0.02)
        assert theirs.get("chat") is not None
    finally:
        fresh.cancel()
