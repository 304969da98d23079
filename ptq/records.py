"""What a PTQ run reports: one `LayerRecord` per layer, one `BlockRecord` per decoder block,
and the `PTQResult` that holds them with the codes.

Plain dataclasses at the bottom of the PTQ import graph: the entry point (`ptq.apply`) and the
block-by-block driver (`ptq.sequential`) both build them, so they live here rather than in either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .formats import QuantizedTensor

__all__ = ["BlockRecord", "LayerRecord", "PTQResult"]


@dataclass
class LayerRecord:
    """What happened to one layer. The calibration fields are None for a data-free run."""

    name: str
    block: int | None  # decoder block index (None outside the blocks, e.g. lm_head)
    shape: tuple[int, int]  # (out, in)
    method: str
    spec: str
    weight_rel_error: float  # ||W - W_hat||^2 / ||W||^2
    proxy_loss: float | None = None  # tr(dW H dW^T) on the calibration inputs
    rel_output_error: float | None = None  # ||X dW^T||^2 / ||X W^T||^2 on the same inputs
    damp: float | None = None  # damping the method used, if it has one
    n_tokens: int = 0  # calibration tokens the layer saw
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BlockRecord:
    """The block-level local loss of one decoder block, on the calibration inputs it received:
    ||Y_q - Y||^2 / ||Y - X||^2, the quantized block's output error against the FP block's
    outputs Y, relative to what the FP block adds to its input X (the residual stream itself
    would make every block look nearly exact)."""

    block: int
    rel_output_error: float
    n_tokens: int
    seconds: float = 0.0  # the block's calibration, quantization and error passes

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PTQResult:
    method: str
    spec: str
    options: dict
    layers: list[LayerRecord]
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)  # for save_quantized
    calibration_tokens: int = 0  # unique tokens of the budget (0 for a data-free run)
    seconds: float = 0.0
    blocks: list[BlockRecord] = field(default_factory=list)  # empty for a data-free run

    def to_dict(self) -> dict:
        """JSON-ready summary (without the codes)."""
        return {"method": self.method, "spec": self.spec, "options": self.options,
                "calibration_tokens": self.calibration_tokens, "seconds": self.seconds,
                "layers": [r.to_dict() for r in self.layers],
                "blocks": [b.to_dict() for b in self.blocks]}
