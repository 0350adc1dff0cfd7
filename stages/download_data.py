"""download_data: params data.* -> data/raw/{train,eval}/ (parquet, source schema)."""

from pipeline.download.data import describe_fetch, fetch_data
from pipeline.params import load_params, save_resolved
from pipeline.stage_io import DATA_RAW, atomic_dir, run_stage


def main() -> None:
    params = load_params()
    with atomic_dir(DATA_RAW) as tmp:
        manifests = fetch_data(params.data, tmp)
        save_resolved(params, tmp, "download_data")
    print(describe_fetch(manifests))


if __name__ == "__main__":
    run_stage(main)
