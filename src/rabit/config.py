"""RaBiTConfig: every knob of the quantized layer and its initialization, validated in one place."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

MODES = ("coupled", "independent", "frozen")
INITS = ("naive", "svid", "isvid")
STES = ("identity", "clipped")
LATENT_INITS = ("weight", "reconstruction")

# Module-name patterns (regular expressions, matched with re.search) kept in full precision by default.
# Embeddings are not nn.Linear anyway; lm_head is tied to the embeddings in many models and is the most
# sensitive matrix, so we keep it in full precision like the paper does.
DEFAULT_EXCLUDE = ("embed", "lm_head")


@dataclass
class RaBiTConfig:
    """Configuration of RaBiT quantization.

    num_paths: binary paths per layer (k). 2 gives 2 bits per weight; 1 is a OneBit-style 1-bit layer.
    mode: "coupled" (RaBiT: one shared latent weight, paths derived sequentially from it),
        "independent" (standard residual QAT: one latent per path) or "frozen" (independent with every path
        but the last frozen after initialization).
    init: "naive" (residual sign with per-row mean-abs scales), "svid" (greedy residual SVID) or "isvid"
        (iterative residual SVID, Gauss-Seidel over the paths for `isvid_rounds` rounds).
    precondition: scale the weight by input/output channel importance before decomposing (needs calibration
        data), with exponents alpha_in / alpha_out.
    ste: straight-through estimator: "identity" passes the gradient unchanged; "clipped" zeroes it where the
        latent weight lies beyond `ste_clip` times the largest magnitude the paths can represent there.
    latent_init: how the coupled latent weight starts: "weight" (the original full-precision weight) or
        "reconstruction" (the initialized approximation sum_i g_i B_i h_i).
    exclude: module-name regexes kept in full precision. None means DEFAULT_EXCLUDE; user-given patterns
        must each match at least one module.
    add_bias: give every quantized layer a bias (zeros where the source layer has none). The block stage's
        refinement then fits the binary paths to the inputs' variation around their mean and sets the bias to the
        mean output error (rabit.train.blockwise), and distillation trains it with the scales.
    """

    num_paths: int = 2
    mode: str = "coupled"
    init: str = "isvid"
    isvid_rounds: int = 8   # measured: 8 rounds beat 4 after init and after training (docs/RESULTS.md)
    precondition: bool = True
    alpha_in: float = 1.0
    alpha_out: float = 0.5
    ste: str = "identity"
    ste_clip: float = 1.0
    latent_init: str = "weight"
    exclude: tuple[str, ...] | None = None
    svid_power_iters: int = 30
    add_bias: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.exclude, list):
            self.exclude = tuple(self.exclude)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.num_paths, int) or isinstance(self.num_paths, bool) or self.num_paths < 1:
            raise ValueError(f"num_paths must be an integer >= 1, got {self.num_paths!r}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.ste not in STES:
            raise ValueError(f"unknown ste {self.ste!r}; choose one of {', '.join(STES)}")
        if self.latent_init not in LATENT_INITS:
            raise ValueError(f"unknown latent_init {self.latent_init!r}; choose one of {', '.join(LATENT_INITS)}")
        if self.isvid_rounds < 0:
            raise ValueError(f"isvid_rounds must be >= 0, got {self.isvid_rounds}")
        if self.ste_clip <= 0:
            raise ValueError(f"ste_clip must be > 0, got {self.ste_clip}")
        if not isinstance(self.add_bias, bool):
            raise ValueError(f"add_bias must be true or false, got {self.add_bias!r}")
        if self.svid_power_iters < 1:
            raise ValueError(f"svid_power_iters must be >= 1, got {self.svid_power_iters}")
        for name in ("alpha_in", "alpha_out"):
            value = getattr(self, name)
            if not (0.0 <= value <= 4.0):
                raise ValueError(f"{name} must be in [0, 4], got {value}")

    @property
    def exclude_patterns(self) -> tuple[str, ...]:
        return DEFAULT_EXCLUDE if self.exclude is None else self.exclude

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exclude"] = list(self.exclude) if self.exclude is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RaBiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown RaBiTConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
