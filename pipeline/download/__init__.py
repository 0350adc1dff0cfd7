"""Fetch the base model and the pairs: the download_model and download_data stages."""
