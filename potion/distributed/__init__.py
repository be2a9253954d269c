"""Everything Ray: connecting to or starting a cluster, the sharded retain pass, and the Ray
Tune search whose trials call the same ``StepEvaluator`` as the local loop."""
