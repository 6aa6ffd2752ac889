"""kiln: pretraining-data curation on Spark, mixture optimization and small training runs."""

__version__ = "0.1.0"
