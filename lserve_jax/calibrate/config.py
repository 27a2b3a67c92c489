"""What a calibration run is given (`CalibConfig`, the shipped defaults) and what it returns
(`CalibResult`)."""

from __future__ import annotations

import dataclasses

import numpy as np

METHODS = ("gradient", "attention-mass")
HAYSTACKS = ("text", "filler", "mixed")


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """Knobs of a calibration run. `sink`/`local` are the streaming window being calibrated
    for. The defaults are the settings that produced the shipped SmolLM2-135M pattern: the
    decode window (64 + 128: the narrower one, and answers are decoded); 80 Adam steps on
    samples of 512-1536 tokens whose pass keys hide in tiled filler; then the boundary
    refinement at 50% sparsity (`refine_boundary`: 12 heads on each side of the cut, re-ranked
    by their measured cost on 4 windows of 4096 tokens of natural text). 17.8 minutes on 2 CPU
    cores (8.1 + 9.7), 8.5 seconds on an H200.

    Measured on SmolLM2 (bench/calib_sweep.py, bench/results/calib_sweep-2026-12-02*.json; 4K
    perplexity ratio to dense at 50% streaming heads, and a teacher-forced pass-key proxy on the
    accuracy grid, 23 cells where dense passes): the optimisation alone gives 1.029-1.031 with
    23/23 cells for filler samples (three seeds), 1.019-1.020 with 20/23 for natural-text
    samples, 1.020-1.028 with 20-23 for mixed ones. The refinement brings all seven patterns tried
    to 1.016-1.021 (six of them to 1.018 or lower); the cells at the model's retrieval limit (1536
    and 2048 tokens) stay fragile: 23/23 after refinement for filler seed 0 and mixed seed 2,
    20-22 for the other five."""

    method: str = "gradient"
    sink: int = 64
    local: int = 128
    lengths: tuple[int, ...] = (512, 1024, 1536)  # sample lengths, cycled (each compiles once)
    num_keys: int = 3  # pass keys per sample
    steps: int = 80  # optimisation steps (gradient) or samples (attention-mass)
    lr: float = 0.05
    reg: float = 0.05  # lambda of the L1 term, on the mean |alpha|
    haystack: str = "filler"  # "text": natural text (evals.haystack_ids or a given text); "filler":
    # tiled filler; "mixed": the two alternate, sample by sample (odd samples in text)
    text_weight: float = 0.0  # weight of the MSE over haystack positions past the window
    init: float = 1.0
    seed: int = 0
    max_minutes: float | None = None  # stop early (after a finished step) past this
    # Boundary refinement (gradient method, after the optimisation; 0 turns it off): the
    # `refine_band` streaming heads with the highest gates and the `refine_band` retrieval heads
    # with the lowest gates at `refine_sparsity` are re-ranked by the measured log-likelihood
    # cost of streaming each one alone (`refine_boundary`).
    refine_band: int = 12
    refine_sparsity: float = 0.5
    refine_samples: int = 4  # natural-text windows (the corpus's calibration half)
    refine_length: int = 4096  # tokens per text window
    refine_local: int | None = None  # local window of the text cost (None: `local`)

    @property
    def refine_window(self) -> int:
        return self.local if self.refine_local is None else self.refine_local

    @property
    def refines(self) -> bool:
        """Whether `calibrate` ends with the boundary refinement (gradient method only:
        attention-mass is the cheap baseline)."""
        return self.method == "gradient" and self.refine_band > 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got {self.haystack!r}")
        if self.text_weight < 0:
            raise ValueError(f"need text_weight >= 0, got {self.text_weight}")
        if self.sink < 0 or self.local < 1:
            raise ValueError(f"need sink >= 0 and local >= 1, got sink={self.sink}, local={self.local}")
        if self.refine_band < 0 or self.refine_samples < 1 or not 0.0 < self.refine_sparsity < 1.0:
            raise ValueError(f"need refine_band >= 0, refine_samples >= 1 and 0 < refine_sparsity < 1, "
                             f"got refine_band={self.refine_band}, refine_samples={self.refine_samples}, "
                             f"refine_sparsity={self.refine_sparsity}")
        if self.refine_band and self.refine_length <= self.sink + self.refine_window:
            raise ValueError(f"refine_length {self.refine_length} must exceed the window sink + local = "
                             f"{self.sink + self.refine_window}")
        if self.steps < 1 or not self.lengths or min(self.lengths) < 1 or self.num_keys < 1:
            raise ValueError(f"need steps >= 1, num_keys >= 1 and positive lengths, got {self}")


@dataclasses.dataclass
class CalibResult:
    alpha: np.ndarray  # [layers, kv_heads], float64
    curve: list[dict]  # one entry per step
    seconds: float
    config: CalibConfig
    grad_mag: np.ndarray | None = None  # accumulated |d loss / d alpha| (gradient method)
    refine: dict | None = None  # what `refine_boundary` measured and moved (refine_band > 0)

    def to_json(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "seconds": self.seconds,
                "minutes": self.seconds / 60, "curve": self.curve, "alpha": self.alpha.tolist(),
                "grad_mag": None if self.grad_mag is None else self.grad_mag.tolist(),
                "refine": self.refine}
