"""The semantic-drift study: explain both stages, drift metrics, statistics, the report."""
