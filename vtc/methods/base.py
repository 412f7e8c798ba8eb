"""What a method is: hyperparameters (a validated dataclass) plus tensor logic at one or more sites.

Methods never import transformers. An adapter hands them :class:`VisualInput` (one image's features and the
vision-tower scores they asked for) and applies the :class:`Selection` they return.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..sites import ScoreKind, ScoreRequest, Selection, VisionInfo, VisualInput

__all__ = ["Method", "ScoreKind", "ScoreRequest", "Selection", "VisionInfo", "VisualInput"]

class Method:
    """Base class. Subclasses are dataclasses of hyperparameters and override the site methods they use."""

    name: ClassVar[str] = ""
    sites: ClassVar[tuple[str, ...]] = ()
    #: "ratio": the user gives ratio= or tokens=; "optional": either or none; "own": the method sets its budget
    budget_rule: ClassVar[str] = "ratio"
    requires_cls: ClassVar[bool] = False

    ratio: float | None
    tokens: int | None

    def setup(self, info: VisionInfo) -> None:
        """Resolve model-dependent defaults; raise ValueError if the model cannot support this method."""
        if self.requires_cls and not info.has_cls:
            raise ValueError(f"method {self.name!r} needs a vision tower with a CLS token; this model has none")

    def score_requests(self) -> list[ScoreRequest]:
        return []

    def select(self, visual: VisualInput) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return f"{self.name}({params})"
