"""Release: the promotion gate (`gate`), the promote stage (`promote`) and the S3 model registry
with its atomic alias (`registry`)."""
