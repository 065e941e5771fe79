"""S3 server fixture (owned by the tokenization work)."""
