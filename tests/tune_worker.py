"""A tune worker for tests/test_tune.py: `python tests/tune_worker.py STORAGE STUDY SECONDS`
runs trials whose experiment is a sleep of SECONDS (a stand-in for `dvc exp run`), with a
one-second heartbeat, until the study has 4 complete trials."""

import sys
import time

from pipeline.search_space import Dimension, Spec
from pipeline.tune import open_study, run_study

SPEC = Spec((Dimension("train.lr", 1e-4, 1e-2, True),), "win_rate", "maximize", None, 4, 0)


def sleeper(seconds: float):
    def runner(values: dict[str, float], name: str) -> dict[str, float]:
        print(f"started {name}", flush=True)
        time.sleep(seconds)
        return {"win_rate": values["train.lr"]}

    return runner


if __name__ == "__main__":
    storage, study, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    run_study(open_study(study, storage, SPEC, heartbeat=(1, 2)), SPEC, sleeper(seconds), 1)
