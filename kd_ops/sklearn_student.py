"""Old import path of the scikit-learn students, kept so that models registered before kd-ops 0.2
keep loading: their skops files name `kd_ops.sklearn_student.SoftTargetClassifier` by dotted
path. New code imports `kd_ops.models.sklearn_students`."""

from kd_ops.models.sklearn_students import *  # noqa: F401,F403
from kd_ops.models.sklearn_students import SoftTargetClassifier  # noqa: F401
