"""Turning a fingerprint distance into a same-subject probability.

The evaluation helper fits a ``Calibration`` on held-out pairs
(``fingerprint_training.calibration_fit.fit_calibration``); it travels inside the checkpoint's
metadata so that every query made with the model can report probabilities and thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit


@dataclass(frozen=True)
class Calibration:
    """Logistic link from distance to probability plus an FPR -> threshold table.

    ``probability(d) = 1 / (1 + exp(-(coef * d + intercept)))``; ``coef`` is negative so a
    smaller distance means a higher probability. ``threshold`` is the distance threshold at
    ``target_fpr``; ``fpr_table`` lists ``[fpr, distance_threshold]`` pairs measured on
    held-out negatives, for other operating points.
    """

    coef: float
    intercept: float
    threshold: float
    target_fpr: float
    fpr_table: tuple = field(default=())

    def __post_init__(self):
        # Normalise whatever came in (lists from JSON, numpy scalars) to plain floats.
        object.__setattr__(self, "coef", float(self.coef))
        object.__setattr__(self, "intercept", float(self.intercept))
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "target_fpr", float(self.target_fpr))
        table = tuple((float(f), float(t)) for f, t in (self.fpr_table or ()))
        object.__setattr__(self, "fpr_table", tuple(sorted(table)))

    def probability(self, distances):
        """Same-subject probability for a distance or an array of distances.

        Numerically stable for any distance (no overflow warnings); a scalar in gives a
        float out, an array in gives a float64 array of the same shape.
        """
        p = expit(self.coef * np.asarray(distances, dtype=np.float64) + self.intercept)
        if np.ndim(distances) == 0:
            return float(p)
        return p

    def threshold_for_fpr(self, fpr: float) -> float:
        """Distance threshold that gives about ``fpr`` false positives.

        Interpolates ``fpr_table`` linearly in log(fpr); outside the table the nearest end
        is returned. Without a table only ``target_fpr`` itself can be answered.
        """
        fpr = float(fpr)
        if not self.fpr_table:
            if math.isclose(fpr, self.target_fpr, rel_tol=1e-9, abs_tol=1e-12):
                return self.threshold
            raise ValueError(
                f"this calibration has no FPR table; only target_fpr={self.target_fpr} is known")
        fprs = np.array([f for f, _ in self.fpr_table])
        thresholds = np.array([t for _, t in self.fpr_table])
        # log scale: FPRs of interest span decades (1e-4 .. 1e-1); zeros get a floor.
        floor = 1e-12
        x = np.log(np.maximum(fprs, floor))
        return float(np.interp(math.log(max(fpr, floor)), x, thresholds))

    def to_dict(self) -> dict:
        return {
            "coef": self.coef,
            "intercept": self.intercept,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "fpr_table": [[f, t] for f, t in self.fpr_table],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(
            coef=d["coef"],
            intercept=d["intercept"],
            threshold=d["threshold"],
            target_fpr=d["target_fpr"],
            fpr_table=tuple(tuple(row) for row in d.get("fpr_table", ()) or ()),
        )
