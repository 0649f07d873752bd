"""The advised space: a quadrant's ranges within the user's own, the user's other settings kept."""

from __future__ import annotations

from search.advise import QUADRANTS, _advised_space, quadrant


def test_the_quadrants_follow_size_and_similarity():
    assert quadrant(per_class=10, msp=0.9).name == "small & similar"
    assert quadrant(per_class=10, msp=0.05).name == "small & different"
    assert quadrant(per_class=500, msp=0.9).name == "large & similar"
    assert quadrant(per_class=500, msp=0.05).name == "large & different"
    # less data, more frozen; more similar data, more frozen
    small, large = QUADRANTS[True, False], QUADRANTS[False, False]
    assert small.freeze[0] > large.freeze[0] and small.freeze[1] > large.freeze[1]
    assert QUADRANTS[True, True].freeze[0] > small.freeze[0]


def test_a_grid_stays_a_grid_of_as_many_points_within_the_users_ranges():
    space = {"freeze_depth": {"type": "int", "low": 0, "high": 8, "step": 2},
             "lr_scale": {"type": "loguniform", "low": 0.05, "high": 1.0, "grid_points": 4},
             "lr": {"type": "loguniform", "low": 0.003, "high": 0.3, "grid_points": 3}}
    advised, changes = _advised_space(space, QUADRANTS[False, False], [9])
    # large & different: freeze at most a quarter of 9 stages, lr_scale 0.1..1
    assert advised["freeze_depth"] == {"type": "int", "low": 0, "high": 2, "step": 2}
    small, _ = _advised_space(space, QUADRANTS[True, False], [9])
    # small & different: 30-70 % of 9 stages, 3..6, moved onto the user's steps: 4, 6
    assert small["freeze_depth"] == {"type": "int", "low": 4, "high": 6, "step": 2}
    assert advised["lr_scale"] == {"type": "loguniform", "low": 0.1, "high": 1.0,
                                   "grid_points": 4}
    assert advised["lr"] == space["lr"]  # not the quadrant's to change
    assert advised["head"] == {"type": "choice", "values": ["linear"]}
    assert "lr_scale: 0.05..1 -> 0.1..1" in changes
