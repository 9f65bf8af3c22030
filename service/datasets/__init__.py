"""Datasets: uploads (loose files or a zip of class folders), their checks and storage."""
