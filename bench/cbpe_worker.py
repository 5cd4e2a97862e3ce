"""NannyML CBPE's accuracy estimate per window, run in an environment that has nannyml (it pins
libraries kd-ops does not share). Called by `bench/monitor_quality.py --cbpe-python PY`:

    PY bench/cbpe_worker.py DATA.npz N_WINDOWS   ->   a JSON list of N estimated accuracies

DATA.npz holds `ref_probs`, `ref_labels` (the reference: validation predictions with labels) and
`win_0` ... `win_{N-1}` (each window's predicted probabilities). Each window is one CBPE chunk.
"""

import json
import sys

import numpy as np
import pandas as pd


def frame(probs: np.ndarray, labels: np.ndarray | None = None) -> pd.DataFrame:
    df = pd.DataFrame({f"p{k}": probs[:, k] for k in range(probs.shape[1])})
    df["y_pred"] = probs.argmax(axis=1)
    if labels is not None:
        df["y_true"] = labels
    return df


def main(path: str, n: int) -> None:
    import nannyml as nml

    data = np.load(path, allow_pickle=False)
    ref = frame(data["ref_probs"], data["ref_labels"])
    classes = data["ref_probs"].shape[1]
    estimator = nml.CBPE(
        # two classes: CBPE's binary form, on the probability of class 1
        y_pred_proba="p1" if classes == 2 else {k: f"p{k}" for k in range(classes)},
        y_pred="y_pred",
        y_true="y_true",
        problem_type="classification_binary" if classes == 2 else "classification_multiclass",
        metrics=["accuracy"],
        chunk_number=1,
    )
    estimator.fit(ref)
    out = []
    for i in range(n):
        win = frame(data[f"win_{i}"])
        est = estimator.estimate(win).filter(period="analysis").to_df()
        out.append(float(est[("accuracy", "value")].iloc[0]))
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
