"""`python -m demo`: the whole DAG on the offline demo (demo/experiment.py)."""

from demo.experiment import main

raise SystemExit(main())
