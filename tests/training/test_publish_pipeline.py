"""The training run (load → tune → fit → evaluate → refit → publish) with a tiny model,
against real Redis and the emulator's S3."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tests.training.tinymodel import Interaction, OtherTiny, TinyModel
from training.base import Model
from training.pipeline import DataPlan, ModelSpec, Reporter, Tuned, run_training
from training.publish import DataRange, ModelRegistry

LOG: list[Interaction] = [
    ("u1", "a", 100.0),
    ("u2", "a", 110.0),
    ("u3", "b", 120.0),
    ("u1", "c", 130.0),
    ("u2", "a", 200.0),
    ("u4", "b", 210.0),
]
CUT = 150.0


def describe(log: list[Interaction]) -> DataRange:
    times = [t for _, _, t in log]
    return DataRange(
        source="tiny",
        start=min(times, default=None),
        end=max(times, default=None),
        rows=len(log),
        users=len({u for u, _, _ in log}),
        items=len({i for _, i, _ in log}),
    )


def hit_rate(
    model: Model, train: list[Interaction], held_out: list[Interaction]
) -> dict[str, float]:
    top = {item for item, _ in model.recommend([], 1)}
    return {"hr@1": sum(item in top for _, item, _ in held_out) / len(held_out)}


def plan(load: Any = None) -> DataPlan[list[Interaction]]:
    return DataPlan(
        source="tiny log",
        load=load or (lambda: list(LOG)),
        split=lambda log: ([r for r in log if r[2] < CUT], [r for r in log if r[2] >= CUT]),
        describe=describe,
        evaluate=hit_rate,
    )


class Recorder(Reporter):
    def __init__(self) -> None:
        self.events: list[tuple[str | None, str, bool]] = []
        self.published: list[tuple[str, str, int]] = []

    def stage_finished(self, model: str | None, stage: str, seconds: float, ok: bool) -> None:
        assert seconds >= 0
        self.events.append((model, stage, ok))

    def publish_progress(self, model: str) -> Any:
        return lambda stage, n, total: self.published.append((model, stage, n))


def tiny(params: Mapping[str, Any]) -> Model:
    return TinyModel(**params)


async def test_run_tunes_fits_evaluates_refits_and_publishes(registry: ModelRegistry) -> None:
    seen_by_tuner: list[list[Interaction]] = []

    def tune(train: list[Interaction]) -> Tuned:
        seen_by_tuner.append(train)
        return Tuned(params={"extra": 2}, record={"trials": [{"extra": 2, "hr@1": 1.0}]})

    recorder = Recorder()
    report = await run_training(
        plan(),
        [ModelSpec("tiny", tiny, tune), ModelSpec("other", lambda p: OtherTiny())],
        registry,
        reporter=recorder,
    )

    assert report.ok
    assert report.data == describe(LOG)
    # the tuner saw the training part only, never the held-out part
    assert seen_by_tuner == [[r for r in LOG if r[2] < CUT]]
    tiny_outcome, other_outcome = report.models
    # fitted on the training part, "a" is the top item; held out: a, b -> 1/2
    assert tiny_outcome.metrics == {"hr@1": 0.5}
    assert tiny_outcome.params == {"fail_after": None, "extra": 2}
    assert tiny_outcome.published is not None
    assert tiny_outcome.published.current
    assert tiny_outcome.published.data["rows"] == len(LOG)  # refit on the whole log
    assert set(tiny_outcome.timings) == {"tune", "fit", "evaluate", "refit", "publish"}
    assert set(other_outcome.timings) == {"fit", "evaluate", "refit", "publish"}
    assert (None, "load", True) in recorder.events
    assert ("tiny", "publish", True) in recorder.events
    assert ("tiny", "records", 5) in recorder.published

    manifest = await registry.manifest("tiny", tiny_outcome.published.version)
    assert manifest["search"] == {"trials": [{"extra": 2, "hr@1": 1.0}]}
    assert manifest["metrics"] == {"hr@1": 0.5}
    assert manifest["extra"]["evaluation"]["held_out"]["rows"] == 2
    assert manifest["redis"]["records"] == 5
    assert await registry.names() == ["other", "tiny"]
    assert report.as_dict()["models"][0]["version"] == tiny_outcome.published.version


async def test_without_tuning_each_model_is_built_with_its_defaults(
    registry: ModelRegistry,
) -> None:
    def tune(train: list[Interaction]) -> Tuned:
        raise AssertionError("tune=False must not search")

    report = await run_training(plan(), [ModelSpec("tiny", tiny, tune)], registry, tune=False)
    assert report.ok
    assert report.models[0].params == {"fail_after": None, "extra": 0}  # the defaults
    assert "tune" not in report.models[0].timings
    # a spec's own defaults (the harness's, e.g. item-to-item's shrink) win over the
    # model class's: `recstream train --no-tune` builds what `evaluate --no-tune` measures
    spec = ModelSpec("tiny", tiny, tune, defaults={"extra": 3})
    report = await run_training(plan(), [spec], registry, tune=False)
    assert report.models[0].params == {"fail_after": None, "extra": 3}


async def test_without_refit_the_evaluated_model_is_published(registry: ModelRegistry) -> None:
    report = await run_training(plan(), [ModelSpec("tiny", tiny)], registry, refit=False)
    published = report.models[0].published
    assert published is not None
    assert published.data["rows"] == 4
    assert "refit" not in report.models[0].timings


async def test_a_failing_model_keeps_its_old_version_and_the_others_publish(
    registry: ModelRegistry,
) -> None:
    first = await run_training(plan(), [ModelSpec("tiny", tiny)], registry)
    serving = first.models[0].published
    assert serving is not None

    report = await run_training(
        plan(),
        [
            ModelSpec("tiny", lambda p: TinyModel(fail_after=1)),
            ModelSpec("other", lambda p: OtherTiny()),
        ],
        registry,
    )
    assert not report.ok
    broken, other = report.models
    assert broken.error is not None
    assert broken.error.startswith("publish:")
    assert broken.published is None
    assert other.error is None
    assert other.published is not None
    assert await registry.current("tiny") == serving.version
    assert [v.version for v in await registry.versions("tiny")] == [serving.version]


async def test_a_failing_load_publishes_nothing(registry: ModelRegistry) -> None:
    def load() -> list[Interaction]:
        raise FileNotFoundError("no archive files between the dates")

    report = await run_training(plan(load), [ModelSpec("tiny", tiny)], registry)
    assert not report.ok
    assert report.error is not None
    assert "no archive files" in report.error
    assert report.models == []
    assert await registry.names() == []


async def test_no_promote_publishes_without_switching(registry: ModelRegistry) -> None:
    first = await run_training(plan(), [ModelSpec("tiny", tiny)], registry)
    second = await run_training(plan(), [ModelSpec("tiny", tiny)], registry, promote=False)
    assert first.models[0].published is not None
    assert second.models[0].published is not None
    assert not second.models[0].published.current
    assert await registry.current("tiny") == first.models[0].published.version


async def test_a_split_with_nothing_held_out_publishes_nothing(registry: ModelRegistry) -> None:
    early = plan(lambda: [r for r in LOG if r[2] < CUT])
    report = await run_training(early, [ModelSpec("tiny", tiny)], registry)
    assert report.error is not None
    assert "left 4 training and 0 held-out rows" in report.error
    assert report.models == []
    assert await registry.names() == []


async def test_an_empty_log_publishes_nothing(registry: ModelRegistry) -> None:
    report = await run_training(plan(lambda: []), [ModelSpec("tiny", tiny)], registry)
    assert report.error is not None
    assert "has no interactions" in report.error
    assert await registry.names() == []


async def test_the_guard_holds_back_a_worse_model_or_a_data_outage(
    registry: ModelRegistry,
) -> None:
    specs: list[ModelSpec[list[Interaction]]] = [ModelSpec("tiny", tiny)]
    first = await run_training(plan(), specs, registry, max_drop=0.3, guard_metric="hr@1")
    assert first.ok  # nothing serves yet: nothing to compare with
    serving = first.models[0].published
    assert serving is not None

    def worse(
        model: Model, train: list[Interaction], held_out: list[Interaction]
    ) -> dict[str, float]:
        return {"hr@1": 0.25}  # half of the serving 0.5

    bad = DataPlan(
        source="tiny log",
        load=lambda: list(LOG),
        split=plan().split,
        describe=describe,
        evaluate=worse,
    )
    held = await run_training(bad, specs, registry, max_drop=0.3, guard_metric="hr@1")
    assert not held.ok
    outcome = held.models[0]
    assert outcome.held_back is not None
    assert "hr@1 0.2500 is under 70%" in outcome.held_back
    assert outcome.published is not None
    manifest = await registry.manifest("tiny", outcome.published.version)
    assert manifest["extra"]["held_back"] == outcome.held_back
    assert outcome.published is not None
    assert not outcome.published.current
    assert await registry.current("tiny") == serving.version

    # a data outage: far fewer rows than the serving version was trained on
    few = plan(lambda: LOG[:2] + LOG[-1:])
    outage = await run_training(few, specs, registry, max_drop=0.3, guard_metric="hr@1")
    assert outage.models[0].held_back is not None
    assert "trained on 3 rows" in outage.models[0].held_back
    assert await registry.current("tiny") == serving.version

    # a small drop passes the guard; no guard promotes anyway
    fine = await run_training(plan(), specs, registry, max_drop=0.3, guard_metric="hr@1")
    assert fine.ok
    assert fine.models[0].published is not None
    assert await registry.current("tiny") == fine.models[0].published.version
    unguarded = await run_training(bad, specs, registry)
    assert unguarded.models[0].published is not None
    assert await registry.current("tiny") == unguarded.models[0].published.version
