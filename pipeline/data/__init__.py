"""The data contract (one record type) and the subsample and tokenize stages."""
