"""The source side: freeze, dump and pre-dump pipelines."""
