"""Curation: Spark jobs that turn raw crawls into clean, labelled documents."""
