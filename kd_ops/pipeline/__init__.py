"""Whole jobs over a validated config: one distillation end to end (`distillation`), re-distillation
on recent traffic (`redistill`) and grids of distillations (`sweep`)."""
