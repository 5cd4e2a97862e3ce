"""Monitors of the served student: Evidently reports over prediction-log windows, per-slice
quality, label-free estimates and alert hooks. May import `kd_ops`, never `flows`.
"""
