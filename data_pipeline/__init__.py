"""Shards: prepare_* CLIs turn raw datasets into MDS/webdataset shards; loaders stream them back."""
