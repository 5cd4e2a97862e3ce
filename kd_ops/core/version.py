"""The kd-ops version, apart from the package's public API so that modules can read it without
importing `kd_ops` itself (whose lazy names point back at them)."""

__version__ = "0.1.0"
