"""Everything MLflow: the tracking store (checks, ``mlflow ui`` commands), the parent and child
runs of a heal with the healed model, and the trade-off plot."""
