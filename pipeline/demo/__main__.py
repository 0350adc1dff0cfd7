"""`python -m pipeline.demo`: the whole DAG on the offline demo (pipeline/demo/experiment.py)."""

from pipeline.demo.experiment import main

raise SystemExit(main())
