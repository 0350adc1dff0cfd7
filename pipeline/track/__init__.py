"""MLflow: one run per trained policy, the Model Registry and the served model."""
