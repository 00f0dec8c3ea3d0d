"""The parallel layout of a checkpoint or a run: tensor, pipeline, virtual pipeline and data parallel sizes."""
from __future__ import annotations

from dataclasses import dataclass

from formats.errors import InteropError


@dataclass(frozen=True)
class Layout:
    """How a model is split over ranks.

    ``vpp`` is the number of virtual pipeline chunks per pipeline rank (``None`` when not interleaved),
    ``dp`` the data-parallel size and ``ep`` the expert-parallel size. ``world_size`` is tp * pp * dp.
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    dp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InteropError(f"layout: {name} must be a positive integer, got {value!r}")
        if self.vpp is not None and (not isinstance(self.vpp, int) or self.vpp < 1):
            raise InteropError(f"layout: vpp must be a positive integer or None, got {self.vpp!r}")
        if self.vpp is not None and self.vpp > 1 and self.pp < 2:
            raise InteropError("layout: virtual pipeline (vpp > 1) needs pp >= 2")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def interleaved(self) -> int | None:
        """``vpp`` when the pipeline is interleaved (more than one chunk per rank), else ``None``.

        ``vpp=1`` and ``vpp=None`` both mean "not interleaved"; Megatron-Core wants ``None`` for that.
        """
        return self.vpp if self.vpp and self.vpp > 1 else None

    @property
    def virtual_chunks(self) -> int:
        """Model chunks per pipeline rank (1 without interleaving)."""
        return self.vpp or 1

    def __str__(self) -> str:
        text = f"TP{self.tp}xPP{self.pp}"
        if self.interleaved:
            text += f"xVPP{self.vpp}"
        if self.dp > 1:
            text += f"xDP{self.dp}"
        return text
