"""Prefect flows and deployments: distill, monitor, redistill.

Orchestration layer: wiring only. Flows call into `monitors` and `kd_ops`; nothing imports
from here.
"""
