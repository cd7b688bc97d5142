import math
import random

import pytest

from grpokit.observe.alerts import Alert, HealthMonitor, collapse_adapt, collapse_stop, identical_fraction


def healthy(step: int, rng: random.Random) -> dict[str, float]:
    """One step of a healthy run of 200 steps: rewards rising slowly, entropy easing down, kl small, lengths steady."""
    t = step / 200

    def clamp(x: float) -> float:
        return min(max(x, 0.0), 1.0)

    accuracy = clamp(0.2 + 0.3 * t + rng.gauss(0, 0.05))
    fmt = clamp(0.6 + 0.2 * t + rng.gauss(0, 0.05))
    return {"reward": accuracy + fmt, "reward_std": 0.35 + rng.gauss(0, 0.03),
            "rewards/accuracy/mean": accuracy, "rewards/format/mean": fmt,
            "frac_reward_zero_std": clamp(0.45 + rng.gauss(0, 0.12)),
            "completions/mean_length": 180 + 40 * t + rng.gauss(0, 15),
            "completions/clipped_ratio": clamp(0.08 + rng.gauss(0, 0.04)),
            "completions/mean_terminated_length": 170 + 40 * t + rng.gauss(0, 15),
            "completions/frac_identical_in_group": clamp(0.05 + rng.gauss(0, 0.04)),
            "kl": 0.15 * math.sqrt(t) * math.exp(rng.gauss(0, 0.3)),
            "entropy": 0.7 - 0.3 * t + rng.gauss(0, 0.05),
            "loss": rng.gauss(0, 0.02), "grad_norm": abs(rng.gauss(0.5, 0.2)), "learning_rate": 1e-6, "step_time": 12.0}


def run(monitor: HealthMonitor, steps: range, override) -> list[Alert]:
    """Feed healthy metrics with `override(step, metrics)` applied; return every alert fired."""
    rng = random.Random(1234)
    alerts = []
    for step in steps:
        metrics = healthy(step, rng)
        override(step, metrics)
        alerts += monitor.observe(step, metrics)
    return alerts


def fired(alerts: list[Alert]) -> list[tuple[str, int]]:
    return [(a.name, a.step) for a in alerts]


@pytest.mark.parametrize("seed", range(5))
def test_healthy_run_of_200_steps_fires_nothing(seed):
    monitor = HealthMonitor(correctness_reward="accuracy")
    rng = random.Random(seed)
    alerts = [a for step in range(1, 201) for a in monitor.observe(step, healthy(step, rng))]
    assert alerts == []


def switch(key: str, before: float, after: float, at: int = 30):
    """An override that sets `key` to `before` up to step `at` and to `after` from then on."""
    def override(step, m):
        m[key] = after if step > at else before
    return override


@pytest.mark.parametrize(("key", "before", "after", "name", "step", "seen", "fix"), [
    # window mean with n steps at 1.0: 0.4 + 0.06 n >= 0.9 first at n = 9 (0.94)
    ("frac_reward_zero_std", 0.4, 1.0, "zero_reward_spread", 39, "0.94", "num_generations"),
    # 0.05 + 0.085 n >= 0.5 first at n = 6 (0.56)
    ("completions/clipped_ratio", 0.05, 0.9, "truncated_completions", 36, "0.56", "max_completion_length"),
    ("completions/frac_identical_in_group", 0.05, 0.9, "identical_completions", 36, "0.56", "temperature"),
])
def test_level_alert_fires_once_when_the_window_mean_reaches_its_threshold(key, before, after, name, step, seen, fix):
    alerts = run(HealthMonitor(correctness_reward="accuracy"), range(1, 101), switch(key, before, after))
    assert fired(alerts) == [(name, step)]
    assert seen in alerts[0].message and key in alerts[0].message and fix in alerts[0].fix


def test_entropy_collapse_needs_both_the_ratio_and_the_floor():
    alerts = run(HealthMonitor(correctness_reward="accuracy"), range(1, 101), switch("entropy", 0.6, 0.05))
    # 0.6 - 0.055 n < 0.1 only at n = 10 (0.05); n = 9 gives 0.105
    assert fired(alerts) == [("entropy_collapse", 40)]
    assert "0.05" in alerts[0].message and "0.6" in alerts[0].message and "learning_rate" in alerts[0].fix

    fall_to_a_fifth_but_above_the_floor = switch("entropy", 2.0, 0.4)
    assert run(HealthMonitor(correctness_reward="accuracy"), range(1, 101), fall_to_a_fifth_but_above_the_floor) == []
    below_the_floor_from_the_start = switch("entropy", 0.12, 0.05)  # 0.42x: not under a third of the start
    assert run(HealthMonitor(correctness_reward="accuracy"), range(1, 101), below_the_floor_from_the_start) == []


def test_kl_blowup_on_growth_and_on_the_ceiling():
    alerts = run(HealthMonitor(correctness_reward="accuracy"), range(1, 101), switch("kl", 0.02, 0.5, at=40))
    # 0.02 + 0.048 n > 0.1 (and > 3 x 0.02) first at n = 2 (0.116)
    assert fired(alerts) == [("kl_blowup", 42)]
    assert "0.116" in alerts[0].message and "0.02" in alerts[0].message and "beta" in alerts[0].fix

    alerts = run(HealthMonitor(correctness_reward="accuracy"), range(1, 101), switch("kl", 2.0, 2.0))
    assert fired(alerts) == [("kl_blowup", 10)]
    assert "2" in alerts[0].message and "above 1" in alerts[0].message


def test_length_hacking_fires_only_while_correctness_stays_flat():
    def hack(step, m, accuracy_slope=0.0):
        k = max(step - 20, 0)
        m["completions/mean_length"] = 200.0 + 10 * k
        m["rewards/accuracy/mean"] = 0.3 + accuracy_slope * k
        m["rewards/format/mean"] = 0.5 + 0.01 * k
        m["reward"] = m["rewards/accuracy/mean"] + m["rewards/format/mean"]

    alerts = run(HealthMonitor(correctness_reward="accuracy"), range(1, 101), hack)
    # at k = 15 the window means are 305 tokens (>= 1.5 x 200) and reward 0.905 (>= 0.8 + 0.1)
    assert fired(alerts) == [("length_hacking", 35)]
    assert "305" in alerts[0].message and "200" in alerts[0].message and "0.905" in alerts[0].message
    assert "rewards/accuracy/mean" in alerts[0].message

    def honest(step, m):
        hack(step, m, accuracy_slope=0.01)

    assert run(HealthMonitor(correctness_reward="accuracy"), range(1, 101), honest) == []
    assert run(HealthMonitor(correctness_reward=None), range(1, 101), hack) == []


def test_fires_again_after_the_condition_was_false_for_rearm_steps():
    def back_and_forth(step, m):
        m["frac_reward_zero_std"] = 0.4 if step <= 30 or 60 < step <= 90 else 1.0

    alerts = run(HealthMonitor(correctness_reward="accuracy"), range(1, 151), back_and_forth)
    assert fired(alerts) == [("zero_reward_spread", 39), ("zero_reward_spread", 99)]


def test_a_short_dip_does_not_fire_again():
    def dip(step, m):
        m["frac_reward_zero_std"] = 0.4 if step <= 30 or 60 < step <= 65 else 1.0

    # the condition is false at steps 62..73 (two or more of the five low steps in the window): 12 steps;
    # with rearm_steps = 12 that re-arms it, and it fires at step 74 (one low step left: 0.94)
    assert fired(run(HealthMonitor(correctness_reward="accuracy", rearm_steps=20), range(1, 151), dip)) == [
        ("zero_reward_spread", 39)]
    assert fired(run(HealthMonitor(correctness_reward="accuracy", rearm_steps=12), range(1, 151), dip)) == [
        ("zero_reward_spread", 39), ("zero_reward_spread", 74)]


def test_missing_nan_and_none_values_are_skipped():
    def gappy(step, m):
        del m["kl"]  # beta = 0: never logged
        m["frac_reward_zero_std"] = 1.0 if step > 30 else 0.4
        if step in (33, 35):
            m["frac_reward_zero_std"] = math.nan
        if step == 34:
            m["frac_reward_zero_std"] = None
        if step == 36:
            del m["frac_reward_zero_std"]
        if step == 37:
            m["frac_reward_zero_std"] = math.inf
        if step % 3 == 0:
            m["entropy"] = math.nan

    alerts = run(HealthMonitor(correctness_reward="accuracy"), range(1, 101), gappy)
    # five skipped steps move the ninth value at 1.0 from step 39 to step 44
    assert fired(alerts) == [("zero_reward_spread", 44)]


def test_steps_without_the_metric_do_not_count_towards_rearming():
    def pause(step, m):
        m["frac_reward_zero_std"] = 0.4 if step <= 30 or step in (61, 62) else 1.0
        if 63 <= step <= 90:
            del m["frac_reward_zero_std"]

    # false at steps 62 and 91..98, while both low values are in the window: 9 checked steps, fewer than the 10 that
    # re-arm; counting the 28 steps without the metric would re-arm it and fire again at step 99
    assert fired(run(HealthMonitor(correctness_reward="accuracy"), range(1, 151), pause)) == [
        ("zero_reward_spread", 39)]


def test_alert_renders_on_a_few_lines():
    text = str(Alert(name="kl_blowup", step=7, message="kl 3", causes="lr", fix="lower it"))
    assert text.splitlines() == ["[health] step 7: kl_blowup", "  seen:   kl 3", "  causes: lr", "  fix:    lower it"]


def test_bad_window_is_an_error():
    with pytest.raises(ValueError, match="window"):
        HealthMonitor(window=0)


def test_identical_fraction_on_hand_computed_groups():
    a, b, c, d, e = [1, 2], [1, 2, 3], [3], [4], [5]
    groups = [a, a, b, c,  # two of four duplicate: 0.5
              d, d, d, e,  # three of four: 0.75
              a, b, c, d]  # none ([1, 2] vs [1, 2, 3] differ): 0
    assert identical_fraction(groups, 4) == pytest.approx((0.5 + 0.75 + 0.0) / 3, abs=1e-12)
    assert identical_fraction([a, a, c, c], 4) == 1.0  # two pairs
    assert identical_fraction([a, a, c, c], 2) == 1.0
    assert identical_fraction([a, b, c, d], 2) == 0.0
    assert identical_fraction([], 4) == 0.0
    with pytest.raises(ValueError, match="groups of 4"):
        identical_fraction([a, b, c], 4)


@pytest.mark.parametrize("split", [5, 25, 38, 45, 49, 80])
def test_a_monitor_restored_from_its_state_alerts_as_the_uninterrupted_one(split):
    """A checkpoint's JSON round trip of `state()` at step `split`, then the same steps: the same alerts at the same
    steps as one monitor over the whole run (a fresh monitor after the split would re-learn its baselines)."""
    import json

    def trouble(step, m):
        m["frac_reward_zero_std"] = 0.4 if step <= 30 or 60 < step <= 90 else 1.0
        m["entropy"] = 1.0 if step <= 40 else 0.09  # below 0.3 x the first steps' 1.0, not below 0.3 x 0.09

    whole = fired(run(HealthMonitor(correctness_reward="accuracy"), range(1, 151), trouble))
    assert whole == [("zero_reward_spread", 39), ("entropy_collapse", 50), ("zero_reward_spread", 99)]
    first = HealthMonitor(correctness_reward="accuracy")
    rng, before, after = random.Random(1234), [], []
    for step in range(1, 151):
        metrics = healthy(step, rng)
        trouble(step, metrics)
        if step == split + 1:
            second = HealthMonitor(correctness_reward="accuracy")
            second.restore(json.loads(json.dumps(first.state())))
            first = second
        (before if step <= split else after).extend(first.observe(step, metrics))
    assert fired(before + after) == whole
    fresh = HealthMonitor(correctness_reward="accuracy")
    fresh.restore(None)
    assert fresh.state()["recent"] == {} and not any(active for active, _ in fresh.state()["checks"].values())


def test_drop_after_keeps_the_alerts_up_to_the_checkpoint(tmp_path):
    from grpokit.observe.alerts import drop_after

    path = tmp_path / "alerts.jsonl"
    drop_after(path, 3)  # no file: nothing to do
    assert not path.exists()
    path.write_text("".join(f'{{"name": "kl_blowup", "step": {s}}}\n' for s in (2, 3, 4, 9)))
    drop_after(path, 3)
    assert [line for line in path.read_text().splitlines()] == ['{"name": "kl_blowup", "step": 2}',
                                                                '{"name": "kl_blowup", "step": 3}']


@pytest.mark.parametrize(("key", "before", "after", "alert"), [
    ("entropy", 0.6, 0.05, "entropy_collapse"),
    ("completions/frac_identical_in_group", 0.1, 0.9, "identical_completions"),
])
def test_on_collapse_stop_gives_a_reason_at_the_collapse_step_and_warn_never(key, before, after, alert):
    """The stream the trainer feeds: stop gives its reason at the first step the collapse alert starts, not
    before; warn gives none; a non-collapse alert (zero spread) stops nothing."""
    for on_collapse, expected in (("stop", f"on_collapse stop: {alert} at step"), ("warn", None)):
        monitor, rng, reasons = HealthMonitor(correctness_reward="accuracy"), random.Random(7), {}
        for step in range(1, 101):
            metrics = healthy(step, rng)
            metrics[key] = after if step > 30 else before
            metrics["frac_reward_zero_std"] = 0.95 if step > 60 else 0.2  # zero_reward_spread fires, stops nothing
            started = monitor.observe(step, metrics)
            reason = collapse_stop(started, on_collapse)
            if reason is not None:
                reasons[step] = reason
            elif started and on_collapse == "stop":
                assert all(a.name == "zero_reward_spread" for a in started), started
        if expected is None:
            assert reasons == {}
        else:
            (step, reason), = reasons.items()
            assert reason == f"{expected} {step}" and 30 < step <= 45, reasons


# short collapses: long enough for the alert (entropy: a whole 10-step window below the floor; identical: half of
# one), over before a 10-step window after the raise
@pytest.mark.parametrize(("key", "before", "after", "short"), [
    ("entropy", 0.6, 0.05, (range(31, 43), range(121, 133))),
    ("completions/frac_identical_in_group", 0.1, 0.9, (range(31, 38), range(121, 128))),
])
@pytest.mark.parametrize("persistent", [True, False])
def test_on_collapse_adapt_raises_the_temperature_at_a_collapse_and_while_it_holds(key, before, after, short,
                                                                                    persistent):
    """The stream the trainer feeds, fed back as the trainer does (the raised temperature, the steps since the last
    raise). A collapse that persists from step 31: adapt raises the temperature by the step at its alert (not
    before) and again each 10-step window it still holds, up to the ceiling, then no more. Two short collapses:
    one raise at each alert. Warn and stop never change it; a zero-spread alert raises nothing."""
    episodes = (range(31, 201),) if persistent else short
    for on_collapse in ("adapt", "warn", "stop"):
        monitor, rng = HealthMonitor(correctness_reward="accuracy"), random.Random(7)
        temperature, raised_at, raises = 0.8, None, {}
        for step in range(1, 201):
            metrics = healthy(step, rng)
            metrics[key] = after if any(step in e for e in episodes) else before
            metrics["frac_reward_zero_std"] = 0.95 if step > 60 else 0.2
            started = monitor.observe(step, metrics)
            raised = collapse_adapt(started, on_collapse, temperature, 0.15, 1.2, collapsing=monitor.collapsing,
                                    since_raise=None if raised_at is None else step - raised_at, window=10)
            if raised is not None:
                raises[step], temperature, raised_at = raised, raised, step
        if on_collapse != "adapt":
            assert raises == {} and temperature == 0.8
            continue
        steps = sorted(raises)
        if persistent:
            assert 30 < steps[0] <= 45 and steps[1:] == [steps[0] + 10, steps[0] + 20], raises
            assert [raises[s] for s in steps] == [0.95, 1.1, 1.2]  # +0.15 each time, the last capped at 1.2
        else:
            assert len(steps) == 2 and all(e.start <= s < e.start + 15 for s, e in zip(steps, episodes)), raises
            assert [raises[s] for s in steps] == [0.95, 1.1]
    assert collapse_adapt([], "adapt", 0.8, 0.1, 1.2) is None
    assert collapse_adapt([], "adapt", 0.8, 0.1, 1.2, collapsing=True, since_raise=9, window=10) is None
    assert collapse_adapt([], "adapt", 0.8, 0.1, 1.2, collapsing=True, since_raise=10, window=10) == 0.9
