"""The suggestion rules of the LR finder on synthetic loss curves whose answers are known."""

from __future__ import annotations

import math

import pytest

from engineflow.execute.lr_suggestions import min10, steep, suggestions, trimmed, valley

LRS = [10 ** (-6 + i / 8) for i in range(49)]  # 1e-6 to 1, 8 points a decade


def test_min10_is_a_tenth_of_the_lr_at_the_lowest_loss():
    losses = [abs(i - 30) + 1.0 for i in range(49)]  # lowest at index 30
    assert min10(LRS, losses) == pytest.approx(LRS[30] / 10)


def test_steep_is_where_the_loss_falls_fastest_per_decade():
    # flat, a drop of 1 per step from index 20 to 24 (the steepest at 22 -> 23), then flat again
    drops = {20: 0.2, 21: 0.5, 22: 1.0, 23: 0.5}
    losses, value = [], 5.0
    for i in range(49):
        losses.append(value)
        value -= drops.get(i, 0.0)
    assert steep(LRS, losses) == LRS[22]


def test_steep_reads_the_slope_against_log_lr_not_lr():
    # equal falls, but the second spans a tenth of a decade: against log(lr) it is the steeper
    lrs = [1e-4, 1e-3, 1e-2, 1.1e-2]
    assert steep(lrs, [3.0, 2.0, 1.5, 1.0]) == 1e-2


def test_valley_is_half_way_down_the_longest_fall():
    # falls over indices 0..29 (a valley of 30 points), then rises: fastai takes index -1 + 10 + 5
    losses = [30.0 - i for i in range(30)] + [1.0 + i for i in range(19)]
    assert valley(LRS, losses) == LRS[14]


def test_valley_prefers_the_longest_fall_to_the_deepest_point():
    # a short sharp dip early (indices 0..3), then a long gentle fall from 10 to 40
    losses = [5.0, 4.0, 3.0, 0.5] + [6.0] * 6 + [5.9 - 0.01 * i for i in range(31)] + [7.0] * 8
    index = LRS.index(valley(LRS, losses))
    assert 10 <= index <= 40


def test_valley_of_a_rising_curve_is_its_first_point():
    assert valley(LRS[:5], [1.0, 2.0, 3.0, 4.0, 5.0]) == LRS[0]


def test_trimmed_drops_a_tenth_at_the_start_the_last_five_and_everything_from_a_nan():
    losses = [float(i) for i in range(49)]
    lrs, kept = trimmed(LRS, losses, steps=49)
    assert kept == losses[4:44] and lrs == LRS[4:44]
    with_nan = [*losses[:30], math.nan, *losses[31:]]
    lrs, kept = trimmed(LRS, with_nan, steps=49)
    assert kept == losses[4:25]


def test_trimmed_keeps_a_short_curve_whole():
    assert trimmed(LRS[:6], [3.0, 2.0, 1.0, 2.0, 3.0, 4.0], steps=6) == (LRS[:6], [3.0, 2.0, 1.0, 2.0, 3.0, 4.0])


def test_suggestions_apply_every_rule_to_the_trimmed_curve():
    losses = [abs(i - 30) + 1.0 for i in range(49)]
    found = suggestions(LRS, losses, steps=49)
    lrs, kept = trimmed(LRS, losses, steps=49)
    assert found == {"valley": valley(lrs, kept), "steep": steep(lrs, kept), "min10": LRS[30] / 10}


def test_no_suggestion_from_fewer_than_two_points():
    assert suggestions(LRS[:1], [1.0], steps=100) == {"valley": None, "steep": None, "min10": None}
    assert suggestions(LRS[:3], [1.0, math.nan, 2.0], steps=100) == {"valley": None, "steep": None, "min10": None}
