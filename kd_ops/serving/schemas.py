"""Request and error bodies of `kd-ops serve`, validated by pydantic; errors name the field."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import orjson
from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, TypeAdapter, ValidationError

from kd_ops.prediction_log.feedback import REQUEST_ID_PATTERN

log = logging.getLogger(__name__)


# -- request bodies ---------------------------------------------------------------------------
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # no "1.5" strings, no bools, no NaN/inf
SLICE_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
SliceName = Annotated[str, StringConstraints(pattern=SLICE_NAME)]
SliceValue = Annotated[str, StringConstraints(max_length=256)]
Slices = dict[SliceName, SliceValue]
Rows = Annotated[list[list[Finite]], Field(min_length=1)]


class PredictRequest(BaseModel):
    """`rows`: feature rows (raw values, as in training). `slices`: optional labels to cut the
    traffic by later (one dict for the whole batch, or one per row), e.g. {"site": "berlin"}."""

    model_config = ConfigDict(extra="forbid")
    rows: Rows
    slices: Slices | list[Slices] | None = None


class DataframeSplit(BaseModel):
    """pandas' `to_dict(orient="split")`: column names (one per feature, in the model's order), rows."""

    model_config = ConfigDict(extra="forbid")
    columns: Annotated[list[Any], Field(min_length=1)]  # names (strings or integers), checked by the handler
    data: Rows
    index: list[Any] | None = None  # pandas writes one; not used


class InvocationsRequest(BaseModel):
    """MLflow's scoring protocol (`mlflow models serve`): exactly one of the three."""

    model_config = ConfigDict(extra="forbid")
    inputs: Rows | None = None
    instances: Rows | None = None
    dataframe_split: DataframeSplit | None = None


class Label(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prediction_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    label: Annotated[int, Strict(), Field(ge=0)]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: Annotated[list[Label], Field(min_length=1)]
    request_id: Annotated[str, StringConstraints(pattern=REQUEST_ID_PATTERN)] | None = None


_PREDICT = TypeAdapter(PredictRequest)
_INVOCATIONS = TypeAdapter(InvocationsRequest)
_FEEDBACK = TypeAdapter(FeedbackRequest)

# -- response bodies: documentation (the OpenAPI schema); the handlers write JSON with orjson ---
MAX_ERRORS = 20  # problems listed in an error body; `detail` counts them all


class Problem(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Every refusal: `detail` is one line that names the field (and counts all problems), `field`
    the first one, `errors` at most 20 problems."""

    detail: str
    field: str
    errors: Annotated[list[Problem], Field(max_length=MAX_ERRORS)]
    unknown_ids: int | None = Field(None, description="/feedback 422: how many of the ids the log does not hold")


class ModelRef(BaseModel):
    name: str
    version: str
    alias: str


class RowPrediction(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    id: str = Field(description="prediction id: send it back with the true label to /feedback")
    class_: int = Field(alias="class")
    probabilities: list[float]
    model_version: str


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[RowPrediction]


class InvocationsResponse(BaseModel):
    predictions: list[list[float]] = Field(description="class probabilities per row, as predict_proba")
    prediction_ids: list[str] = Field(description="kd-ops: the prediction id of each row, for /feedback")


class FeedbackResponse(BaseModel):
    stored: int
    replayed: bool = Field(False, description="true: this request_id was stored before; nothing new was")


class AliasWatch(BaseModel):
    interval_s: float
    last_checked: str | None
    error: str | None
    swaps: list[dict[str, str]]


class LogHealth(BaseModel):
    store: str
    rows_written: int
    commits: int
    failed_commits: int
    consecutive_failed_commits: int
    last_commit_error: str | None
    queued: int


class Health(BaseModel):
    status: Literal["ok", "degraded", "failing"]
    model: ModelRef
    served_rows: int
    alias_watch: AliasWatch
    log: LogHealth | None
    shadow: dict[str, Any] | None


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str
    uri: str
    run_id: str | None
    source: str | None
    n_features: int
    n_classes: int
    slices: list[str]
    loaded_at: str
    lineage: dict[str, str]


class RequestError(Exception):
    """A client error: HTTP status, the field it concerns (`rows[3][7]`), and what is wrong."""

    def __init__(
        self,
        status: int,
        field: str,
        message: str,
        errors: list[dict[str, str]] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message
        self.errors = (errors or [{"field": field, "message": message}])[:MAX_ERRORS]
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, "field": self.field, "errors": self.errors, **self.extra}


def _field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _parse(adapter: TypeAdapter, body: bytes) -> Any:
    try:
        return adapter.validate_json(body)
    except ValidationError as exc:
        raw = exc.errors(include_url=False)

        def union_branch(e: dict) -> bool:
            # `slices` (one dict, or a list of dicts) reports a type error for the branch not taken,
            # located at the branch's tag ("list[...]"); errors inside the taken branch are kept.
            last = e["loc"][-1] if e["loc"] else None
            return e["type"] in ("list_type", "dict_type") and isinstance(last, str) and "[" in last

        if len(raw) > 1:
            raw = [e for e in raw if not union_branch(e)] or raw
        errors = []
        for err in raw:
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("dict", "list"))))
            got = err.get("input")
            shown = f", got {got!r}" if isinstance(got, (str, int, float, bool)) and len(repr(got)) <= 40 else ""
            errors.append({"field": _field(loc), "message": err["msg"] + shown})
        errors = list({(e["field"], e["message"]): e for e in errors}.values())
        first = errors[0]
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise RequestError(422, first["field"], f"{first['field']}: {first['message']}{more}", errors) from None


def _json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)
