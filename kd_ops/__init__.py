"""kd-ops: knowledge distillation as a production loop.

Heavy libraries (torch, lightning, mlflow) are imported where they are used, so that
`import kd_ops` and `kd-ops --help` stay fast.
"""

__version__ = "0.1.0"
