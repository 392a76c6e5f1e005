"""The dead-expert / collapse detector and the expert-load heatmap, on synthetic metrics rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.image import imread

from moe_lm.config import RoutingMonitorConfig
from moe_lm.training.routing_monitor import (
    MAX_HISTORY,
    RoutingMonitor,
    heatmap_path,
    layer_loads,
    load_entropy_ratio,
)


def row(step: int, *layers: list[float]) -> dict:
    return {"step": step, "loss": 1.0,
            **{f"moe/layer{i}/tokens_per_expert": list(t) for i, t in enumerate(layers)}}


def healthy(rng: np.random.Generator, E: int = 8) -> list[float]:
    return list(rng.integers(70, 130, size=E))  # within +-30% of the mean


def run(monitor: RoutingMonitor, rows: list[dict]) -> dict[int, list[str]]:
    """step -> titles of the alerts raised at that step."""
    return {r["step"]: [a.title for a in monitor.observe(r)] for r in rows}


def test_detector_fires_once_when_an_expert_stays_under_the_fraction_for_the_window():
    rng = np.random.default_rng(0)
    monitor = RoutingMonitor(RoutingMonitorConfig(dead_frac=0.1, window=50))
    rows = []
    for step in range(10, 201, 10):  # logged every 10 steps; expert 3 of layer 1 dies at step 1
        dying = healthy(rng)
        dying[3] = 2
        rows.append(row(step, healthy(rng), dying))
    alerts = run(monitor, rows)
    fired = {s: a for s, a in alerts.items() if a}
    assert fired == {50: ["dead expert: layer 1 expert 3"]}  # steps 1..50 = the 50-step window


def test_detector_is_silent_on_a_healthy_run_and_on_a_short_dip():
    rng = np.random.default_rng(1)
    monitor = RoutingMonitor(RoutingMonitorConfig(dead_frac=0.1, window=50))
    rows = [row(s, healthy(rng), healthy(rng)) for s in range(10, 301, 10)]
    dip = healthy(rng)
    dip[0] = 0
    rows[5] = row(60, healthy(rng), dip)  # one logged interval dead, then back
    rows[6] = row(70, healthy(rng), dip)
    assert not any(run(monitor, rows).values())


def test_detector_fires_again_only_after_the_expert_recovered():
    monitor = RoutingMonitor(RoutingMonitorConfig(dead_frac=0.1, window=20))
    dead, ok = [0, 100, 100, 100], [100, 100, 100, 100]
    loads = [dead] * 4 + [ok] + [dead] * 3
    alerts = run(monitor, [row(10 * (i + 1), t) for i, t in enumerate(loads)])
    assert [s for s, a in alerts.items() if "dead expert: layer 0 expert 0" in a] == [20, 70]


def test_collapse_fires_when_a_layer_routes_to_two_of_eight_experts():
    monitor = RoutingMonitor(RoutingMonitorConfig(dead_frac=0.0, collapse_entropy=0.5, window=30))
    collapsed = [500, 500, 0, 0, 0, 0, 0, 0]  # top-2 on the same two experts for every token
    alerts = run(monitor, [row(s, [125] * 8, collapsed) for s in range(10, 61, 10)])
    assert {s: a for s, a in alerts.items() if a} == {30: ["routing collapse: layer 1"]}
    ratio = load_entropy_ratio(np.array([collapsed], dtype=float))[0]
    assert math.isclose(ratio, math.log(2) / math.log(8))  # 1/3: two even experts out of 8


def test_alert_text_says_when_it_started_and_what_to_change():
    monitor = RoutingMonitor(RoutingMonitorConfig(dead_frac=0.1, window=10))
    monitor.observe(row(5, [100, 100, 100, 3]))
    (alert,) = monitor.observe(row(10, [100, 100, 100, 3]))
    assert "since step 1" in alert.text and "loss.aux_coef" in alert.text
    assert "expert=aux_free" in alert.text


def test_rows_without_moe_keys_are_ignored():
    monitor = RoutingMonitor(RoutingMonitorConfig())
    assert monitor.observe({"step": 5, "val_loss": 3.0}) == [] and not monitor.steps
    assert layer_loads({"step": 1}) is None
    assert layer_loads(row(1, [1, 2], [3, 4])).tolist() == [[1, 2], [3, 4]]


def test_history_is_thinned_past_its_cap_keeping_the_newest_row():
    monitor = RoutingMonitor(RoutingMonitorConfig())
    for s in range(1, 2 * MAX_HISTORY + 2):
        monitor.observe(row(s, [s, 1]))
    assert len(monitor.steps) <= MAX_HISTORY and monitor.steps[-1] == 2 * MAX_HISTORY + 1
    assert monitor.steps == sorted(monitor.steps)


def dark_blue_pixels(path) -> int:
    rgb = imread(path)[..., :3].reshape(-1, 3)
    return int(((rgb[:, 2] > 0.3) & (rgb[:, 0] < 0.15) & (rgb[:, 1] < 0.3)).sum())


@pytest.mark.parametrize("layers, experts", [(1, 4), (3, 8), (80, 64)])
def test_heatmap_png_is_written_with_the_dead_expert_in_the_cold_colour(tmp_path, layers, experts):
    paths = {}
    for case in ("healthy", "dead"):
        rng = np.random.default_rng(2)
        monitor = RoutingMonitor(RoutingMonitorConfig())
        for s in range(10, 110, 10):
            loads = [healthy(rng, experts) for _ in range(layers)]
            if case == "dead":
                loads[0][0] = 0  # layer 0, expert 0 dead all along
            monitor.observe(row(s, *loads))
        paths[case] = monitor.write_heatmap(heatmap_path(tmp_path / case, 100), 100)
    path = paths["dead"]
    assert path == tmp_path / "dead" / "plots" / "expert_load_step_0000100.png" and path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 800
    # RdBu_r draws load 0 (dead) dark blue: the dead expert's cells add dark-blue pixels
    assert dark_blue_pixels(paths["dead"]) > dark_blue_pixels(paths["healthy"]) + 50


def test_no_heatmap_before_anything_was_logged(tmp_path):
    assert RoutingMonitor(RoutingMonitorConfig()).write_heatmap(tmp_path / "x.png", 0) is None
    assert not (tmp_path / "x.png").exists()
