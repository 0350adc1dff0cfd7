"""download_data: params data.* -> data/raw/{train,eval}/ (parquet, source schema)."""

from pipeline.atomic import atomic_dir
from pipeline.fetch_data import fetch_data
from pipeline.params import load_params, save_resolved
from pipeline.paths import DATA_RAW, asset_cache_dir


def main() -> None:
    params = load_params()
    with atomic_dir(DATA_RAW) as tmp:
        manifests = fetch_data(params.data, tmp, asset_cache_dir())
        save_resolved(params, tmp, "download_data")
    for split, manifest in manifests.items():
        print(
            f"{split}: {manifest['rows_fetched']} rows from {len(manifest['shards'])} of "
            f"{manifest['source_shards']} shards ({manifest['rows_needed']} needed)"
        )


if __name__ == "__main__":
    main()
